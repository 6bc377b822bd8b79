"""The evaluation report as one self-contained HTML page (evaluate.py's report.html): the headline metrics, the data
summary, every figure with a sentence on how to read it, the subgroup and audit tables, the Grad-CAM overlays and
the run's configuration. Images are embedded as base64 data URIs and the page has no script and no external link,
so it opens in any browser offline and can be mailed or archived as one file."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from melanoma_audit.report_metrics import IN_SAMPLE

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0 auto;
       max-width: 1180px; padding: 24px 32px; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.muted { color: #59636e; font-size: 0.92em; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.tile { border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 16px; min-width: 150px; }
.tile .value { font-size: 1.6em; font-weight: 600; }
.tile .label { color: #59636e; font-size: 0.85em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.note { color: #9a6700; }
table.groups td:first-child { min-width: 9em; }
table.groups td.num { min-width: 5em; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 20px; align-items: start; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption, .caption { font-size: 0.9em; color: #3d444d; margin-top: 4px; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 0 20px; }
.config { columns: 2; column-gap: 32px; }
.config table { width: 100%; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 0.9em; word-break: break-all; }
"""

FIGURE_MEANINGS = {
    "roc": "Each point of the curve is a threshold: the share of melanomas it catches (sensitivity) against the share "
    "of benign lesions it flags (1 - specificity); the area under it is the chance that a random melanoma scores "
    "above a random benign lesion (0.5 is guessing).",
    "pr": "Of the images flagged at each recall, the share that are melanoma; the dashed line is what guessing reaches "
    "at this prevalence, so the gap above it is what the model adds.",
    "reliability": "Points on the diagonal mean P(melanoma) can be read as a probability (of the images scored near "
    "0.3, about 30 % are melanoma); the bars count the images in each bin, and a sparse bin's point is noisy.",
    "confusion": "Rows are the truth, columns the decision at the chosen threshold: the bottom row splits the "
    "melanomas into caught and missed, the top row the benign lesions into cleared and flagged.",
    "training": "Loss per epoch on the training and validation images and the validation AUC per fold: a validation "
    "loss that rises while the training loss falls means the model has started to memorise.",
    "subgroups": "Each group's AUC with its 95 % interval against the line of all images: a group whose interval "
    "lies clearly below it is one the model serves worse; groups too small for an AUC show their counts instead.",
    "audit": "The model on images with and without each artifact, and what pasting one onto images without it does: "
    "a large gap between with and without, or many predictions that cross the threshold, mean the model leans on "
    "the artifact rather than the lesion.",
    "cam": "Warm colours mark where the backbone's last conv block found the evidence for the explained score; a "
    "map that lights up a ruler, a dark frame or hair rather than the lesion is a warning sign.",
}
AUDIT_FORMATS = {"mean_shift": "{:+.4f}", "auc": "{:.3f}", "sensitivity": "{:.3f}", "specificity": "{:.3f}"}


