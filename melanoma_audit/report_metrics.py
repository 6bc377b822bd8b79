"""The numbers of an evaluation report (evaluate.py): ROC AUC with a bootstrap interval over patients, partial AUC
above 80 % sensitivity, average precision, the metrics at a chosen threshold and at the one that keeps 90 %
sensitivity, and calibration (Brier score, expected calibration error, reliability bins)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from melanoma_audit.metrics import binary_metrics
from melanoma_audit.patients import patient_groups

MIN_TPR = 0.8
TARGET_SENSITIVITY = 0.9
CALIBRATION_BINS = 10
IN_SAMPLE = "the reported rows (in-sample, optimistic)"


def partial_auc_above_tpr(targets: np.ndarray, probs: np.ndarray, min_tpr: float = MIN_TPR) -> float:
    """Area under the ROC curve above the line TPR = min_tpr (the ISIC 2024 metric): 0.2 for a perfect model,
    0.02 for chance at min_tpr 0.8. With the classes swapped and the scores negated that area lies left of
    FPR = 1 - min_tpr, which roc_auc_score(max_fpr=...) measures, McClish-standardised: undone here."""
    max_fpr = 1.0 - min_tpr
    standardised = roc_auc_score(1 - np.asarray(targets), -np.asarray(probs), max_fpr=max_fpr)
    min_area = max_fpr**2 / 2  # the chance diagonal's area left of max_fpr; max_fpr itself is a perfect model's
    return float(min_area + (2 * standardised - 1) * (max_fpr - min_area))


def group_bootstrap(
    statistic: Callable[[np.ndarray], float], n_rows: int, n: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """statistic(weight) over `n` resamples (with replacement) of the patients, `groups` holding one patient label
    per row (all rows of a patient are drawn together), or of the rows (None). `weight` says how often each row was
    drawn: a patient drawn k times weighs k, its rows gathered k times without copying them. Resamples whose
    statistic is NaN (e.g. an AUC of one class) are left out; empty when there is nothing to resample."""
    codes = pd.factorize(np.arange(n_rows) if groups is None else np.asarray(groups))[0]
    n_groups = int(codes.max()) + 1 if n_rows else 0
    if n < 1 or n_groups < 2:  # nothing to resample
        return np.array([])

    def resampled(drawn: np.ndarray) -> float:
        return statistic(np.bincount(drawn, minlength=n_groups)[codes])

    with warnings.catch_warnings():
        # scipy's own interval turns NaN once a single resample has no value (tiny sets): the percentiles are
        # taken over the resamples that have one, as this interval always was
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        result = scipy.stats.bootstrap(
            (np.arange(n_groups),),  # the patients are the sample: resampling them is the cluster bootstrap
            resampled,
            n_resamples=n,
            vectorized=False,
            batch=100,  # bounds the (batch, patients) array of drawn indices
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    values = result.bootstrap_distribution
    return values[~np.isnan(values)]


def percentile_interval(values: np.ndarray) -> list[float]:
    """The 95 % percentile interval of a bootstrap distribution; NaN for an empty one."""
    if values.size == 0:
        return [math.nan, math.nan]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def weighted_auc(targets: np.ndarray, scores: np.ndarray, weight: np.ndarray) -> float:
    """ROC AUC with rows weighted (a resample's draw counts); NaN when the weighted rows hold one class."""
    if not (weight[targets == 1].any() and weight[targets == 0].any()):
        return math.nan
    return float(roc_auc_score(targets, scores, sample_weight=weight))


def bootstrap_auc(
    targets: np.ndarray, probs: np.ndarray, n: int, seed: int, groups: np.ndarray | None = None
) -> list[float]:
    """Percentile 95 % interval of the ROC AUC over `n` resamples (with replacement) of the patients, `groups`
    holding one patient label per row (all rows of a patient are drawn together), or of the images (None)."""
    targets, probs = np.asarray(targets), np.asarray(probs)
    aucs = group_bootstrap(lambda weight: weighted_auc(targets, probs, weight), len(targets), n, seed, groups)
    return percentile_interval(aucs)


def calibration(targets: np.ndarray, probs: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict:
    """Brier score, expected calibration error (ECE) and the reliability curve over n_bins equal-width bins."""
    frac_positive, mean_predicted = calibration_curve(targets, probs, n_bins=n_bins, strategy="uniform")
    # calibration_curve gives the non-empty bins' fractions but not how many images each holds, which ECE weights
    # them by (sklearn has no ECE): count them with calibration_curve's own binning, searchsorted on inner edges
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], probs), minlength=n_bins)
    counts = counts[counts > 0]
    return {
        "brier": float(brier_score_loss(targets, probs)),
        "ece": float(np.sum(counts * np.abs(frac_positive - mean_predicted)) / counts.sum()),
        "n_bins": n_bins,
        "bins": [
            {"mean_predicted": float(m), "fraction_melanoma": float(f), "images": int(c)}
            for m, f, c in zip(mean_predicted, frac_positive, counts, strict=True)
        ],
    }


