"""Artifact annotation files: one row per image, one 0/1 (or blank: not annotated) column per artifact head, in the
original headerless form or with a header naming the heads; every bad cell is a UserError naming its line."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from melanoma_audit.image_files import IMAGE_EXTENSIONS, is_plain_name
from utils import UserError

# the artifact heads of the detector and the columns of the headerless annotation file, in this order
DEFAULT_ARTIFACT_HEADS = ("hair_dense", "hair_short", "hair_medium", "black_frame", "ruler_mark", "other")
PROB_SUFFIX = "_prob"
_LABEL_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "": math.nan}


def resolve_image(img_dir: Path, name: str) -> Path | None:
    """The file an annotation names: `name` itself when it has an image extension, else `name` plus the first
    of .jpg/.jpeg/.png/.bmp (either case) that exists. None when there is no such file."""
    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        candidates = [img_dir / name]
    else:
        candidates = [img_dir / f"{name}{ext}" for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS)]
    return next((path for path in candidates if os.path.isfile(path)), None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_artifact_annotations(path: str | Path, img_dir: str | Path) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Reads an artifact annotation file; returns (frame, heads, labels).

    Two forms are accepted:
    - the original headerless one, lines `image_file,hair_dense,hair_short,hair_medium,black_frame,ruler_mark,other`;
    - a CSV whose header names the heads: first column the image (with or without extension), every other
      column a head, of any name and number (e.g. isic2018/bias.csv).
    The first line is a header when none of its label cells is a number and one at least is not blank.

    Cells hold 0, 1 or nothing; a blank cell means "not annotated" and becomes NaN in `labels` (float32,
    shape images x heads), to be left out of that head's loss and metrics. A column `<head>_prob` is ignored when
    the column `<head>` exists too, so the file written by `multi_classification.py --mode test` reads back.
    `frame` has image_name (as written in the file), filepath (under `img_dir`) and line (1-based line number).
    Any bad cell, a missing or duplicated image, or a file without heads is a UserError naming the line.
    """
    path, img_dir = Path(path), Path(img_dir)
    if not path.is_file():
        raise UserError(f"annotation file {path} does not exist: check --ann_path.")
    if not img_dir.is_dir():
        raise UserError(f"image folder {img_dir} does not exist: check --img_path.")
    columns, rows = _split_header(path, _read_rows(path))
    keep = [
        i for i, name in enumerate(columns) if not (name.endswith(PROB_SUFFIX) and name[: -len(PROB_SUFFIX)] in columns)
    ]
    heads = [columns[i] for i in keep]

    names, filepaths, numbers, labels = [], [], [], []
    seen: dict[str, int] = {}
    for number, row in rows:
        name, values = _read_row(path, number, row, columns, keep, img_dir)
        filepath = resolve_image(img_dir, name)
        if filepath is None:
            raise UserError(
                f"{path} line {number} names image {name}, which is not in {img_dir}: restore it, fix --img_path, "
                "or remove the line."
            )
        key = os.path.normcase(os.path.abspath(filepath))
        if key in seen:
            raise UserError(f"{path} line {number} repeats image {name} of line {seen[key]}: keep one line per image.")
        seen[key] = number
        names.append(name)
        filepaths.append(str(filepath))
        numbers.append(number)
        labels.append(values)

    frame = pd.DataFrame({"image_name": names, "filepath": filepaths, "line": numbers})
    return frame, heads, np.asarray(labels, dtype=np.float32).reshape(len(names), len(heads))


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The file's non-blank lines as (1-based line number, cells without surrounding spaces), in `,`, `;` or tab
    separated form, whichever the first line holds most of (Excel writes `;` in some locales)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            separator = max(",;\t", key=handle.readline().count)
            handle.seek(0)
            lines = enumerate(csv.reader(handle, delimiter=separator), start=1)
            rows = [(number, [cell.strip() for cell in row]) for number, row in lines]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} is not a readable CSV text file ({error}): save it as UTF-8 CSV.") from None
    rows = [(number, row) for number, row in rows if any(row)]
    if not rows:
        raise UserError(f"annotation file {path} is empty: it needs one line per image, image name then 0/1 labels.")
    return rows


def _split_header(path: Path, rows: list[tuple[int, list[str]]]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(the label columns' names, the image rows): the header's names, or DEFAULT_ARTIFACT_HEADS in the headerless
    form."""
    first_number, first = rows[0]
    if len(first) < 2:
        raise UserError(
            f"{path} line {first_number} has no label columns: each line needs the image name, then one 0/1 "
            "value per artifact head."
        )
    # a line of blank labels (not annotated) is a row of the headerless form: a header names its heads
    if not (any(first[1:]) and not any(_is_number(cell) for cell in first[1:])):
        if len(first) != len(DEFAULT_ARTIFACT_HEADS) + 1:
            raise UserError(
                f"{path} line {first_number} has {len(first) - 1} labels without a header; the headerless form "
                f"has {len(DEFAULT_ARTIFACT_HEADS)} ({','.join(DEFAULT_ARTIFACT_HEADS)}): fix the line or add a "
                "header line naming the heads."
            )
        return list(DEFAULT_ARTIFACT_HEADS), rows
    columns = first[1:]
    for index, name in enumerate(columns, start=2):
        if not name:
            raise UserError(f"{path} line {first_number}: header column {index} has no name; name every head.")
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise UserError(f"{path} line {first_number} names head {repeated[0]} twice: give each column one name.")
    if len(rows) == 1:
        raise UserError(f"{path} has a header but no rows: add one line per image.")
    return columns, rows[1:]


def _read_row(
    path: Path, number: int, row: list[str], columns: list[str], keep: list[int], img_dir: Path
) -> tuple[str, list[float]]:
    """One image line's image name and its labels of the `keep` columns (NaN where blank), checked."""
    if len(row) != len(columns) + 1:
        raise UserError(
            f"{path} line {number} has {len(row)} values, the file has {len(columns) + 1} columns: "
            "give every line the image name and one value per head."
        )
    name = row[0]
    if not name:
        raise UserError(f"{path} line {number} has no image name: every line must start with its image file.")
    if not is_plain_name(name):
        raise UserError(
            f"{path} line {number} names image {name!r}, a path rather than a file name: give the bare name of "
            f"an image in {img_dir} (no /, \\ or ..)."
        )
    values = []
    for i in keep:
        value = _LABEL_VALUES.get(row[i + 1])
        if value is None:
            raise UserError(
                f"{path} line {number} has {row[i + 1]!r} for {columns[i]}: labels must be 0, 1 or blank "
                "(not annotated)."
            )
        values.append(value)
    return name, values