# --------------------------------------------------------------------------- small pieces


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object, spec: str = "{:.4f}") -> str:
    """A number as text, an en dash where it is missing or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    return esc(spec.format(value))


def interval(values: Sequence[float] | None, spec: str = "{:.4f}") -> str:
    if values is None or any(value is None or not math.isfinite(value) for value in values):
        return "no interval"
    low, high = values
    return f"{fmt(low, spec)}&ndash;{fmt(high, spec)}"


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figure(path: Path, alt: str, caption: str, title: str | None = None) -> str:
    """An embedded image; its caption opens with `title` in bold (default: the alt text)."""
    return (
        f'<figure><img src="{data_uri(path)}" alt="{esc(alt)}">'
        f"<figcaption><b>{esc(title or alt)}.</b> {esc(caption)}</figcaption></figure>"
    )


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None, css: str = ""
) -> str:
    """An HTML table of cells that are HTML already (escaped by the caller); numeric columns align right."""
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{esc(name)}</th>" for name in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>"
            for cell, num in zip(row, numeric, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    opening = f'<table class="{css}">' if css else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{text}</p>' if css else f"<p>{text}</p>"


# --------------------------------------------------------------------------- sections


def headline_section(metrics: dict) -> str:
    low_high = interval(metrics["roc_auc_ci95"])
    at, at90, calibrated = metrics["at_threshold"], metrics["at_90_sensitivity"], metrics["calibration"]
    unit = f"{metrics['n_bootstrap_units']} {metrics['bootstrap_unit']}s"
    tiles = [
        (fmt(metrics["roc_auc"]), f"ROC AUC (95% CI {low_high})"),
        (fmt(at["sensitivity"]), f"sensitivity at {at['threshold']:.3f}"),
        (fmt(at["specificity"]), f"specificity at {at['threshold']:.3f}"),
        (fmt(metrics["average_precision"]), "average precision"),
        (fmt(calibrated["ece"]), "expected calibration error"),
    ]
    tiles_html = "".join(
        f'<div class="tile"><div class="value">{value}</div><div class="label">{label}</div></div>'
        for value, label in tiles
    )
    fitted = at90["threshold_fitted_on"]
    fitted_note = "in-sample: optimistic" if fitted == IN_SAMPLE else f"fitted on {esc(fitted)}"
    rows = [
        ["ROC AUC", f"{fmt(metrics['roc_auc'])} ({low_high})", f"95% bootstrap interval, {metrics['n_bootstrap']} "
         f"resamples of {esc(unit)}"],
        ["partial AUC above 80% TPR", fmt(metrics["pauc_above_80_tpr"]), "0.02 is chance, 0.2 perfect"],
        ["average precision", fmt(metrics["average_precision"]),
         f"prevalence {metrics['n_melanoma'] / metrics['n_images']:.4f} is chance"],
        ["Brier score", fmt(calibrated["brier"]), "mean squared error of P(melanoma); lower is better"],
        ["expected calibration error", fmt(calibrated["ece"]), f"over {calibrated['n_bins']} equal-width bins"],
        [f"sensitivity at threshold {at['threshold']:.3f}", fmt(at["sensitivity"]), "melanomas flagged"],
        [f"specificity at threshold {at['threshold']:.3f}", fmt(at["specificity"]), "benign lesions cleared"],
        [f"balanced accuracy at {at['threshold']:.3f}", fmt(at["balanced_acc"]), "mean of the two"],
        [f"sensitivity at threshold {at90['threshold']:.4f}", fmt(at90["sensitivity"]),
         f"the threshold that keeps 90% sensitivity, {fitted_note}"],
        [f"specificity at threshold {at90['threshold']:.4f}", fmt(at90["specificity"]), "at that threshold"],
    ]  # fmt: skip
    return section(
        "metrics",
        "Headline metrics",
        f'<div class="tiles">{tiles_html}</div>' + table(["metric", "value", "reading"], rows, [False, True, False]),
    )


def data_section(data: dict) -> str:
    rows = [
        ["images", esc(data["images"])],
        ["melanoma", esc(data["melanoma"])],
        ["benign", esc(data["benign"])],
        ["prevalence", fmt(data["melanoma"] / data["images"])],
    ]
    if "patients" in data:
        rows.append(["patients (with a patient_id)", esc(data["patients"])])
        rows.append(["images without a patient_id (each its own patient)", esc(data["images_without_patient_id"])])
    else:
        rows.append(["patients", "no patient_id column: the interval resamples images"])
    body = table(["", "count"], rows, [False, True])
    if "folds" in data:
        fold_rows = [
            [esc(fold["fold"]), esc(fold["images"]), esc(fold["melanoma"]), fmt(fold["auc"])] for fold in data["folds"]
        ]
        body += "<h3>Cross-validation folds</h3>" + table(
            ["fold", "images", "melanoma", "ROC AUC"], fold_rows, [False, True, True, True]
        )
    return section("data", "Data", body)


def figures_section(anchor: str, title: str, figures: Sequence[tuple[Path, str, str]], missing: str) -> str:
    """A grid of (path, name, meaning) figures, or the sentence `missing` where there is none."""
    present = [(path, name, meaning) for path, name, meaning in figures if path.is_file()]
    if not present:
        return section(anchor, title, paragraph(esc(missing), "muted"))
    return section(anchor, title, '<div class="grid">' + "".join(figure(*item) for item in present) + "</div>")


def training_section(out_dir: Path, history: pd.DataFrame | None) -> str:
    path = out_dir / "training_curves.png"
    if history is None or history.empty or not path.is_file():
        note = (
            "No training log: train.py's metrics_<run>.jsonl is found beside an oof_<run>.csv, else pass --metrics-log."
        )
        return section("training", "Training curves", paragraph(esc(note), "muted"))
    rows = []
    for fold, epochs in history.groupby("fold"):
        best = epochs.loc[epochs["auc"].idxmax()] if epochs["auc"].notna().any() else epochs.iloc[-1]
        last = epochs.sort_values("epoch").iloc[-1]
        seconds = epochs["seconds"].sum() if "seconds" in epochs else math.nan
        rows.append([
            esc(fold), esc(len(epochs)), esc(int(best["epoch"])), fmt(best["auc"]), fmt(last["auc"]),
            fmt(seconds / 60, "{:.1f}"),
        ])  # fmt: skip
    summary = table(
        ["fold", "epochs", "best epoch", "best validation AUC", "last validation AUC", "minutes"],
        rows,
        [False, True, True, True, True, True],
    )
    return section(
        "training",
        "Training curves",
        figure(path, "Training curves", FIGURE_MEANINGS["training"])
        + "<h3>From the training log</h3>"
        + summary
        + paragraph("The best epoch is chosen on the fold it is scored on: its AUC is optimistic.", "muted"),
    )


def subgroup_rows(groups: list[dict]) -> list[list[str]]:
    rows = []
    for group in groups:
        if group["auc"] is None:  # the counts stand beside it; the rule is stated above the tables
            auc = f'<span class="note" title="{esc(group["auc_note"])}">too few for an AUC</span>'
        else:
            auc = f"{fmt(group['auc'], '{:.3f}')} ({interval(group['auc_ci95'], '{:.3f}')})"
        sensitivity = f"{fmt(group['sensitivity'], '{:.3f}')} ({group['true_positives']}/{group['melanoma']})"
        specificity = f"{fmt(group['specificity'], '{:.3f}')} ({group['true_negatives']}/{group['benign']})"
        rows.append([
            esc(group["group"]), esc(group["images"]), esc(group["melanoma"]), esc(group["benign"]), auc,
            sensitivity, specificity,
        ])  # fmt: skip
    return rows


def subgroups_section(out_dir: Path, subgroups: dict | None) -> str:
    if subgroups is None:
        note = "Not asked: pass --by sex,age,site (or any column of the metadata CSV) with --data-dir or --meta-csv."
        return section("subgroups", "Subgroups", paragraph(esc(note), "muted"))
    threshold = subgroups["threshold"]
    header = ["group", "images", "melanoma", "benign", "ROC AUC (95% CI)", f"sensitivity at {threshold:.3f}",
              f"specificity at {threshold:.3f}"]  # fmt: skip
    numeric = [False, True, True, True, True, True, True]
    body = paragraph(
        f"Metadata from <code>{esc(subgroups['source'])}</code>, joined on image_name"
        + (
            f"; {subgroups['images_not_in_source']} predicted image(s) it does not list are counted as unknown"
            if subgroups["images_not_in_source"]
            else ""
        )
        + f". A group needs {subgroups['min_per_class']} melanomas and {subgroups['min_per_class']} benign images "
        "for an AUC; sensitivity and specificity show their counts.",
        "muted",
    )
    for name, entry in subgroups["by"].items():
        title = name if name == entry["column"] else f"{name} ({entry['column']})"
        body += f"<h3>{esc(title)}</h3>" + table(header, subgroup_rows(entry["groups"]), numeric, "groups")
    path = out_dir / "subgroups.png"
    if path.is_file():
        body += figure(path, "AUC per subgroup", FIGURE_MEANINGS["subgroups"])
    return section("subgroups", "Subgroups", body)


def audit_section(audit: pd.DataFrame | None, source: str | None) -> str:
    if audit is None:
        note = "Not asked: pass --audit with the CSV that audit.py --out wrote."
        return section("audit", "Artifact audit", paragraph(esc(note), "muted"))
    columns = list(audit.columns)
    rows = []
    for record in audit.to_dict(orient="records"):
        cells = []
        for column in columns:
            value = record[column]
            if pd.isna(value):
                cells.append("")
            elif column in AUDIT_FORMATS:
                cells.append(fmt(float(value), AUDIT_FORMATS[column]))
            elif isinstance(value, float) and value.is_integer():
                cells.append(esc(int(value)))
            else:
                cells.append(esc(value))
        rows.append(cells)
    numeric = [column not in ("artifact", "test") for column in columns]
    body = (
        paragraph(f"From <code>{esc(source)}</code> (sensitivity and specificity at audit.py's --threshold).", "muted")
        + table(columns, rows, numeric)
        + paragraph(esc(FIGURE_MEANINGS["audit"]), "caption")
    )
    return section("audit", "Artifact audit", body)


def cam_caption(path: Path) -> tuple[str, str]:
    """An overlay's file name <group>_<rank>_<image> read out: ("most confident correct #1", image name)."""
    group, rank, name = (path.stem.split("_", 2) + ["", ""])[:3]
    title = {"confident": "most confident correct", "wrong": "most wrong"}.get(group)
    if title is None or not rank.isdigit():
        return path.stem, ""
    return f"{title} #{int(rank)}", name


