"""The images a script scores: an image table (image_name, filepath) from files and folders, the metadata of
--use-meta models from a CSV or from flags, and the check that every model finds the metadata it was trained with."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from melanoma_audit.image_files import IMAGE_EXTENSIONS, list_images
from melanoma_audit.tables import AGE_RULE, implausible_ages, read_csv
from utils import UserError

if TYPE_CHECKING:
    from melanoma_audit.inference import LoadedModel


def image_name(path: str | Path) -> str:
    """An image's name as the Kaggle CSVs write it: the file name without an image extension."""
    path = Path(path)
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name


def frame_from_images(paths: Sequence[str | Path]) -> pd.DataFrame:
    """image_name and filepath of image files and of every image directly in given folders, in the given order
    (folders sorted by name)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += list_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image {path} does not exist: give image files or folders of images.")
    frame = pd.DataFrame({"image_name": [image_name(path) for path in files], "filepath": [str(p) for p in files]})
    repeated = frame["image_name"][frame["image_name"].duplicated()]
    if not repeated.empty:
        raise UserError(
            f"two images are named {repeated.iloc[0]} (e.g. a .jpg and a .png): give each image a unique name."
        )
    return frame


def attach_metadata(
    frame: pd.DataFrame, meta_csv: str | Path | None = None, values: dict[str, object] | None = None
) -> pd.DataFrame:
    """Adds metadata columns to an image table: from a CSV keyed by image_name (with or without extension), or
    the same values for every image (`values`, column -> value, None meaning not given)."""
    frame = frame.copy()
    if meta_csv is not None:
        meta_csv = Path(meta_csv)
        if not meta_csv.is_file():
            raise UserError(f"metadata CSV {meta_csv} does not exist: check --meta-csv.")
        table = read_csv(meta_csv)
        if "image_name" not in table.columns:
            raise UserError(f"{meta_csv} lacks the column image_name: name each row's image in a column image_name.")
        table = table.drop(columns=[c for c in ("filepath",) if c in table.columns])
        table["image_name"] = table["image_name"].astype(str).map(image_name)
        repeated = table["image_name"][table["image_name"].duplicated()]
        if not repeated.empty:
            raise UserError(f"{meta_csv} lists image {repeated.iloc[0]} twice: remove the duplicate row.")
        absent = sorted(set(frame["image_name"]) - set(table["image_name"]))
        if absent:
            raise UserError(
                f"{meta_csv} has no row for {len(absent)} image(s), first {absent[0]}: add their rows or leave those "
                "images out."
            )
        frame = frame.merge(table, on="image_name", how="left", validate="one_to_one")
        if "age_approx" in frame.columns:
            # the rule of the data folder's CSV reader: an impossible age is a typo only the user can resolve
            bad = implausible_ages(frame["age_approx"])
            if bad.any():
                raise UserError(
                    f"{meta_csv} gives age_approx {frame['age_approx'][bad].iloc[0]!r} for image "
                    f"{frame['image_name'][bad].iloc[0]}: {AGE_RULE}, or empty."
                )
            frame["age_approx"] = pd.to_numeric(frame["age_approx"], errors="coerce")
    for column, value in (values or {}).items():
        if value is not None:
            frame[column] = value
    return frame


def require_metadata(
    frame: pd.DataFrame,
    models: Sequence[LoadedModel],
    allow_missing: bool,
    source: str,
    flags: dict[str, str] | None = None,
) -> None:
    """A model trained with --use-meta needs its metadata columns: refuse without them, or (when the user asks
    for it) add them empty so that the encoder's missing-value codes are used. A value its encoding does not know
    (a site it never trained with, a sex that is no spelling of male or female) is refused in the same way, or
    encoded as missing after a notice that names it: never silently. `flags` names the command-line flag a
    column's value came from (e.g. {SITE_COLUMN: "--site"}), for the messages."""
    flags = flags or {}
    for loaded in models:
        absent = [column for column in loaded.meta_columns if column not in frame.columns]
        if absent and not allow_missing:
            raise UserError(
                f"{loaded.path} was trained with --use-meta and {source} has no {', '.join(absent)}: give the "
                "metadata (--meta-csv, or --sex/--age/--site), or --allow-missing-meta to encode it as missing."
            )
        for column in absent:
            frame[column] = np.nan
        for column, value, rows in loaded.encoder.unrecognised(frame) if loaded.encoder is not None else []:
            known = ", ".join(loaded.encoder.known_values(column)) or "none"
            known += ", or M/F" if column == "sex" else ""
            if column in flags:
                given = f"{flags[column]} {value!r}"
            else:
                first = frame["image_name"][rows].iloc[0]
                given = f"{source} gives {column} {value!r} (for {int(rows.sum())} image(s), first {first}), which"
            unknown = f"{given} is not a value {loaded.path} was trained with (it knows {known}, in any case)"
            if not allow_missing:
                raise UserError(f"{unknown}: use one of those, or pass --allow-missing-meta to encode it as missing.")
            print(f"notice: {unknown}: encoded as missing.", flush=True)
