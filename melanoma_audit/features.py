"""Hand-crafted lesion features: what a dermatologist's ABCD rule looks at (asymmetry, border, colours, size),
measured on an Otsu segmentation of the lesion, plus plain colour moments.

Two users:
- the trivial baseline (baselines.py) fits gradient boosting on `colour_statistics` plus metadata;
- `train.py --lesion-features` feeds `lesion_features` (standardised on the training fold) into the network's side
  branch next to the metadata: from random weights on a small data set the network learns these global cues
  slowly, and hand-crafted features carry them at once (docs/results.md).

Under a model's colour constancy (`preprocessing`, train.py --color-constancy) both are measured on the corrected
image, as the network sees it: the features' colours would otherwise carry the very illuminant the correction
removes from the pixels. Their geometry stays their own (a 128 px or 64 px square, stretched), whatever the
network's --resize-mode: a reflected border or a crop would change the segmentation of the lesion.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
import pandas as pd

from dataset import Preprocessing
from melanoma_audit.image_files import read_image
from melanoma_audit.metadata import MetaEncoder

STATS_SIZE = 64
SHAPE_SIZE = 128
# the six colours of the dermoscopic ABCD rule: white, red, light brown, dark brown, blue-grey, black (sRGB)
DERMOSCOPIC_COLOURS = {
    "white": (235, 235, 235),
    "red": (200, 60, 60),
    "light_brown": (170, 110, 70),
    "dark_brown": (100, 60, 40),
    "blue_grey": (100, 115, 140),
    "black": (30, 25, 25),
}
_COLOURS_LAB = cv2.cvtColor(np.array([list(DERMOSCOPIC_COLOURS.values())], dtype=np.uint8), cv2.COLOR_RGB2LAB)[0]


def _otsu_dark(gray: np.ndarray) -> np.ndarray:
    """Boolean mask of the darker Otsu class (lesions are darker than skin)."""
    _, mask = cv2.threshold(cv2.GaussianBlur(gray, (5, 5), 0), 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return mask.astype(bool)


def _central_square(size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return mask


def _square_image(path: str, size: int, preprocessing: Preprocessing | None) -> np.ndarray:
    """The file as RGB uint8, colour-corrected where `preprocessing` says, at size x size (INTER_AREA)."""
    image = read_image(path, size)
    if preprocessing is not None:
        image = preprocessing.correct_colour(image)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def colour_statistics(
    filepaths: Sequence[str], size: int = STATS_SIZE, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """Per image: colour moments of the whole image, of its darkest (lesion) part and of the rest, in RGB and
    HSV, plus the lesion's area, border irregularity and asymmetry from an Otsu mask. Cheap: ~1 ms an image."""
    rows = []
    for path in filepaths:
        rgb = _square_image(path, size, preprocessing)
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        lesion = _otsu_dark(gray)
        if lesion.sum() < 4 or (~lesion).sum() < 4:
            lesion = _central_square(size)
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


def _main_lesion(gray: np.ndarray) -> np.ndarray:
    """The dark connected region that is largest for its distance from the centre (hair and dark corners are
    thinner or off-centre), after removing specks; the central square when nothing usable is found."""
    size = gray.shape[0]
    dark = cv2.morphologyEx(_otsu_dark(gray).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(dark)
    if count > 1:
        distance = np.hypot(centroids[1:, 0] - size / 2, centroids[1:, 1] - size / 2)
        lesion = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA] / (1.0 + distance)))
        if lesion.sum() >= 16:
            return lesion
    return _central_square(size)


def _shape_features(lesion: np.ndarray, gray: np.ndarray) -> list[float]:
    """Area, border irregularity, solidity, elongation, asymmetry about the principal axes, border sharpness,
    and whether the lesion runs off the image."""
    size = lesion.shape[0]
    mask = lesion.astype(np.uint8)
    area = float(lesion.sum())
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    perimeter = cv2.arcLength(contour, True)
    hull_area = cv2.contourArea(cv2.convexHull(contour)) + 1.0
    moments = cv2.moments(mask)
    m00 = max(moments["m00"], 1.0)
    covariance = np.array([[moments["mu20"], moments["mu11"]], [moments["mu11"], moments["mu02"]]]) / m00
    minor, major = np.sort(np.linalg.eigvalsh(covariance))
    # rotate the principal axes onto the image axes, centred, then compare the mask with its mirror images
    cx, cy = moments["m10"] / m00, moments["m01"] / m00
    angle = 0.5 * np.degrees(np.arctan2(2 * moments["mu11"], moments["mu20"] - moments["mu02"]))
    rotation = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    rotation[:, 2] += (size / 2 - cx, size / 2 - cy)
    aligned = cv2.warpAffine(mask, rotation, (size, size), flags=cv2.INTER_NEAREST).astype(bool)
    asymmetry = sorted(np.logical_xor(aligned, flipped).sum() / area for flipped in (aligned[::-1], aligned[:, ::-1]))
    kernel = np.ones((3, 3), np.uint8)
    border = (cv2.dilate(mask, kernel) - cv2.erode(mask, kernel)).astype(bool)
    gradient = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, kernel)
    touches_edge = lesion[0].any() or lesion[-1].any() or lesion[:, 0].any() or lesion[:, -1].any()
    return [
        area / size**2,
        perimeter**2 / (4 * np.pi * area),
        area / hull_area,
        float(np.sqrt(max(minor, 0.0) / max(major, 1e-6))),
        *asymmetry,
        float(gradient[border].mean()) if border.any() else math.nan,  # no border: the mask fills the image
        float(cv2.Laplacian(gray, cv2.CV_32F)[lesion].var()),
        float(touches_edge),
    ]


