"""The 1st-place SIIM-ISIC metadata encoding (sex, age, site, images per patient, JPEG size), fitted on training
rows only and stored in the checkpoint."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from melanoma_audit.patients import images_per_patient
from melanoma_audit.tables import MAX_AGE, SITE_COLUMN, canonical_sex, cell_text, unknown_sex
from utils import UserError

META_FEATURES = ("sex", "age", "site", "n_images", "image_size")


class MetaEncoder:
    """The 1st-place SIIM-ISIC metadata, fitted on training rows only and stored in the checkpoint.

    sex: male 1, female 0, missing -1 (SEX_SPELLINGS: M/F in any case too); age: age/90, missing filled with the
    training median; site: one-hot over the training sites (matched in any case) plus a `missing` column that also
    takes sites never seen in training (the readers of new metadata refuse those first: `unrecognised`);
    n_images: log1p(images of the patient), a row without patient_id being a patient of its own;
    image_size: log(JPEG bytes).
    """

    def __init__(self, features: Sequence[str] = META_FEATURES) -> None:
        unknown = set(features) - set(META_FEATURES)
        if unknown:
            raise UserError(f"unknown metadata feature(s) {sorted(unknown)}: choose from {', '.join(META_FEATURES)}.")
        self.features = list(features)
        self.sites: list[str] = []
        self.age_fill = 0.0
        self.fitted = False

    def fit(self, frame: pd.DataFrame) -> MetaEncoder:
        if "site" in self.features:
            # one column per site whatever its case: "Torso" and "torso" are one site (the first spelling kept)
            first: dict[str, str] = {}
            for site in sorted(frame[SITE_COLUMN].dropna().astype(str).unique()):
                first.setdefault(site.casefold(), site)
            self.sites = list(first.values())
        if "age" in self.features:
            median = _plausible_ages(frame).median()
            self.age_fill = float(median) if not math.isnan(median) else 50.0
        self.fitted = True
        return self

    @property
    def feature_names(self) -> list[str]:
        names = []
        for feature in self.features:
            if feature == "site":
                names += [f"site_{site}" for site in self.sites] + ["site_missing"]
            else:
                names.append(feature)
        return names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def describe(self) -> dict[str, str]:
        """How each column of `transform`'s output is computed, by column name (what an exported model's user
        needs to build the vector without this code)."""
        rules = {
            "sex": "1 for male, 0 for female, -1 when missing (column sex, case-insensitive)",
            "age": f"age_approx / 90; a missing or impossible age becomes {self.age_fill:g} / 90 (the training median)",
            "n_images": "log(1 + the number of images of the patient among the images scored together; an image "
            "without patient_id counts as its own patient)",
            "image_size": "log(the image file's size in bytes)",
            "site_missing": f"1 when {SITE_COLUMN} is missing or not one of the training sites above, else 0",
        }
        rules |= {f"site_{site}": f"1 when {SITE_COLUMN} is {site!r}, else 0" for site in self.sites}
        return {name: rules[name] for name in self.feature_names}

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError("MetaEncoder.transform called before fit")
        columns = []
        for feature in self.features:
            if feature == "sex":
                sex = canonical_sex(frame["sex"]).map({"male": 1.0, "female": 0.0})
                columns.append(sex.astype(float).fillna(-1.0).to_numpy()[:, None])
            elif feature == "age":
                age = _plausible_ages(frame).fillna(self.age_fill) / 90.0
                columns.append(age.to_numpy(dtype=float)[:, None])
            elif feature == "site":
                one_hot = np.zeros((len(frame), len(self.sites) + 1))
                for row, column in enumerate(self._site_columns(frame[SITE_COLUMN])):
                    one_hot[row, len(self.sites) if column is None else column] = 1
                columns.append(one_hot)
            elif feature == "n_images":
                columns.append(np.log1p(images_per_patient(frame))[:, None])
            elif feature == "image_size":
                sizes = np.array([os.path.getsize(path) for path in frame["filepath"]], dtype=float)
                columns.append(np.log(np.maximum(sizes, 1.0))[:, None])
        return np.concatenate(columns, axis=1).astype(np.float32)

    def _site_columns(self, sites: pd.Series) -> list[int | None]:
        """The one-hot column of each cell's site, matched in any case and without surrounding spaces; None for a
        missing cell or a site not seen in training."""
        index = {name.casefold(): i for i, name in enumerate(self.sites)}
        return [None if pd.isna(value) else index.get(str(value).strip().casefold()) for value in sites]

    def known_values(self, column: str) -> list[str]:
        """The values of a categorical column ("sex" or SITE_COLUMN) that this encoding knows."""
        return ["male", "female"] if column == "sex" else list(self.sites)

    def unrecognised(self, frame: pd.DataFrame) -> list[tuple[str, str, pd.Series]]:
        """(column, value, mask of its rows) for every categorical value of `frame` that this encoding would turn
        into "missing" without it being missing: a sex that is no spelling of male or female, a site not seen in
        training (matched in any case). Empty when every value is known or missing."""
        found = []
        if "sex" in self.features and "sex" in frame.columns:
            bad = pd.Series(unknown_sex(frame["sex"]), index=frame.index)
            found += [("sex", value, bad & (frame["sex"] == value)) for value in frame["sex"][bad].unique()]
        if "site" in self.features and SITE_COLUMN in frame.columns:
            columns = self._site_columns(frame[SITE_COLUMN])
            bad = pd.Series([column is None for column in columns], index=frame.index) & frame[SITE_COLUMN].notna()
            found += [
                (SITE_COLUMN, value, bad & (frame[SITE_COLUMN] == value)) for value in frame[SITE_COLUMN][bad].unique()
            ]
        return [(column, cell_text(value), rows) for column, value, rows in found]

    def state_dict(self) -> dict:
        return {"features": list(self.features), "sites": list(self.sites), "age_fill": self.age_fill}

    @classmethod
    def from_state_dict(cls, state: dict) -> MetaEncoder:
        encoder = cls(state["features"])
        encoder.sites = list(state["sites"])
        encoder.age_fill = float(state["age_fill"])
        encoder.fitted = True
        return encoder


def _plausible_ages(frame: pd.DataFrame) -> pd.Series:
    """age_approx as numbers, NaN where missing or outside 0..MAX_AGE. The CSV readers refuse such ages; this
    keeps the encoding finite for frames built elsewhere (predict.py's --age, a caller's own table)."""
    age = pd.to_numeric(frame["age_approx"], errors="coerce").astype(float)
    return age.where(age.between(0, MAX_AGE))
