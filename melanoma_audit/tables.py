"""The Kaggle-layout tables: reading the CSVs as Excel and Windows write them and checking every row (the
metadata encoding is metadata.py's, the patients and folds patients.py's)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.image_files import image_file_problem, is_plain_name
from utils import UserError

SITE_COLUMN = "anatom_site_general_challenge"
MAX_AGE = 120
AGE_RULE = f"ages must be numbers from 0 to {MAX_AGE}"  # every reader of ages refuses others in these words
# the spellings of sex read as the encoder's two values, whatever their case. Numbers are not among them: data sets
# disagree on them (1 is male in some, female in others; ISO 5218 has 1 male, 2 female, 0 unknown)
SEX_SPELLINGS = {"male": "male", "m": "male", "female": "female", "f": "female"}
SEX_RULE = "sex must be male or female (M/F and any case also do), or empty when it is not known"

# --------------------------------------------------------------------------- the Kaggle layout


def find_train_csv(data_dir: Path) -> Path:
    """train.csv, or train_concat.csv as shipped in the Kaggle melanoma-external-malignant-256 folder."""
    for name in ("train.csv", "train_concat.csv"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise UserError(f"no train.csv or train_concat.csv in {data_dir}: point --data-dir at the unpacked Kaggle folder.")


def read_csv(path: Path) -> pd.DataFrame:
    """Reads a CSV also as Excel and Windows write it: a UTF-8 byte-order mark, CRLF line ends, `;` (then with
    decimal commas) or tab separators, spaces around header names and cells. image_name and patient_id stay text
    (leading zeros kept). Empty cells, cells of spaces and pandas' NA strings ("NaN", "NA", "null", ...) are
    missing."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = handle.readline()
        separator = max(",;\t", key=header.count)  # a comma when the header has a single column
        options = {"sep": separator, "decimal": "," if separator == ";" else ".", "encoding": "utf-8-sig"}
        names = pd.read_csv(path, nrows=0, **options).columns
        text = {name: str for name in names if str(name).strip() in ("image_name", "patient_id")}
        frame = pd.read_csv(path, dtype=text, **options)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty: it needs a header line and one row per image.") from None
    except UnicodeDecodeError:
        raise UserError(f'{path} is not UTF-8 text: save it as "CSV UTF-8" (Excel) or re-download it.') from None
    except pd.errors.ParserError as error:
        raise UserError(
            f"{path} is not a readable CSV ({str(error).splitlines()[0]}): fix or re-download it."
        ) from None
    frame.columns = [str(name).strip() for name in frame.columns]
    repeated = frame.columns[frame.columns.duplicated()]
    if len(repeated):
        raise UserError(f"{path} has the column {repeated[0]} twice: keep one of them.")
    for name in frame.columns:
        if pd.api.types.is_string_dtype(frame[name]) or frame[name].dtype == object:
            cells = frame[name].map(lambda cell: cell.strip() if isinstance(cell, str) else cell)
            frame[name] = cells.mask(cells == "")
    if frame.empty:
        raise UserError(f"{path} has a header but no rows: it needs one row per image.")
    return frame


