"""Evaluate melanoma predictions against labels: a report folder of metrics, plots, Grad-CAM overlays and one HTML page.

    python evaluate.py --pred logs/oof_r1.csv --out-dir reports/r1
    python evaluate.py --pred submission.csv --labels data/train.csv --out-dir reports/sub --threshold 0.3
    python evaluate.py --pred logs/oof_r1.csv --out-dir reports/r1 --cam 8 \
        --model-path weights/r1_best.pth --data-dir ./melanoma_external_256/
    python evaluate.py --pred test_pred.csv --labels test_labels.csv --threshold-from logs/oof_r1.csv \
        --out-dir reports/test    # the 90 %-sensitivity threshold fitted on other rows than those reported
    python evaluate.py --pred logs/oof_r1.csv --out-dir reports/r1 --by sex,age,site \
        --data-dir ./melanoma_external_256/ --audit audit_r1.csv --model-path weights/r1_fold0_best.pth

--pred (alias --oof) takes the out-of-fold CSV of train.py (image_name, fold, target, prob) or any CSV with
image_name and a probability: `prob` beside a 0/1 `target`, or a predict.py output whose `target` is the score,
then with the 0/1 labels from --labels CSV (image_name, target). --threshold-from takes a CSV of either kind, e.g.
the OOF file of the run, to fit thresholds on other rows than the reported ones. --by scores subgroups of the
metadata CSV (--meta-csv, else --data-dir's train.csv, joined on image_name): sex, age (bands <30, 30-44, 45-59,
60-74, 75+ of age_approx), site (anatom_site_general_challenge) or any of its columns, a missing value (or an image
the CSV does not list) being the group `unknown`. The report folder gets:

    report.html           everything below on one self-contained page (figures embedded, no script, no external
                          link: opens offline in any browser), with the data summary (images, melanoma, patients,
                          folds), the --by and --audit tables and, with --model-path, the checkpoint's settings
    metrics.json          ROC AUC with a bootstrap 95 % interval (resampling patients where patient ids exist:
                          a patient_id column of --pred or --labels, else of the metadata CSV; a row without
                          one is a patient of its own; else images), partial AUC above 80 % TPR (0.02 is chance,
                          0.2 perfect), average precision, balanced accuracy, sensitivity and specificity at
                          --threshold and at the threshold that keeps 90 % sensitivity (threshold_fitted_on says on
                          which rows: in-sample, optimistic, unless --threshold-from), the confusion matrix, and
                          calibration: Brier score, expected calibration error over 10 equal-width bins, the bins;
                          `data` (the counts), `subgroups` with --by: per group its images, melanomas, sensitivity
                          and specificity at --threshold, and the AUC with the same bootstrap interval, null with a
                          note where the group has fewer than 5 melanomas or 5 benign images; `run` (--model-path)
    roc.png, pr.png       ROC and precision-recall curves
    confusion_matrix.png  counts at --threshold
    reliability.png       reliability diagram: fraction of melanoma against mean P(melanoma) per bin, and counts
    training_curves.png   loss and AUC per epoch from train.py's metrics_<run>.jsonl (--metrics-log, found
                          beside an oof_<run>.csv by itself)
    subgroups.png         with --by: each group's AUC and interval against that of all images
    cam/                  with --cam N: Grad-CAM of the last conv block for the N most confident correct and the
                          N most wrong images (needs --model-path and --data-dir, where the images are)

The numbers come from report_metrics.py and report_subgroups.py, the figures from report_plots.py, the page from
report_html.py, the Grad-CAM maps (captum's LayerGradCam) from cam.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.cam import CAM_GROUPS, select_cam_images, write_cams
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.cli import (
    ScoringRuntime,
    add_allow_missing_meta_flag,
    add_overwrite_flag,
    add_runtime_args,
    check_runtime_counts,
    claim_folder,
    prepare_runtime,
)
from melanoma_audit.inference import MelanomaPredictor
from melanoma_audit.report_html import build_report
from melanoma_audit.report_metrics import IN_SAMPLE, compute_metrics, data_summary, json_ready
from melanoma_audit.report_plots import (
    plot_confusion,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_subgroups,
    plot_training_curves,
)
from melanoma_audit.report_subgroups import Grouping, group_rows, parse_by, subgroup_report
from melanoma_audit.result_files import AUDIT_COLUMNS, attach_patients, read_metadata, read_predictions
from melanoma_audit.scoring_inputs import require_metadata
from melanoma_audit.tables import read_csv, read_melanoma_table
from utils import UserError, exit_on_user_error, temp_files_of, write_text_atomic

REPORT_FILES = (
    "metrics.json",
    "roc.png",
    "pr.png",
    "confusion_matrix.png",
    "reliability.png",
    "training_curves.png",
    "subgroups.png",
    "report.html",
)


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
    parser.add_argument(
        "--model-path", help="the checkpoint that made the predictions: its configuration, and the model for --cam"
    )
    parser.add_argument(
        "--data-dir", help="Kaggle-layout folder: the images for --cam, patient ids and --by metadata from train.csv"
    )
    parser.add_argument(
        "--meta-csv", help="CSV of image_name and metadata for --by and patient ids, in place of --data-dir's train.csv"
    )
    parser.add_argument(
        "--by",
        metavar="COLUMNS",
        help="comma list of subgroups to score: sex, age (bands), site, or any column of the metadata CSV",
    )
    parser.add_argument("--audit", metavar="CSV", help="audit.py's table (its --out) for the report's audit section")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="with --cam: image folder")
    add_allow_missing_meta_flag(parser, "with --cam: ")
    add_overwrite_flag(parser, "the files of an earlier report")
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    if args.cam > 0 and not (args.model_path and args.data_dir):
        parser.error("--cam needs --model-path and --data-dir")
    return args


# --------------------------------------------------------------------------- inputs


def metadata_path(args: argparse.Namespace) -> Path | None:
    """The metadata CSV (image_name, patient_id, sex, age_approx, ...): --meta-csv, else --data-dir's train.csv."""
    if args.meta_csv:
        path = Path(args.meta_csv)
        if not path.is_file():
            raise UserError(f"metadata file {path} does not exist: check --meta-csv.")
        return path
    if args.data_dir and (Path(args.data_dir) / "train.csv").is_file():
        return Path(args.data_dir) / "train.csv"
    return None


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


