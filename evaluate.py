"""Evaluate melanoma predictions against labels: a report folder of metrics, plots and Grad-CAM overlays.

    python evaluate.py --pred logs/oof_r1.csv --out-dir reports/r1
    python evaluate.py --pred submission.csv --labels data/train.csv --out-dir reports/sub --threshold 0.3
    python evaluate.py --pred logs/oof_r1.csv --out-dir reports/r1 --cam 8 \
        --model-path weights/r1_best.pth --data-dir ./melanoma_external_256/
    python evaluate.py --pred test_pred.csv --labels test_labels.csv --threshold-from logs/oof_r1.csv \
        --out-dir reports/test    # the 90 %-sensitivity threshold fitted on other rows than those reported

--pred (alias --oof) takes the out-of-fold CSV of train.py (image_name, fold, target, prob) or any CSV with
image_name and a probability: `prob` beside a 0/1 `target`, or a predict.py output whose `target` is the score,
then with the 0/1 labels from --labels CSV (image_name, target). --threshold-from takes a CSV of either kind, e.g.
the OOF file of the run, to fit thresholds on other rows than the reported ones. The report folder gets:

    metrics.json          ROC AUC with a bootstrap 95 % interval (resampling patients where patient ids exist:
                          a patient_id column of --pred or --labels, else of --data-dir's train.csv; a row without
                          one is a patient of its own; else images), partial AUC above 80 % TPR (0.02 is chance,
                          0.2 perfect), average precision, balanced accuracy, sensitivity and specificity at
                          --threshold and at the threshold that keeps 90 % sensitivity (threshold_fitted_on says on
                          which rows: in-sample, optimistic, unless --threshold-from), the confusion matrix, and
                          calibration: Brier score, expected calibration error over 10 equal-width bins, the bins
    roc.png, pr.png       ROC and precision-recall curves
    confusion_matrix.png  counts at --threshold
    reliability.png       reliability diagram: fraction of melanoma against mean P(melanoma) per bin, and counts
    training_curves.png   loss and AUC per epoch from train.py's metrics_<run>.jsonl (--metrics-log, found
                          beside an oof_<run>.csv by itself)
    cam/                  with --cam N: Grad-CAM of the last conv block for the N most confident correct and the
                          N most wrong images (needs --model-path and --data-dir, where the images are)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display needed

import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    average_precision_score,
    brier_score_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from dataset import patient_groups, read_csv, read_image, read_melanoma_table  # noqa: E402
from inference import LoadedModel, load_melanoma_model, make_dataset, require_metadata  # noqa: E402
from predict import add_runtime_args, prepare_runtime  # noqa: E402
from utils import (  # noqa: E402
    UserError,
    atomic_path,
    binary_metrics,
    ensure_writable_dir,
    exit_on_user_error,
    write_text_atomic,
)

MIN_TPR = 0.8
TARGET_SENSITIVITY = 0.9
CALIBRATION_BINS = 10
IN_SAMPLE = "the reported rows (in-sample, optimistic)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", "--oof", required=True, help="predictions CSV (train.py OOF or predict.py output)")
    parser.add_argument("--labels", help="CSV with image_name and 0/1 target, for predictions without a prob column")
    parser.add_argument("--out-dir", required=True, help="report folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="decision threshold on P(melanoma)")
    parser.add_argument(
        "--threshold-from",
        metavar="PATH",
        help="predictions CSV (as --pred) of other rows, on which the 90%%-sensitivity threshold is fitted",
    )
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="resamples for the AUC interval")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--metrics-log", nargs="+", help="train.py metrics_<run>.jsonl file(s) for the curves")
    parser.add_argument("--cam", type=int, default=0, metavar="N", help="Grad-CAM overlays of N+N images")
    parser.add_argument("--model-path", help="with --cam: the checkpoint that made the predictions")
    parser.add_argument("--data-dir", help="Kaggle-layout folder: the images for --cam, patient ids from its train.csv")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="with --cam: image folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier report")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.cam and not (args.model_path and args.data_dir):
        parser.error("--cam needs --model-path and --data-dir")
    return args


# --------------------------------------------------------------------------- inputs


def read_predictions(pred_path: Path, labels_path: Path | None, flag: str = "--pred") -> pd.DataFrame:
    """image_name, target (0/1), prob and, where the CSVs have one, patient_id, from an OOF CSV or from scores
    joined with a labels CSV. `flag` names the option that gave pred_path, for the error messages."""
    if not pred_path.is_file():
        raise UserError(f"predictions file {pred_path} does not exist: check {flag}.")
    pred = read_csv(pred_path)
    if "image_name" not in pred.columns:
        raise UserError(f"{pred_path} lacks the column image_name: use train.py's OOF CSV or predict.py's output.")
    patient = ["patient_id"] if "patient_id" in pred.columns else []
    if "prob" in pred.columns and "target" in pred.columns:  # labels of its own: --labels is for the others
        frame = pred[["image_name", "target", "prob", *patient]]
        label_source = pred_path
    else:
        score = "prob" if "prob" in pred.columns else "target"
        if score not in pred.columns:
            raise UserError(f"{pred_path} has no prob or target column: it needs a score per image.")
        if labels_path is None:
            raise UserError(
                f"{pred_path} holds scores but no labels: pass --labels with a CSV of image_name and 0/1 target."
            )
        if not labels_path.is_file():
            raise UserError(f"labels file {labels_path} does not exist: check --labels.")
        labels = read_csv(labels_path)
        if not {"image_name", "target"} <= set(labels.columns):
            raise UserError(f"{labels_path} lacks image_name or target: the labels need both columns.")
        frame = pred[["image_name", score, *patient]].rename(columns={score: "prob"})
        label_patient = ["patient_id"] if "patient_id" in labels.columns and not patient else []
        frame = frame.merge(labels[["image_name", "target", *label_patient]], on="image_name", how="left")
        unlabelled = frame["target"].isna()
        if unlabelled.any():
            raise UserError(
                f"{labels_path} has no label for {int(unlabelled.sum())} image(s) of {pred_path}, first "
                f"{frame['image_name'][unlabelled].iloc[0]}: give labels for every predicted image."
            )
        label_source = labels_path
    frame = frame.reset_index(drop=True)
    target = pd.to_numeric(frame["target"], errors="coerce")
    if not target.isin([0, 1]).all():
        bad = frame["target"][~target.isin([0, 1])].iloc[0]
        raise UserError(f"{label_source} has target {bad!r}: labels must be 0 or 1.")
    prob = pd.to_numeric(frame["prob"], errors="coerce")
    if prob.isna().any() or not np.isfinite(prob).all():
        raise UserError(f"{pred_path} has a score that is not a finite number: re-run the prediction.")
    if not prob.between(0, 1).all():
        raise UserError(
            f"{pred_path} has a score of {prob[~prob.between(0, 1)].iloc[0]}, outside 0..1: give P(melanoma), "
            "not logits."
        )
    if target.nunique() < 2:
        raise UserError(f"{label_source} holds only target {int(target.iloc[0])}: AUC needs images of both classes.")
    return frame.assign(target=target.astype(int), prob=prob.astype(float))


def attach_patients(frame: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """Adds patient_id from the data folder's train.csv, when it has one, for the patient bootstrap; an image it
    does not list gets none (a patient of its own)."""
    path = data_dir / "train.csv"
    if not path.is_file():
        return frame
    table = read_csv(path)
    if "patient_id" not in table.columns:
        return frame
    return frame.merge(table[["image_name", "patient_id"]].drop_duplicates("image_name"), on="image_name", how="left")


def find_metrics_logs(pred_path: Path) -> list[Path]:
    """train.py writes oof_<run>.csv beside metrics_<run>.jsonl (or metrics_<run>_fold<k>.jsonl per fold)."""
    match = re.fullmatch(r"oof_(.+)\.csv", pred_path.name)
    if not match:
        return []
    run = match.group(1)
    single = pred_path.parent / f"metrics_{run}.jsonl"
    return [single] if single.is_file() else sorted(pred_path.parent.glob(f"metrics_{run}_fold*.jsonl"))


def read_metrics_logs(paths: list[Path]) -> pd.DataFrame:
    records = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"metrics log {path} does not exist: check --metrics-log.")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON: pass train.py's metrics_<run>.jsonl.") from None
            if not isinstance(record, dict) or "epoch" not in record:
                raise UserError(f"{path} line {number} has no epoch: pass train.py's metrics_<run>.jsonl.")
            records.append({"fold": record.get("fold", 0), **record})
    return pd.DataFrame(records)


# --------------------------------------------------------------------------- metrics


def partial_auc_above_tpr(targets: np.ndarray, probs: np.ndarray, min_tpr: float = MIN_TPR) -> float:
    """Area under the ROC curve above the line TPR = min_tpr (the ISIC 2024 metric): 0.2 for a perfect model,
    0.02 for chance at min_tpr 0.8. With the classes swapped and the scores negated that area lies left of
    FPR = 1 - min_tpr, which roc_auc_score(max_fpr=...) measures, McClish-standardised: undone here."""
    max_fpr = 1.0 - min_tpr
    standardised = roc_auc_score(1 - np.asarray(targets), -np.asarray(probs), max_fpr=max_fpr)
    min_area = max_fpr**2 / 2  # the chance diagonal's area left of max_fpr; max_fpr itself is a perfect model's
    return float(min_area + (2 * standardised - 1) * (max_fpr - min_area))


def bootstrap_auc(
    targets: np.ndarray, probs: np.ndarray, n: int, seed: int, groups: np.ndarray | None = None
) -> list[float]:
    """Percentile 95 % interval of the ROC AUC over `n` resamples (with replacement) of the patients, `groups`
    holding one patient label per row (all rows of a patient are drawn together), or of the images (None)."""
    targets, probs = np.asarray(targets), np.asarray(probs)
    codes = pd.factorize(np.arange(len(targets)) if groups is None else np.asarray(groups))[0]
    n_groups = int(codes.max()) + 1
    if n < 1 or n_groups < 2:  # nothing to resample
        return [math.nan, math.nan]

    def resampled_auc(drawn: np.ndarray) -> float:
        # a patient drawn k times weighs k: the AUC of its rows gathered k times, without copying them
        weight = np.bincount(drawn, minlength=n_groups)[codes]
        if not (weight[targets == 1].any() and weight[targets == 0].any()):
            return math.nan  # a resample of one class has no AUC
        return float(roc_auc_score(targets, probs, sample_weight=weight))

    with warnings.catch_warnings():
        # scipy's own interval turns NaN once a single resample has no AUC (tiny sets): the percentiles below
        # are taken over the resamples that have one, as this interval always was
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        result = scipy.stats.bootstrap(
            (np.arange(n_groups),),  # the patients are the sample: resampling them is the cluster bootstrap
            resampled_auc,
            n_resamples=n,
            vectorized=False,
            batch=100,  # bounds the (batch, patients) array of drawn indices
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    aucs = result.bootstrap_distribution[~np.isnan(result.bootstrap_distribution)]
    if aucs.size == 0:
        return [math.nan, math.nan]
    return [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]


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
    by_patient = "patient_id" in frame.columns and frame["patient_id"].notna().any()
    groups = patient_groups(frame) if by_patient else None
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


def json_ready(value):
    """NaN is not JSON: write null instead."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- plots


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
    counts.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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