def _colour_features(lab: np.ndarray, lesion: np.ndarray) -> list[float]:
    """Share of lesion pixels nearest each dermoscopic colour, how many colours are present, and the lesion's
    Lab moments and contrast with the surrounding skin."""
    inside = lab[lesion].astype(np.float32)
    outside = lab[~lesion].astype(np.float32) if (~lesion).sum() > 16 else lab.reshape(-1, 3).astype(np.float32)
    nearest = np.linalg.norm(inside[:, None, :] - _COLOURS_LAB[None].astype(np.float32), axis=2).argmin(1)
    shares = np.bincount(nearest, minlength=len(DERMOSCOPIC_COLOURS)) / len(inside)
    return [
        *shares,
        float((shares > 0.05).sum()),
        float((shares > 0.15).sum()),
        *inside.mean(0),
        *inside.std(0),
        *(inside.mean(0) - outside.mean(0)),
        *np.percentile(inside[:, 0], [5, 50, 95]),
    ]


def lesion_features(
    filepaths: Sequence[str], colour: np.ndarray | None = None, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """ABCD-rule features at 128 px, then the colour statistics at 64 px (`colour`, when already computed by the
    caller for the same files), then `lesion_unmeasurable`: 1 for an image without a lesion to measure, one of
    uniform colour (all black, all white) or where a measure is undefined. Such a row's ABCD features are NaN,
    for FeatureScaler to replace with the training fold's median: the flag tells the network that it did.
    About 3 ms an image on one core."""
    rows, unmeasurable = [], []
    for path in filepaths:
        rgb = _square_image(path, SHAPE_SIZE, preprocessing)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        lesion = _main_lesion(gray)
        row = _colour_features(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB), lesion) + _shape_features(lesion, gray)
        flat = gray.std() < 1.0  # nothing to segment: Otsu's split of a uniform image is arbitrary
        unmeasurable.append(flat or not np.isfinite(row).all())
        rows.append([math.nan] * len(row) if unmeasurable[-1] else row)
    abcd = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    colour = colour_statistics(filepaths, preprocessing=preprocessing) if colour is None else colour
    return np.concatenate([abcd, colour, np.asarray(unmeasurable, dtype=np.float32)[:, None]], axis=1)


class FeatureScaler:
    """Standardises features with the training fold's mean and spread; stored in the checkpoint so that
    prediction scales new images the same way. A value that is NaN or infinite (an unmeasurable lesion) first
    becomes the training fold's median of that feature, so the output is always finite."""

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        fill: Sequence[float] | None = None,
    ) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        # None: a scaler stored before lesion_features had its unmeasurable flag (the last column) and the fill
        self.fill = None if fill is None else np.asarray(fill, dtype=np.float32)

    def fit(self, features: np.ndarray) -> FeatureScaler:
        features = np.asarray(features, dtype=np.float64)
        features = np.where(np.isfinite(features), features, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a feature undefined on every training image
            fill = np.nan_to_num(np.nanmedian(features, axis=0))
        filled = np.where(np.isnan(features), fill, features)
        self.fill = fill.astype(np.float32)
        self.mean = filled.mean(axis=0).astype(np.float32)
        self.std = (filled.std(axis=0) + 1e-6).astype(np.float32)
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        fill = self.fill
        if fill is None:  # that model never saw the flag column; an undefined value becomes the mean (0 once scaled)
            features, fill = features[:, :-1], self.mean
        features = np.where(np.isfinite(features), features, fill)
        # clipped: one odd segmentation (a lesion filling the frame) must not saturate the branch
        return np.clip(np.nan_to_num((features - self.mean) / self.std), -6.0, 6.0).astype(np.float32)

    @property
    def n_features(self) -> int:
        return len(self.mean)

    def state_dict(self) -> dict:
        fill = None if self.fill is None else self.fill.tolist()
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "fill": fill}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureScaler:
        return cls(state["mean"], state["std"], state.get("fill"))


def side_inputs(
    frame: pd.DataFrame,
    encoder: MetaEncoder | None,
    scaler: FeatureScaler | None,
    lesion: np.ndarray | None = None,
    encoded: np.ndarray | None = None,
    preprocessing: Preprocessing | None = None,
) -> np.ndarray | None:
    """What the network's side branch reads for the rows of `frame`: the encoded metadata (encoder.transform of
    `frame` unless given as `encoded`), then the scaled lesion features (computed from frame["filepath"] under the
    model's `preprocessing` unless given). None when the model has neither."""
    parts = []
    if encoder is not None:
        parts.append(encoder.transform(frame) if encoded is None else encoded)
    if scaler is not None:
        if lesion is None:
            lesion = lesion_features(list(frame["filepath"]), preprocessing=preprocessing)
        parts.append(scaler.transform(lesion))
    return np.concatenate(parts, axis=1).astype(np.float32) if parts else None