def cam_section(cams: Sequence[Path]) -> str:
    if not cams:
        note = "Not asked: pass --cam N with --model-path and --data-dir for Grad-CAM overlays."
        return section("cam", "Grad-CAM", paragraph(esc(note), "muted"))
    captions = [cam_caption(path) for path in cams]
    images = "".join(figure(path, path.stem, name, title) for path, (title, name) in zip(cams, captions, strict=True))
    return section(
        "cam", "Grad-CAM", paragraph(esc(FIGURE_MEANINGS["cam"]), "caption") + f'<div class="grid">{images}</div>'
    )


def config_section(run: dict | None, command: Sequence[str]) -> str:
    body = paragraph("<b>Command:</b> <code>" + esc(" ".join(["python evaluate.py", *command])) + "</code>")
    if run is None:
        note = "Pass --model-path to show the training configuration stored in the checkpoint."
        return section("config", "Configuration", body + paragraph(esc(note), "muted"))
    saved = {key: value for key, value in run.items() if key != "config"}
    rows = [[esc(key), f"<code>{esc(value)}</code>"] for key, value in {**saved, **run["config"]}.items()]
    return section("config", "Configuration", body + f'<div class="config">{table(["setting", "value"], rows)}</div>')


# --------------------------------------------------------------------------- the page