# --------------------------------------------------------------------------- Grad-CAM


def grad_cam(
    model: torch.nn.Module, image: torch.Tensor, meta: torch.Tensor | None, explain_melanoma: torch.Tensor
) -> np.ndarray:
    """Grad-CAM on the output of the backbone's last conv block (_conv_head + _bn1): the activations weighted by
    the spatial mean of their gradients, ReLU, scaled to [0, 1] per image. explain_melanoma (bool per image)
    picks the class whose score is explained: melanoma, or benign (the negated melanoma score)."""
    captured: list[torch.Tensor] = []
    handle = model.enet._bn1.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(image.requires_grad_(True), meta).float()
            if logits.shape[1] == 1:
                score = torch.where(explain_melanoma, logits[:, 0], -logits[:, 0])
            else:
                score = logits.gather(1, explain_melanoma.long()[:, None])[:, 0]
            (gradients,) = torch.autograd.grad(score.sum(), captured[-1])
    finally:
        handle.remove()
    activations = captured[-1].detach().float()
    cam = torch.relu((gradients.float().mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1))
    peak = cam.flatten(1).max(dim=1).values[:, None, None]
    cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, 1.0), 0.0)  # gradients can be tiny: no epsilon
    return cam.cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """Heat map (jet) over the image, both RGB uint8 at the image's size; the colour is laid on in proportion to
    the heat, so that the regions that did not matter keep their own look."""
    heat = cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    colored = plt.get_cmap("jet")(heat)[..., :3] * 255
    weight = 0.6 * heat[..., None]
    return ((1 - weight) * image + weight * colored).clip(0, 255).astype(np.uint8)