def cell_text(value: object) -> str:
    """A cell as the user wrote it, near enough: 150 rather than 150.0 for a column pandas read as numbers."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise UserError(
            f"{path} lacks the column(s) {', '.join(missing)}: the Kaggle layout has "
            f"image_name, patient_id, sex, age_approx, {SITE_COLUMN}, target."
        )


def read_melanoma_table(
    data_dir: str | Path, split: str, use_meta: bool, require_target: bool, bad_images: str = "fail"
) -> pd.DataFrame:
    """Reads the train or test CSV of a Kaggle-layout folder and checks it.

    Image files that are empty, not JPEG/PNG, or truncated (no end marker) stop the run (bad_images="fail") or
    are left out with a count (bad_images="skip").

    Adds `filepath` (the JPEG at <data-dir>/<split>/<split>/<image_name>.jpg). Every check ends in a
    UserError naming the file and the fix.
    """
    data_dir = Path(data_dir)
    csv_path = _table_path(data_dir, split)
    frame = read_csv(csv_path)
    required = ["image_name"]
    if require_target:
        required.append("target")
    if use_meta:
        required += ["sex", "age_approx", SITE_COLUMN]
    _require_columns(frame, required, csv_path)
    _check_image_names(frame, csv_path, split)
    if require_target:
        frame["target"] = _checked_targets(frame, csv_path)
    if use_meta:
        bad = unknown_sex(frame["sex"])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"{csv_path} line {row + 2} has sex {cell_text(frame['sex'].iloc[row])!r}: {SEX_RULE}.")
    if "age_approx" in frame.columns:
        frame["age_approx"] = _checked_ages(frame, csv_path)
    return _with_image_files(frame, data_dir, split, csv_path, bad_images).reset_index(drop=True)


def _table_path(data_dir: Path, split: str) -> Path:
    """The CSV of `split` ("train" or "test") in the Kaggle-layout folder `data_dir`."""
    if not data_dir.is_dir():
        problem = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise UserError(f"data folder {data_dir} {problem}: pass --data-dir with the unpacked Kaggle folder.")
    if split == "train":
        return find_train_csv(data_dir)
    csv_path = data_dir / "test.csv"
    if not csv_path.is_file():
        raise UserError(f"no test.csv in {data_dir}: the Kaggle folder has test.csv beside train.csv.")
    return csv_path


def _check_image_names(frame: pd.DataFrame, csv_path: Path, split: str) -> None:
    """Every row names one image, by a bare file name, and no image twice."""
    if frame["image_name"].isna().any():
        row = int(np.flatnonzero(frame["image_name"].isna())[0]) + 2
        raise UserError(f"{csv_path} line {row} has no image_name: every row must name its image.")
    paths = [row for row, name in enumerate(frame["image_name"]) if not is_plain_name(name)]
    if paths:
        raise UserError(
            f"{csv_path} line {paths[0] + 2} has image_name {frame['image_name'].iloc[paths[0]]!r}, a path rather "
            f"than a file name: give the bare name of an image in {split}/{split}/ (no /, \\ or ..)."
        )
    duplicated = frame["image_name"].duplicated()
    if duplicated.any():
        name = frame["image_name"][duplicated].iloc[0]
        raise UserError(f"{csv_path} lists image {name} twice: remove the duplicate row.")


def _checked_targets(frame: pd.DataFrame, csv_path: Path) -> pd.Series:
    """The target column as 0/1 integers; any other cell is a UserError naming its line."""
    target = pd.to_numeric(frame["target"], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = frame["target"].iloc[row]
        has = "no target" if pd.isna(cell) else f"target {cell_text(cell)!r}"
        raise UserError(f"{csv_path} line {row + 2} has {has}: targets must be 0 or 1.")
    return target.astype(int)


def _checked_ages(frame: pd.DataFrame, csv_path: Path) -> pd.Series:
    """age_approx as numbers, NaN where empty. Refused rather than treated as missing: an age of -5, 999 or inf is
    a typo or a unit mix-up that only the user can resolve, and a silently dropped age would change the model's
    input unnoticed."""
    bad = implausible_ages(frame["age_approx"])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{csv_path} line {row + 2} has age_approx {cell_text(frame['age_approx'].iloc[row])!r}: "
            f"{AGE_RULE}, or empty."
        )
    return pd.to_numeric(frame["age_approx"], errors="coerce")


def _with_image_files(frame: pd.DataFrame, data_dir: Path, split: str, csv_path: Path, bad_images: str) -> pd.DataFrame:
    """`frame` with each row's `filepath`, every listed file present; damaged files stop the run, or with
    bad_images="skip" their rows are left out with a notice."""
    image_dir = data_dir / split / split
    if not image_dir.is_dir():
        raise UserError(f"image folder {image_dir} does not exist: the Kaggle layout keeps images in {split}/{split}/.")
    frame["filepath"] = [str(image_dir / f"{name}.jpg") for name in frame["image_name"]]
    missing = [path for path in frame["filepath"] if not os.path.isfile(path)]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) listed in {csv_path} are missing, first {missing[0]}: "
            "restore them or remove their rows."
        )
    damaged = [(path, problem) for path in frame["filepath"] if (problem := image_file_problem(path))]
    if damaged and bad_images == "fail":
        path, problem = damaged[0]
        raise UserError(
            f"{len(damaged)} image(s) listed in {csv_path} are damaged, first {path} ({problem}): replace them, "
            "or pass --bad-images skip to leave them out."
        )
    if damaged:
        print(f"notice: left out {len(damaged)} damaged image(s) of {csv_path}, first {damaged[0][0]}", flush=True)
        frame = frame[~frame["filepath"].isin({path for path, _ in damaged})]
        if frame.empty:
            raise UserError(f"every image listed in {csv_path} is damaged: re-download the data set.")
    return frame


def canonical_sex(values: pd.Series) -> pd.Series:
    """male / female for the spellings of SEX_SPELLINGS, in any case; missing for empty cells and anything else."""
    return values.astype("string").str.strip().str.lower().map(SEX_SPELLINGS).astype("string")


def unknown_sex(values: pd.Series) -> pd.Series:
    """True where a cell holds something that is neither missing nor a spelling of male or female."""
    return values.notna().to_numpy() & canonical_sex(values).isna().to_numpy()


def implausible_ages(ages: pd.Series) -> pd.Series:
    """True where a cell holds something other than an age from 0 to MAX_AGE; empty cells are fine (missing)."""
    return ages.notna() & ~pd.to_numeric(ages, errors="coerce").between(0, MAX_AGE)
