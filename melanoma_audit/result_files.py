"""The result tables the scoring scripts write and read back: prediction files with their labels (train.py's
out-of-fold CSV, predict.py's output), the metadata CSV joined to them, and audit.py's table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.tables import read_csv
from utils import UserError

# audit.py's table, one row per artifact and test
AUDIT_COLUMNS = (
    "artifact",
    "test",
    "images",
    "melanoma",
    "auc",
    "sensitivity",
    "specificity",
    "benign_to_malignant",
    "malignant_to_benign",
    "mean_shift",
)


def read_predictions(pred_path: Path, labels_path: Path | None, flag: str = "--pred") -> pd.DataFrame:
    """image_name, target (0/1), prob and, where the CSVs have them, patient_id and fold, from an OOF CSV or scores
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
    fold = ["fold"] if "fold" in pred.columns else []  # train.py's OOF file: the data summary counts per fold
    if "prob" in pred.columns and "target" in pred.columns:  # labels of its own: --labels is for the others
        frame = pred[["image_name", "target", "prob", *patient, *fold]]
        label_source = pred_path
    else:
        frame = with_labels(pred, [*patient, *fold], pred_path, labels_path)
        label_source = labels_path
    return checked_scores(frame.reset_index(drop=True), pred_path, label_source)


def with_labels(pred: pd.DataFrame, kept: list[str], pred_path: Path, labels_path: Path | None) -> pd.DataFrame:
    """A predictions CSV without labels of its own: image_name, its score as prob (its prob, else predict.py's
    target) and its columns `kept`, with the 0/1 target of the labels CSV (and its patient_id where `kept` has
    none)."""
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
    frame = pred[["image_name", score, *kept]].rename(columns={score: "prob"})
    label_patient = ["patient_id"] if "patient_id" in labels.columns and "patient_id" not in kept else []
    frame = frame.merge(labels[["image_name", "target", *label_patient]], on="image_name", how="left")
    unlabelled = frame["target"].isna()
    if unlabelled.any():
        raise UserError(
            f"{labels_path} has no label for {int(unlabelled.sum())} image(s) of {pred_path}, first "
            f"{frame['image_name'][unlabelled].iloc[0]}: give labels for every predicted image."
        )
    return frame


def checked_scores(frame: pd.DataFrame, pred_path: Path, label_source: Path) -> pd.DataFrame:
    """`frame` with target as 0/1 int and prob as float, refused in one sentence where either is not."""
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


def read_metadata(path: Path) -> pd.DataFrame:
    table = read_csv(path)
    if "image_name" not in table.columns:
        raise UserError(f"{path} lacks the column image_name: the metadata is joined to the predictions on it.")
    return table


def attach_patients(frame: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    """Adds patient_id from the metadata CSV, when it has one, for the patient bootstrap; an image it does not list
    gets none (a patient of its own)."""
    if "patient_id" not in meta.columns:
        return frame
    return frame.merge(meta[["image_name", "patient_id"]].drop_duplicates("image_name"), on="image_name", how="left")
