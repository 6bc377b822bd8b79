"""Trivial baselines that every melanoma run is compared with, fitted on the same training fold:

- metadata only (sex, age, site), logistic regression;
- colour and shape statistics of the image plus that metadata, gradient boosting.

A network that does not beat them has learned nothing the data did not give away for free.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dataset import SITE_COLUMN, MetaEncoder, read_image
from utils import safe_auc

STATS_SIZE = 64
BASELINE_META_FEATURES = ("sex", "age", "site")


def image_statistics(filepaths: list[str], size: int = STATS_SIZE) -> np.ndarray:
    """Per image: colour moments of the whole image, of its darkest (lesion) part and of the rest, in RGB and
    HSV, plus the lesion's area, border irregularity and asymmetry from an Otsu mask. Cheap: ~1 ms an image."""
    rows = []
    for path in filepaths:
        rgb = cv2.resize(read_image(path), (size, size), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        _, mask = cv2.threshold(cv2.GaussianBlur(gray, (5, 5), 0), 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        lesion = mask.astype(bool)
        if lesion.sum() < 4 or (~lesion).sum() < 4:
            lesion = np.zeros_like(lesion)
            lesion[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
        features = []
        for pixels in (rgb.reshape(-1, 3), hsv.reshape(-1, 3), rgb[lesion], hsv[lesion], rgb[~lesion]):
            pixels = pixels.astype(np.float32)
            features += [*pixels.mean(0), *pixels.std(0)]
        area = lesion.mean()
        contours, _ = cv2.findContours(lesion.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        perimeter = sum(cv2.arcLength(contour, True) for contour in contours)
        compactness = perimeter**2 / (4 * np.pi * max(lesion.sum(), 1))
        asymmetry = (np.logical_xor(lesion, lesion[::-1]).mean() + np.logical_xor(lesion, lesion[:, ::-1]).mean()) / 2
        features += [area, compactness, asymmetry, len(contours), gray.std()]
        rows.append(features)
    return np.asarray(rows, dtype=np.float32)


def has_baseline_metadata(frame: pd.DataFrame) -> bool:
    return all(column in frame.columns for column in ("sex", "age_approx", SITE_COLUMN))


def baseline_aucs(
    train_rows: pd.DataFrame,
    valid_rows: pd.DataFrame,
    seed: int = 0,
    train_stats: np.ndarray | None = None,
    valid_stats: np.ndarray | None = None,
) -> dict[str, float]:
    """Validation AUC of the two baselines, fitted on `train_rows` only. Image statistics may be passed in when
    already computed (they do not depend on the fold)."""
    result = {}
    use_meta = has_baseline_metadata(train_rows)
    if use_meta:
        encoder = MetaEncoder(BASELINE_META_FEATURES).fit(train_rows)
        train_meta, valid_meta = encoder.transform(train_rows), encoder.transform(valid_rows)
        logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        logistic.fit(train_meta, train_rows["target"])
        result["baseline_meta_logreg_auc"] = safe_auc(valid_rows["target"], logistic.predict_proba(valid_meta)[:, 1])
    if train_stats is None:
        train_stats = image_statistics(list(train_rows["filepath"]))
    if valid_stats is None:
        valid_stats = image_statistics(list(valid_rows["filepath"]))
    if use_meta:
        train_stats = np.concatenate([train_stats, train_meta], axis=1)
        valid_stats = np.concatenate([valid_stats, valid_meta], axis=1)
    boosting = HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.05, max_leaf_nodes=15, l2_regularization=1.0, random_state=seed
    )
    boosting.fit(train_stats, train_rows["target"])
    name = "baseline_stats_meta_gbm_auc" if use_meta else "baseline_stats_gbm_auc"
    result[name] = safe_auc(valid_rows["target"], boosting.predict_proba(valid_stats)[:, 1])
    return result