def report_leftovers(out_dir: Path) -> list[Path]:
    """The temporary files that a killed earlier report left in `out_dir` (atomic_path's .<name>.<random>.tmp
    beside each report file and Grad-CAM overlay)."""
    leftovers = [path for name in REPORT_FILES for path in temp_files_of(out_dir / name)]
    return leftovers + [path for group in CAM_GROUPS for path in (out_dir / "cam").glob(f".{group}_*.png.*.tmp")]


def read_audit(path: Path) -> pd.DataFrame:
    """audit.py's table (its --out CSV), for the report's audit section."""
    if not path.is_file():
        raise UserError(f"audit table {path} does not exist: check --audit (audit.py writes it with --out).")
    table = read_csv(path)
    missing = [column for column in AUDIT_COLUMNS if column not in table.columns]
    if missing:
        raise UserError(f"{path} lacks the column {missing[0]}: pass the CSV that audit.py --out wrote.")
    return table[list(AUDIT_COLUMNS)]


def read_run(model_path: Path) -> dict:
    """What the report's configuration section shows of the checkpoint: its fold, epoch and model, and the
    training flags it was saved with."""
    checkpoint = load_checkpoint(model_path, "melanoma")
    shown = ("fold", "n_folds", "epoch", "model", "fusion", "image_size", "meta_feature_names")
    return {
        "checkpoint": str(model_path),
        **{key: checkpoint.get(key) for key in shown},
        "checkpoint_valid_auc": (checkpoint.get("metrics") or {}).get("auc"),
        "config": checkpoint.get("config") or {},
    }


@dataclass
class Inputs:
    """Everything the report is made of, read and checked before anything is written."""

    frame: pd.DataFrame  # the reported rows: image_name, target, prob, patient_id and fold where known
    fit: pd.DataFrame | None  # --threshold-from's rows
    fitted_on: str
    history: pd.DataFrame | None  # the training log
    grouping: Grouping | None  # --by
    audit: pd.DataFrame | None
    run: dict | None  # the checkpoint's configuration (--model-path)


def read_inputs(args: argparse.Namespace) -> Inputs:
    pred_path = Path(args.pred)
    labels_path = Path(args.labels) if args.labels else None
    frame = read_predictions(pred_path, labels_path)
    meta_path = metadata_path(args)
    meta = read_metadata(meta_path) if meta_path else None
    if "patient_id" not in frame.columns and meta is not None:
        frame = attach_patients(frame, meta)
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
    grouping = None
    if args.by and parse_by(args.by):
        if meta is None:
            where = f"{args.data_dir} has no train.csv" if args.data_dir else "no metadata CSV was given"
            raise UserError(f"--by needs the images' metadata and {where}: pass --data-dir or --meta-csv.")
        grouping = group_rows(frame, meta, parse_by(args.by), meta_path)
    return Inputs(
        frame=frame,
        fit=fit,
        fitted_on=fitted_on,
        history=read_metrics_logs(log_paths) if log_paths else None,
        grouping=grouping,
        audit=read_audit(Path(args.audit)) if args.audit else None,
        run=read_run(Path(args.model_path)) if args.model_path else None,
    )


def compute_report(args: argparse.Namespace, inputs: Inputs) -> dict:
    """metrics.json: the headline metrics, the data summary, and the subgroups and run where asked."""
    metrics = compute_metrics(inputs.frame, args.threshold, args.n_bootstrap, args.seed, inputs.fit, inputs.fitted_on)
    metrics = {"predictions": str(args.pred), **metrics, "data": data_summary(inputs.frame)}
    if inputs.grouping is not None:
        metrics["subgroups"] = subgroup_report(
            inputs.frame, inputs.grouping, args.threshold, args.n_bootstrap, args.seed
        )
    if inputs.run is not None:
        metrics["run"] = inputs.run
    if args.audit:
        metrics["audit_source"] = args.audit
    return metrics