def select_cam_images(frame: pd.DataFrame, threshold: float, n: int) -> pd.DataFrame:
    """The n most confident correct and the n most wrong predictions, with a group and rank."""
    predicted = (frame["prob"] >= threshold).astype(int)
    correct = predicted == frame["target"]
    confidence = np.maximum(frame["prob"], 1 - frame["prob"])
    error = (frame["target"] - frame["prob"]).abs()
    confident = frame[correct].assign(key=confidence[correct]).nlargest(n, "key").assign(group="confident")
    wrong = frame[~correct].assign(key=error[~correct]).nlargest(n, "key").assign(group="wrong")
    chosen = pd.concat([confident, wrong], ignore_index=True)
    chosen["rank"] = chosen.groupby("group").cumcount() + 1
    chosen["explain_melanoma"] = chosen["prob"] >= threshold
    return chosen.drop(columns="key")


def write_cams(
    loaded: LoadedModel, chosen: pd.DataFrame, table: pd.DataFrame, cam_dir: Path, device: torch.device
) -> list[Path]:
    """Grad-CAM overlays (image | overlay) for the chosen rows; `table` is the data folder's CSV (filepath and
    metadata), encoded as a whole as in training."""
    table = table.set_index("image_name", drop=False)
    absent = [name for name in chosen["image_name"] if name not in table.index]
    if absent:
        raise UserError(f"image {absent[0]} of the predictions is not in the --data-dir CSV: pass the right folder.")
    dataset = make_dataset(loaded, table)
    side = -(-loaded.image_size // 32)  # the last conv block has a stride of 32 (padded: rounded up)
    if side < 4:
        print(
            f"notice: at {loaded.image_size} px the last conv map is {side}x{side}: the heat maps can only point at "
            "coarse regions (train at 128 px or more for finer ones).",
            flush=True,
        )
    position = {name: i for i, name in enumerate(table["image_name"])}
    for stale in [*cam_dir.glob("confident_*.png"), *cam_dir.glob("wrong_*.png")]:  # from the report replaced
        stale.unlink()
    written = []
    for row in chosen.itertuples(index=False):
        item = dataset[position[row.image_name]]
        meta = item["meta"][None].to(device) if "meta" in item else None
        explain = torch.tensor([bool(row.explain_melanoma)], device=device)
        cam = grad_cam(loaded.model, item["image"][None].to(device), meta, explain)[0]
        image = read_image(table.loc[row.image_name, "filepath"])
        figure, axes = plt.subplots(1, 2, figsize=(7, 3.8))
        axes[0].imshow(image)
        axes[1].imshow(overlay(image, cam))
        for axis in axes:
            axis.axis("off")
        explained = "melanoma" if row.explain_melanoma else "benign"
        figure.suptitle(
            f"{row.image_name}  P(melanoma) {row.prob:.3f}  label {'melanoma' if row.target else 'benign'}\n"
            f"{row.group} #{row.rank}: Grad-CAM of the '{explained}' score",
            fontsize=9,
        )
        path = cam_dir / f"{row.group}_{row.rank:02d}_{row.image_name}.png"
        save_figure(figure, path)
        written.append(path)
    return written


# --------------------------------------------------------------------------- main


def check_report_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"report folder {out_dir} is not empty: pass --overwrite to replace it, or choose another.")
    ensure_writable_dir(out_dir, "report folder (--out-dir)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        out_dir = Path(args.out_dir)
        pred_path = Path(args.pred)
        labels_path = Path(args.labels) if args.labels else None
        frame = read_predictions(pred_path, labels_path)
        if "patient_id" not in frame.columns and args.data_dir:
            frame = attach_patients(frame, Path(args.data_dir))
        fit, fitted_on = None, IN_SAMPLE
        if args.threshold_from:
            fit = read_predictions(Path(args.threshold_from), labels_path, "--threshold-from")
            fitted_on = args.threshold_from
            shared = np.intersect1d(fit["image_name"], frame["image_name"])
            if shared.size:
                raise UserError(
                    f"{args.threshold_from} and {pred_path} share {shared.size} image(s), first {shared[0]}: fit the "
                    "threshold on other images than the reported ones."
                )
        if not 0.0 <= args.threshold <= 1.0:
            raise UserError(f"--threshold {args.threshold} is outside 0..1: it applies to P(melanoma).")
        log_paths = [Path(p) for p in args.metrics_log] if args.metrics_log else find_metrics_logs(pred_path)
        history = read_metrics_logs(log_paths) if log_paths else None
        check_report_dir(out_dir, args.overwrite)

        metrics = compute_metrics(frame, args.threshold, args.n_bootstrap, args.seed, fit, fitted_on)
        metrics = {"predictions": str(pred_path), **metrics}
        write_text_atomic(out_dir / "metrics.json", json.dumps(json_ready(metrics), indent=2) + "\n")
        plot_roc(frame, metrics, out_dir / "roc.png")
        plot_pr(frame, metrics, out_dir / "pr.png")
        plot_confusion(metrics["at_threshold"]["confusion_matrix"], args.threshold, out_dir / "confusion_matrix.png")
        plot_reliability(metrics["calibration"], out_dir / "reliability.png")
        written = ["metrics.json", "roc.png", "pr.png", "confusion_matrix.png", "reliability.png"]
        if history is not None and not history.empty:
            plot_training_curves(history, out_dir / "training_curves.png")
            written.append("training_curves.png")
        if args.cam > 0:
            device, _ = prepare_runtime(args)
            loaded = load_melanoma_model(args.model_path, device)
            table = read_melanoma_table(args.data_dir, args.split, use_meta=False, require_target=False)
            require_metadata(table, [loaded], allow_missing=False, source=f"the {args.split} CSV of {args.data_dir}")
            chosen = select_cam_images(frame, args.threshold, args.cam)
            cams = write_cams(loaded, chosen, table, out_dir / "cam", device)
            written.append(f"cam/ ({len(cams)} overlays)")

        low, high = metrics["roc_auc_ci95"]
        at, at90, calibrated = metrics["at_threshold"], metrics["at_90_sensitivity"], metrics["calibration"]
        print(
            f"{metrics['n_images']} images ({metrics['n_melanoma']} melanoma): ROC AUC {metrics['roc_auc']:.4f} "
            f"(95% CI {low:.4f}-{high:.4f} over {metrics['n_bootstrap_units']} {metrics['bootstrap_unit']}s), "
            f"partial AUC above 80% TPR {metrics['pauc_above_80_tpr']:.4f}, average precision "
            f"{metrics['average_precision']:.4f}\n"
            f"  calibration: Brier {calibrated['brier']:.4f}, ECE {calibrated['ece']:.4f} ({calibrated['n_bins']} "
            "bins)\n"
            f"  at threshold {at['threshold']:.3f}: sensitivity {at['sensitivity']:.4f}, specificity "
            f"{at['specificity']:.4f}, balanced accuracy {at['balanced_acc']:.4f}\n"
            f"  at 90% sensitivity, threshold {at90['threshold']:.4f} fitted on {at90['threshold_fitted_on']}: "
            f"sensitivity {at90['sensitivity']:.4f}, specificity {at90['specificity']:.4f}\n"
            f"wrote {out_dir}: {', '.join(written)}",
            flush=True,
        )
        return metrics


if __name__ == "__main__":
    main()
