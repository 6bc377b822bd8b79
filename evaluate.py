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

The numbers come from report_metrics.py, the figures from report_plots.py, the Grad-CAM maps (captum's
LayerGradCam) from cam.py.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cam import CAM_GROUPS, select_cam_images, write_cams
from inference import load_melanoma_model, require_metadata
from predict import add_runtime_args, check_runtime_counts, prepare_runtime
from report_metrics import IN_SAMPLE, compute_metrics, json_ready
from report_plots import plot_confusion, plot_pr, plot_reliability, plot_roc, plot_training_curves
from tables import read_csv, read_melanoma_table
from utils import UserError, ensure_writable_dir, exit_on_user_error, temp_files_of, write_text_atomic

REPORT_FILES = ("metrics.json", "roc.png", "pr.png", "confusion_matrix.png", "reliability.png", "training_curves.png")


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
    parser.add_argument(
        "--allow-missing-meta",
        action="store_true",
        help="with --cam: encode absent metadata, and a sex or site the model was not trained with, as missing",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier report")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.cam > 0 and not (args.model_path and args.data_dir):
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
    refuse_repeated_images(pred, pred_path)
    if "rank_score" in pred.columns and not {"prob", "target"} & set(pred.columns):
        raise UserError(
            f"{pred_path} holds rank scores (predict.py --rank-average), not probabilities: evaluate the models' mean "
            "P(melanoma), predict.py without --rank-average."
        )
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
        refuse_repeated_images(labels, labels_path)
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
        bad = ~target.isin([0, 1])
        cell, name = frame["target"][bad].iloc[0], frame["image_name"][bad].iloc[0]
        has = "no target" if pd.isna(cell) else f"target {cell!r}"
        raise UserError(f"{label_source} has {has} for image {name}: labels must be 0 or 1.")
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


def refuse_repeated_images(table: pd.DataFrame, path: Path) -> None:
    """A repeated row would count its image twice (a repeated melanoma raises the average precision)."""
    repeated = table["image_name"][table["image_name"].duplicated()]
    if not repeated.empty:
        raise UserError(f"{path} lists image {repeated.iloc[0]} twice: keep one row per image.")


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


# --------------------------------------------------------------------------- main


def remove_leftovers(out_dir: Path) -> None:
    """Deletes the temporary files that a killed earlier report left in `out_dir` (atomic_path's
    .<name>.<random>.tmp beside each report file and Grad-CAM overlay): they are never a finished result."""
    leftovers = [path for name in REPORT_FILES for path in temp_files_of(out_dir / name)]
    leftovers += [path for group in CAM_GROUPS for path in (out_dir / "cam").glob(f".{group}_*.png.*.tmp")]
    for path in leftovers:
        path.unlink(missing_ok=True)


def check_report_dir(out_dir: Path, overwrite: bool) -> None:
    remove_leftovers(out_dir)  # first: a folder that holds only those is empty, not an earlier report
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"report folder {out_dir} is not empty: pass --overwrite to replace it, or choose another.")
    ensure_writable_dir(out_dir, "report folder (--out-dir)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with exit_on_user_error():
        for flag, value, least in (
            ("--n-bootstrap", args.n_bootstrap, 1),
            ("--seed", args.seed, 0),
            ("--cam", args.cam, 0),
        ):
            if value < least:
                raise UserError(f"{flag} {value} must be at least {least}.")
        check_runtime_counts(args)
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
            source = f"the {args.split} CSV of {args.data_dir}"
            require_metadata(table, [loaded], args.allow_missing_meta, source)
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
