"""Trivial baselines that every melanoma run is compared with, fitted on the same training fold:

- metadata only (sex, age, site), logistic regression;
- colour and shape statistics of the image plus that metadata, gradient boosting.

A network that does not beat them has learned nothing the data did not give away for free.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from melanoma_audit.features import colour_statistics
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.metrics import safe_auc
from melanoma_audit.tables import SITE_COLUMN

BASELINE_META_FEATURES = ("sex", "age", "site")


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
        train_stats = colour_statistics(list(train_rows["filepath"]))
    if valid_stats is None:
        valid_stats = colour_statistics(list(valid_rows["filepath"]))
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
