"""Patients in a table: images per patient, the group label of each row, and patient-grouped folds. A row without
patient_id is a patient of its own."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from utils import UserError


def images_per_patient(frame: pd.DataFrame) -> np.ndarray:
    """Counts each patient's images within `frame`; a row without patient_id counts 1 (its own patient),
    so that unlabelled external images do not pool into one giant "patient" that leaks the label."""
    if "patient_id" not in frame.columns:
        return np.ones(len(frame))
    patient = frame["patient_id"].astype("string")
    counts = patient.map(patient.value_counts())
    return counts.astype(float).fillna(1.0).to_numpy()


def patient_groups(frame: pd.DataFrame) -> np.ndarray:
    """Group label per row: its patient_id, or a unique label for a row without one."""
    if "patient_id" not in frame.columns:
        return np.array([f"row-{i}" for i in range(len(frame))])
    patient = frame["patient_id"].astype("string")
    return np.array([f"row-{i}" if pd.isna(value) else f"pid-{value}" for i, value in enumerate(patient)])


def make_folds(frame: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row: stratified by target, grouped by patient (no patient on both sides)."""
    groups = patient_groups(frame)
    n_groups = len(set(groups))
    if n_folds < 2 or n_groups < n_folds:
        raise UserError(f"--n-folds {n_folds} needs at least 2 folds and as many patients ({n_groups} here).")
    largest_class = int(frame["target"].value_counts().max())
    if largest_class < n_folds:  # StratifiedGroupKFold needs one class with an image in every fold
        raise UserError(
            f"--n-folds {n_folds} needs at least {n_folds} images of one class, the largest class has "
            f"{largest_class}: use fewer folds or add images."
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(frame), -1, dtype=int)
    with warnings.catch_warnings():
        # "the least populated class has only N members": a fold without one class is refused in one sentence
        # where it matters (train.py's validation fold), not in a library warning ahead of it
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for fold, (_, valid_index) in enumerate(splitter.split(np.zeros(len(frame)), frame["target"], groups)):
            folds[valid_index] = fold
    return folds
