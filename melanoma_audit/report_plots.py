"""The figures of an evaluation report (evaluate.py): ROC and precision-recall curves, the confusion matrix, the
reliability diagram, the training curves and the AUC per subgroup, each written atomically as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from melanoma_audit.report_metrics import IN_SAMPLE, MIN_TPR  # noqa: E402
from utils import atomic_path  # noqa: E402


def save_figure(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_roc(frame: pd.DataFrame, metrics: dict, path: Path) -> None:
    targets, probs = frame["target"].to_numpy(), frame["prob"].to_numpy()
    fpr, tpr, _ = roc_curve(targets, probs)
    low, high = metrics["roc_auc_ci95"]
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.3f} (95% CI {low:.3f}-{high:.3f})")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    axis.axhline(MIN_TPR, color="grey", lw=0.5)
    axis.fill_between(fpr, MIN_TPR, tpr, where=tpr >= MIN_TPR, alpha=0.2, label="partial AUC above 80% TPR")
    fitted = "" if metrics["at_90_sensitivity"]["threshold_fitted_on"] == IN_SAMPLE else ", fitted on other rows"
    for key, marker, what in (("at_threshold", "o", "chosen"), ("at_90_sensitivity", "s", f"90% sensitivity{fitted}")):
        point = metrics[key]
        label = f"threshold {point['threshold']:.3f} ({what})"
        axis.plot(1 - point["specificity"], point["sensitivity"], marker, label=label)
    axis.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", title="ROC curve", xlim=(0, 1), ylim=(0, 1))
    # lower right, below the diagonal: empty for any model better than chance, and the plot keeps its full width
    axis.legend(loc="lower right", fontsize=8)
    save_figure(figure, path)


def plot_pr(frame: pd.DataFrame, metrics: dict, path: Path) -> None:
    targets, probs = frame["target"].to_numpy(), frame["prob"].to_numpy()
    precision, recall, _ = precision_recall_curve(targets, probs)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(recall, precision, label=f"average precision {metrics['average_precision']:.3f}")
    axis.axhline(targets.mean(), ls="--", color="grey", label=f"prevalence {targets.mean():.3f}")
    axis.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curve", xlim=(0, 1))
    axis.set_ylim(0, 1.02)
    axis.legend(loc="upper right", fontsize=8)
    save_figure(figure, path)


def plot_reliability(calibrated: dict, path: Path) -> None:
    bins = pd.DataFrame(calibrated["bins"])
    figure, (curve, counts) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    curve.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    label = f"Brier {calibrated['brier']:.4f}, ECE {calibrated['ece']:.4f}"
    curve.plot(bins["mean_predicted"], bins["fraction_melanoma"], "o-", label=label)
    curve.set(ylabel="fraction melanoma", title="Reliability diagram", xlim=(0, 1), ylim=(-0.02, 1.02))
    curve.legend(loc="upper left", fontsize=8)
    width = 1 / calibrated["n_bins"]
    counts.bar(bins["mean_predicted"], bins["images"], width=width * 0.8)
    counts.set(xlabel="mean P(melanoma) of the bin", ylabel="images")
    counts.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=3, integer=True))  # a short panel
    save_figure(figure, path)


def plot_confusion(matrix: dict[str, int], threshold: float, path: Path) -> None:
    counts = np.array([[matrix["tn"], matrix["fp"]], [matrix["fn"], matrix["tp"]]])
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.imshow(counts, cmap="Blues")
    for (row, col), count in np.ndenumerate(counts):
        color = "white" if count > counts.max() / 2 else "black"
        axis.text(col, row, str(count), ha="center", va="center", color=color, fontsize=14)
    axis.set_xticks([0, 1], ["benign", "melanoma"])
    axis.set_yticks([0, 1], ["benign", "melanoma"])
    axis.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix at threshold {threshold:.3f}")
    save_figure(figure, path)


def plot_training_curves(history: pd.DataFrame, path: Path) -> None:
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for fold, rows in history.groupby("fold"):
        rows = rows.sort_values("epoch")
        line = loss_axis.plot(rows["epoch"], rows["train_loss"], label=f"fold {fold} train")[0]
        loss_axis.plot(rows["epoch"], rows["valid_loss"], "--", color=line.get_color(), label=f"fold {fold} valid")
        auc_axis.plot(rows["epoch"], rows["auc"], marker="o", color=line.get_color(), label=f"fold {fold}")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Training and validation loss")
    auc_axis.set(xlabel="epoch", ylabel="validation ROC AUC", title="Validation AUC")
    for axis in (loss_axis, auc_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_axis.legend(fontsize=8)
    auc_axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_subgroups(subgroups: dict, overall_auc: float, path: Path) -> None:
    """Forest plot: each group's AUC and 95 % interval, one row per group under its --by name, against the
    overall AUC; a group too small for an AUC is named with its counts instead of a point."""
    rows = [(name, group) for name, entry in subgroups["by"].items() for group in entry["groups"]]
    lows = [group["auc_ci95"][0] for _, group in rows if group["auc"] is not None]
    lows = [low for low in lows if np.isfinite(low)]  # no interval without resamples (--n-bootstrap 0)
    left = min([0.4, *(low - 0.02 for low in lows)])
    figure, axis = plt.subplots(figsize=(7, 0.9 + 0.32 * len(rows)))
    for position, (name, group) in enumerate(rows):
        if position and name != rows[position - 1][0]:  # a line between the --by names
            axis.axhline(position - 0.5, color="#d0d7de", lw=0.8)
        if group["auc"] is None:
            counts = f"too few ({group['melanoma']} melanoma, {group['benign']} benign)"
            axis.text(left + 0.01, position, counts, va="center", fontsize=8, color="grey")
            continue
        low, high = group["auc_ci95"]
        axis.plot(group["auc"], position, "o", color="C0")
        if np.isfinite([low, high]).all():
            axis.hlines(position, low, high, color="C0")
    axis.axvline(overall_auc, color="C1", lw=1, label=f"all images {overall_auc:.3f}")
    axis.axvline(0.5, color="grey", ls="--", lw=1, label="chance")
    labels = [f"{name}: {group['group']} ({group['images']})" for name, group in rows]
    axis.set_yticks(range(len(rows)), labels, fontsize=8)
    axis.set_ylim(len(rows) - 0.5, -0.5)  # first group on top
    axis.set(xlabel="ROC AUC (95% CI)", title="AUC per subgroup (images in brackets)", xlim=(left, 1.0))
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the plot: never over a point
    save_figure(figure, path)
