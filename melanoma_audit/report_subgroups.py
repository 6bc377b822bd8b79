"""Subgroup performance for evaluate.py --by: the rows split by a metadata column (sex, age bands, anatomical site,
or any column of the metadata CSV), and per group the ROC AUC with the headline's bootstrap interval, sensitivity
and specificity at the report's threshold, and the counts. A group with too few images of either class gets no
AUC, only a note saying so: an AUC over three melanomas is noise that reads like a finding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.metrics import binary_metrics
from melanoma_audit.report_metrics import bootstrap_auc, bootstrap_groups
from melanoma_audit.tables import AGE_RULE, SITE_COLUMN, implausible_ages
from utils import UserError

BY_COLUMNS = {"sex": "sex", "age": "age_approx", "site": SITE_COLUMN}  # --by's short names for the Kaggle columns
AGE_EDGES = (30, 45, 60, 75)
AGE_BANDS = ("<30", "30-44", "45-59", "60-74", "75+")
UNKNOWN = "unknown"  # the group of the rows whose value is missing (or that the metadata CSV does not list)
MIN_PER_CLASS = 5  # below this many melanomas or benign images a group's AUC is not reported


def parse_by(spec: str) -> list[str]:
    """--by's comma list, in order, each name once."""
    return list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))


def resolve_columns(names: list[str], table: pd.DataFrame, source: Path) -> dict[str, str]:
    """The metadata column behind each --by name (sex, age, site, or a column's own name)."""
    columns = {}
    for name in names:
        column = BY_COLUMNS.get(name, name)
        if column not in table.columns or column == "image_name":
            offered = ", ".join(column for column in table.columns if column != "image_name")
            raise UserError(
                f"--by {name}: {source} has no column {column}; choose sex, age, site or one of its columns "
                f"({offered})."
            )
        columns[name] = column
    return columns


def group_labels(values: pd.Series, name: str, source: Path) -> tuple[pd.Series, list[str]]:
    """Each row's group (text, `unknown` where missing) and the groups in reading order: age bands from young to
    old, other values sorted (numbers as numbers), `unknown` last."""
    if name == "age":
        bad = implausible_ages(values)
        if bad.any():
            raise UserError(f"{source} has age_approx {values[bad].iloc[0]!r}: {AGE_RULE}, or empty.")
        ages = pd.to_numeric(values, errors="coerce")
        bands = pd.cut(ages, [-np.inf, *AGE_EDGES, np.inf], right=False, labels=AGE_BANDS)
        labels = bands.astype(object).where(ages.notna(), UNKNOWN)
        order = [band for band in AGE_BANDS if (labels == band).any()]
    else:
        present = values.dropna()
        numeric = pd.to_numeric(present, errors="coerce")
        if numeric.notna().all():  # 1.0 reads as 1, and 10 sorts after 9
            ordered = present.iloc[np.argsort(numeric.to_numpy(), kind="stable")]
            text = {value: f"{number:g}" for value, number in zip(present, numeric, strict=True)}
        else:
            ordered = present.astype(str).sort_values()
            text = {value: str(value) for value in present}
        labels = values.map(text).where(values.notna(), UNKNOWN)
        order = list(dict.fromkeys(text[value] for value in ordered))
    if (labels == UNKNOWN).any():
        order.append(UNKNOWN)
    return labels.astype(str), order


def group_metrics(rows: pd.DataFrame, threshold: float, n_bootstrap: int, seed: int) -> dict:
    """One group's counts, sensitivity and specificity at `threshold`, and its AUC with the headline's bootstrap
    interval, or a note where the group has too few images of a class."""
    targets, probs = rows["target"].to_numpy(), rows["prob"].to_numpy()
    at = binary_metrics(targets, probs, threshold)
    flagged = probs >= threshold
    melanoma, benign = int(targets.sum()), int((targets == 0).sum())
    entry = {
        "images": len(rows),
        "melanoma": melanoma,
        "benign": benign,
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "true_positives": int(np.sum(flagged & (targets == 1))),
        "true_negatives": int(np.sum(~flagged & (targets == 0))),
    }
    if min(melanoma, benign) < MIN_PER_CLASS:
        return {
            **entry,
            "auc": None,
            "auc_ci95": None,
            "auc_note": f"too few for an AUC: {melanoma} melanoma and {benign} benign (needs {MIN_PER_CLASS} of each)",
        }
    return {
        **entry,
        "auc": at["auc"],
        "auc_ci95": bootstrap_auc(targets, probs, n_bootstrap, seed, bootstrap_groups(rows)),
        "auc_note": None,
    }


@dataclass
class Grouping:
    """The predicted rows split for --by: per name its metadata column, each row's group and the groups' order."""

    source: Path
    not_in_source: int  # predicted images the metadata CSV does not list (they fall into `unknown`)
    columns: dict[str, str]
    labels: dict[str, pd.Series]
    order: dict[str, list[str]]


def group_rows(frame: pd.DataFrame, meta: pd.DataFrame, names: list[str], source: Path) -> Grouping:
    """Joins the metadata CSV `meta` (image_name and the columns) to the predicted rows and labels their groups;
    every mistake in the CSV or in --by is found here, before anything is written."""
    columns = resolve_columns(names, meta, source)
    if meta["image_name"].duplicated().any():
        name = meta["image_name"][meta["image_name"].duplicated()].iloc[0]
        raise UserError(f"{source} lists image {name} twice: keep one row per image for --by.")
    joined = frame[["image_name"]].merge(meta, on="image_name", how="left", indicator=True)
    not_in_source = int((joined["_merge"] == "left_only").sum())
    if not_in_source == len(frame):
        raise UserError(f"{source} lists none of the predicted images: pass the metadata CSV of these images.")
    grouping = Grouping(source, not_in_source, columns, {}, {})
    for name, column in columns.items():
        grouping.labels[name], grouping.order[name] = group_labels(joined[column], name, source)
    return grouping


def subgroup_report(frame: pd.DataFrame, grouping: Grouping, threshold: float, n_bootstrap: int, seed: int) -> dict:
    """metrics.json's `subgroups`: per --by name its column and its groups' metrics."""
    by = {}
    for name, column in grouping.columns.items():
        labels = grouping.labels[name].to_numpy()
        groups = [
            {"group": group, **group_metrics(frame[labels == group], threshold, n_bootstrap, seed)}
            for group in grouping.order[name]
        ]
        by[name] = {"column": column, "groups": groups}
    return {
        "source": str(grouping.source),
        "threshold": threshold,
        "min_per_class": MIN_PER_CLASS,
        "images_not_in_source": grouping.not_in_source,
        "by": by,
    }
