"""Validation metrics: ROC AUC and the thresholded rates of the melanoma classifier, and the per-head table of the
artifact detector (AUC, average precision, F1 at a cut-off chosen for the highest F1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

HEAD_COLUMNS = ("auc", "ap", "f1", "precision", "recall", "acc", "threshold", "support", "positives")


def safe_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (it is undefined there)."""
    targets = np.asarray(targets)
    if targets.size == 0 or np.unique(targets).size < 2:
        return float("nan")
    return float(roc_auc_score(targets, scores))


def binary_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, ROC AUC, balanced accuracy, sensitivity and specificity at `threshold`."""
    targets = np.asarray(targets).astype(int)
    predicted = (np.asarray(probs) >= threshold).astype(int)
    positives, negatives = targets == 1, targets == 0
    sensitivity = float(predicted[positives].mean()) if positives.any() else float("nan")
    specificity = float((1 - predicted[negatives]).mean()) if negatives.any() else float("nan")
    return {
        "acc": float((predicted == targets).mean()) if targets.size else float("nan"),
        "auc": safe_auc(targets, probs),
        "balanced_acc": float(np.nanmean([sensitivity, specificity])),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def best_f1_threshold(targets: np.ndarray, probs: np.ndarray) -> float:
    """The probability cut-off with the highest F1 (predict positive when prob >= cut-off); 0.5 when the
    targets hold no positive, where F1 is undefined."""
    targets, probs = np.asarray(targets).astype(int), np.asarray(probs, dtype=float)
    if not (targets == 1).any():
        return 0.5
    precision, recall, thresholds = precision_recall_curve(targets, probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(thresholds[int(np.argmax(f1[:-1]))])


def head_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """One binary head: ROC AUC, average precision, F1, precision, recall and accuracy at `threshold`, and the
    support. Rows whose target is NaN (not annotated) are left out; a metric that is undefined for the rows
    left (AUC and AP without both classes) is NaN, and precision with no positive prediction is 0."""
    targets, probs = np.asarray(targets, dtype=float), np.asarray(probs, dtype=float)
    annotated = ~np.isnan(targets)
    targets, probs = targets[annotated].astype(int), probs[annotated]
    predicted = probs >= threshold
    true_pos = int((predicted & (targets == 1)).sum())
    n_pred, n_pos = int(predicted.sum()), int((targets == 1).sum())
    precision = true_pos / n_pred if n_pred else 0.0
    recall = true_pos / n_pos if n_pos else float("nan")
    f1 = 2 * true_pos / (n_pred + n_pos) if n_pred + n_pos else float("nan")
    has_both = 0 < n_pos < targets.size
    return {
        "auc": safe_auc(targets, probs),
        "ap": float(average_precision_score(targets, probs)) if has_both else float("nan"),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "acc": float((predicted == (targets == 1)).mean()) if targets.size else float("nan"),
        "threshold": float(threshold),
        "support": int(targets.size),
        "positives": n_pos,
    }


def choose_thresholds(targets: np.ndarray, probs: np.ndarray) -> list[float]:
    """Per head, the cut-off with the highest F1 on these (annotated) rows."""
    thresholds = []
    for head in range(targets.shape[1]):
        annotated = ~np.isnan(targets[:, head])
        thresholds.append(best_f1_threshold(targets[annotated, head], probs[annotated, head]))
    return thresholds


def metrics_table(heads: list[str], targets: np.ndarray, probs: np.ndarray, thresholds: list[float]) -> pd.DataFrame:
    """One row per head (blank targets left out), columns HEAD_COLUMNS."""
    rows = [{"head": head, **head_metrics(targets[:, i], probs[:, i], thresholds[i])} for i, head in enumerate(heads)]
    return pd.DataFrame(rows, columns=["head", *HEAD_COLUMNS])


def mean_auc(table: pd.DataFrame) -> float:
    """Mean ROC AUC over the heads where it is defined; NaN when it is defined for none."""
    aucs = table["auc"].dropna()
    return float(aucs.mean()) if len(aucs) else float("nan")


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda value: f"{value:.4f}", na_rep="-")