def threshold_for_sensitivity(targets: np.ndarray, probs: np.ndarray, sensitivity: float) -> float:
    """The highest threshold that still flags at least `sensitivity` of the melanomas."""
    positives = np.sort(probs[targets == 1])[::-1]
    return float(positives[math.ceil(sensitivity * len(positives)) - 1])


def confusion(targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, int]:
    predicted = probs >= threshold
    return {
        "tn": int(np.sum(~predicted & (targets == 0))),
        "fp": int(np.sum(predicted & (targets == 0))),
        "fn": int(np.sum(~predicted & (targets == 1))),
        "tp": int(np.sum(predicted & (targets == 1))),
    }


def bootstrap_groups(frame: pd.DataFrame) -> np.ndarray | None:
    """The patient of each row for bootstrap_auc where the frame has patient ids (a row without one is a patient
    of its own), else None: the images are resampled."""
    if "patient_id" in frame.columns and frame["patient_id"].notna().any():
        return patient_groups(frame)
    return None


def compute_metrics(
    frame: pd.DataFrame,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    fit: pd.DataFrame | None = None,
    fitted_on: str = IN_SAMPLE,
) -> dict:
    """The metrics of `frame` (image_name, target, prob, optional patient_id). The 90 %-sensitivity threshold is
    fitted on `fit` (other rows, described by `fitted_on`), or on `frame` itself when fit is None."""
    targets, probs = frame["target"].to_numpy(), frame["prob"].to_numpy()
    at_threshold = binary_metrics(targets, probs, threshold)
    fit = frame if fit is None else fit
    sens_threshold = threshold_for_sensitivity(fit["target"].to_numpy(), fit["prob"].to_numpy(), TARGET_SENSITIVITY)
    at_sensitivity = binary_metrics(targets, probs, sens_threshold)
    groups = bootstrap_groups(frame)
    by_patient = groups is not None
    return {
        "n_images": len(frame),
        "n_melanoma": int(targets.sum()),
        "roc_auc": at_threshold["auc"],
        "roc_auc_ci95": bootstrap_auc(targets, probs, n_bootstrap, seed, groups),
        "n_bootstrap": n_bootstrap,
        "bootstrap_unit": "patient" if by_patient else "image",
        "n_bootstrap_units": len(set(groups)) if by_patient else len(frame),
        "pauc_above_80_tpr": partial_auc_above_tpr(targets, probs),
        "average_precision": float(average_precision_score(targets, probs)),
        "calibration": calibration(targets, probs),
        "at_threshold": {
            "threshold": threshold,
            **{key: at_threshold[key] for key in ("acc", "balanced_acc", "sensitivity", "specificity")},
            "confusion_matrix": confusion(targets, probs, threshold),
        },
        "at_90_sensitivity": {
            "threshold": sens_threshold,
            "threshold_fitted_on": fitted_on,
            **{key: at_sensitivity[key] for key in ("acc", "balanced_acc", "sensitivity", "specificity")},
            "confusion_matrix": confusion(targets, probs, sens_threshold),
        },
    }


def data_summary(frame: pd.DataFrame) -> dict:
    """What the report was computed on: images, melanomas, patients (where ids exist) and, for out-of-fold
    predictions (a fold column), each fold's images, melanomas and AUC."""
    summary = {
        "images": len(frame),
        "melanoma": int(frame["target"].sum()),
        "benign": int((frame["target"] == 0).sum()),
    }
    if "patient_id" in frame.columns:
        summary["patients"] = int(frame["patient_id"].nunique())
        summary["images_without_patient_id"] = int(frame["patient_id"].isna().sum())
    if "fold" in frame.columns:
        summary["folds"] = [
            {
                "fold": fold if isinstance(fold, str) else int(fold),
                "images": len(rows),
                "melanoma": int(rows["target"].sum()),
                "auc": binary_metrics(rows["target"].to_numpy(), rows["prob"].to_numpy())["auc"],
            }
            for fold, rows in frame.groupby("fold", sort=True)
        ]
    return summary


def json_ready(value: object) -> object:
    """NaN is not JSON: write null instead."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