def write_figures(inputs: Inputs, metrics: dict, threshold: float, out_dir: Path) -> list[str]:
    frame = inputs.frame
    plot_roc(frame, metrics, out_dir / "roc.png")
    plot_pr(frame, metrics, out_dir / "pr.png")
    plot_confusion(metrics["at_threshold"]["confusion_matrix"], threshold, out_dir / "confusion_matrix.png")
    plot_reliability(metrics["calibration"], out_dir / "reliability.png")
    written = ["roc.png", "pr.png", "confusion_matrix.png", "reliability.png"]
    optional = {
        "training_curves.png": inputs.history is not None and not inputs.history.empty,
        "subgroups.png": "subgroups" in metrics,
    }
    for name, drawn in optional.items():
        if not drawn:  # an earlier report's (--overwrite) would read as this one's
            (out_dir / name).unlink(missing_ok=True)
    if optional["training_curves.png"]:
        plot_training_curves(inputs.history, out_dir / "training_curves.png")
    if optional["subgroups.png"]:
        plot_subgroups(metrics["subgroups"], metrics["roc_auc"], out_dir / "subgroups.png")
    return written + [name for name, drawn in optional.items() if drawn]


def write_cam_overlays(args: argparse.Namespace, frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    device, _ = prepare_runtime(args)
    # Grad-CAM takes gradients in float32 in the default memory layout: the runtime's other settings do not apply
    loaded = MelanomaPredictor.from_checkpoint(args.model_path, ScoringRuntime(device)).loaded
    table = read_melanoma_table(args.data_dir, args.split, use_meta=False, require_target=False)
    require_metadata(table, [loaded], args.allow_missing_meta, source=f"the {args.split} CSV of {args.data_dir}")
    chosen = select_cam_images(frame, args.threshold, args.cam)
    return write_cams(loaded, chosen, table, out_dir / "cam", device)


def print_summary(metrics: dict, out_dir: Path, written: list[str]) -> None:
    low, high = metrics["roc_auc_ci95"]
    at, at90, calibrated = metrics["at_threshold"], metrics["at_90_sensitivity"], metrics["calibration"]
    lines = [
        f"{metrics['n_images']} images ({metrics['n_melanoma']} melanoma): ROC AUC {metrics['roc_auc']:.4f} "
        f"(95% CI {low:.4f}-{high:.4f} over {metrics['n_bootstrap_units']} "
        f"{metrics['bootstrap_unit']}s), partial AUC above 80% TPR {metrics['pauc_above_80_tpr']:.4f}, average "
        f"precision {metrics['average_precision']:.4f}",
        f"  calibration: Brier {calibrated['brier']:.4f}, ECE {calibrated['ece']:.4f} ({calibrated['n_bins']} bins)",
        f"  at threshold {at['threshold']:.3f}: sensitivity {at['sensitivity']:.4f}, specificity "
        f"{at['specificity']:.4f}, balanced accuracy {at['balanced_acc']:.4f}",
        f"  at 90% sensitivity, threshold {at90['threshold']:.4f} fitted on {at90['threshold_fitted_on']}: "
        f"sensitivity {at90['sensitivity']:.4f}, specificity {at90['specificity']:.4f}",
    ]
    for name, entry in metrics.get("subgroups", {}).get("by", {}).items():
        for group in entry["groups"]:
            if group["auc"] is None:
                auc = group["auc_note"]
            else:
                low, high = group["auc_ci95"]
                auc = f"AUC {group['auc']:.3f} ({low:.3f}-{high:.3f})"
            lines.append(
                f"  {name} {group['group']}: {group['images']} images, {group['melanoma']} melanoma, {auc}, "
                f"sensitivity {group['sensitivity']:.3f}, specificity {group['specificity']:.3f}"
            )
    lines.append(f"wrote {out_dir}: {', '.join(written)}")
    print("\n".join(lines), flush=True)


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
        inputs = read_inputs(args)
        out_dir = Path(args.out_dir)
        claim_folder(out_dir, args.overwrite, report_leftovers(out_dir), "report folder", "--out-dir")
        metrics = compute_report(args, inputs)
        write_text_atomic(out_dir / "metrics.json", json.dumps(json_ready(metrics), indent=2) + "\n")
        written = ["metrics.json", *write_figures(inputs, metrics, args.threshold, out_dir)]
        cams = write_cam_overlays(args, inputs.frame, out_dir) if args.cam > 0 else []
        if cams:
            written.append(f"cam/ ({len(cams)} overlays)")
        command = sys.argv[1:] if argv is None else argv
        write_text_atomic(
            out_dir / "report.html", build_report(metrics, out_dir, inputs.history, cams, inputs.audit, command)
        )
        written.append("report.html")
        print_summary(metrics, out_dir, written)
        return metrics


if __name__ == "__main__":
    main()