def build_report(
    metrics: dict,
    out_dir: Path,
    history: pd.DataFrame | None = None,
    cams: Sequence[Path] = (),
    audit: pd.DataFrame | None = None,
    command: Sequence[str] = (),
) -> str:
    """The page for the report folder `out_dir`, whose PNGs it embeds. metrics is metrics.json's content (with
    `data`, and `subgroups`, `run`, `audit_source` where given)."""
    at = metrics["at_threshold"]
    curves = [
        (out_dir / "roc.png", "ROC curve", FIGURE_MEANINGS["roc"]),
        (out_dir / "pr.png", "Precision-recall curve", FIGURE_MEANINGS["pr"]),
    ]
    calibration = [(out_dir / "reliability.png", "Reliability diagram", FIGURE_MEANINGS["reliability"])]
    confusion = [(out_dir / "confusion_matrix.png", f"Confusion matrix at {at['threshold']:.3f}",
                  FIGURE_MEANINGS["confusion"])]  # fmt: skip
    body = [
        "<h1>Melanoma evaluation report</h1>",
        paragraph(
            f"Predictions <code>{esc(metrics['predictions'])}</code>: {metrics['n_images']} images, "
            f"{metrics['n_melanoma']} melanoma.",
            "muted",
        ),
        headline_section(metrics),
        data_section(metrics["data"]),
        figures_section("roc", "ROC and precision-recall", curves, "no curves were drawn"),
        '<div class="pair">',  # two narrow figures side by side
        figures_section("calibration", "Calibration", calibration, "no reliability diagram was drawn"),
        figures_section("confusion", "Confusion matrix", confusion, "no confusion matrix was drawn"),
        "</div>",
        training_section(out_dir, history),
        subgroups_section(out_dir, metrics.get("subgroups")),
        audit_section(audit, metrics.get("audit_source")),
        cam_section(cams),
        config_section(metrics.get("run"), command),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Evaluation: {esc(Path(metrics['predictions']).name)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
