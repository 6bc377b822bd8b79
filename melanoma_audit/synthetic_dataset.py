"""Synthetic dermoscopy-like data in the Kaggle "melanoma-external-malignant-256" layout: make_synthetic_dataset,
which synthetic.py runs from the command line and the tests and export.py's parity check call.

The generated folder looks like the Kaggle one::

    out_dir/train.csv           image_name, patient_id, sex, age_approx, anatom_site_general_challenge, target
    out_dir/test.csv            the same columns without target
    out_dir/train/train/<image_name>.jpg
    out_dir/test/test/<image_name>.jpg
    out_dir/gans_biases.csv     headerless: <image_name>.jpg,hair_dense,hair_short,hair_medium,black_frame,
                                ruler_mark,other (0/1 per train image, exactly what was drawn)
    out_dir/synthetic.json      the settings and the list of files written (written first)

The folder must be new or empty: files of anyone else are never written over or mixed in. A folder that holds an
earlier synthetic data set (its synthetic.json) is replaced with --overwrite, which deletes only the files listed
there.

Both the metadata and the image carry signal about the target, neither perfectly:

* metadata: every patient belongs to a latent risk group; high-risk patients are older (mean ~65 against ~45),
  slightly more often male, and most malignant images come from them; malignant lesions sit on the torso a
  little more often.
* image: benign lesions are smaller, regular ellipses of one brown; malignant ones are larger, with an
  irregular border and two or three colour patches (black, dark brown, blue-grey). About 12% of the images
  get the look of the other class, so the image alone cannot be perfect (the image itself: synthetic_image.py).

Artifacts (hair in three kinds, dermoscope black frame, ruler strip, ink marks and stickers; synthetic_artifacts.py)
are drawn independently of the target, except the ruler, which is mildly more common on malignant images.

With odd_one_out (`--odd-one-out`) the images of one patient share a skin, a benign mole (synthetic_image's
PatientStyle) and the artifacts (one skin, one dermoscope), and a patient with several images has at most one
melanoma, which looks unlike its siblings: the "ugly duckling" that patient_context.py's features look for. The
melanoma share is then lower than malignant_fraction (a high-risk patient has one melanoma rather than mostly
melanomas).

Everything is deterministic for a given seed (numpy Generators only, no global random state).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from melanoma_audit.annotations import DEFAULT_ARTIFACT_HEADS
from melanoma_audit.synthetic_image import PatientStyle, draw_style, render_image
from melanoma_audit.tables import SITE_COLUMN
from utils import UserError

MANIFEST = "synthetic.json"
SITES = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital")
TRAIN_COLUMNS = ("image_name", "patient_id", "sex", "age_approx", SITE_COLUMN, "target")

# Site probabilities (order of SITES) for benign and malignant images.
_SITE_P_BENIGN = (0.46, 0.26, 0.15, 0.08, 0.03, 0.02)
_SITE_P_MALIGNANT = (0.58, 0.18, 0.12, 0.09, 0.02, 0.01)

_LOOK_FLIP_RATE = 0.12  # share of images drawn with the other class's look
_HIGH_RISK_MALIGNANT_P = 0.88  # P(malignant image | high-risk patient)
_MISSING_PATIENT_RATE = 0.10
_MISSING_SEX_RATE = 0.05
_MISSING_AGE_RATE = 0.05
_MISSING_SITE_RATE = 0.10
_MAX_IMAGES_PER_PATIENT = 6
_JPEG_QUALITY = 90


# --------------------------------------------------------------------------- metadata


def _patient_sizes(rng: np.random.Generator, n_rows: int, n_patients: int) -> np.ndarray:
    """Images per patient: every patient at least one, mostly 1-6, summing to n_rows."""
    n_patients = max(1, min(n_patients, n_rows))
    sizes = np.ones(n_patients, dtype=int)
    extra = n_rows - n_patients
    if extra > 0:
        weights = rng.gamma(2.0, 1.0, n_patients)
        sizes += rng.multinomial(extra, weights / weights.sum())
        # Move images away from patients over the cap where others have room (keeps groups at 1-6).
        while sizes.max() > _MAX_IMAGES_PER_PATIENT and sizes.min() < _MAX_IMAGES_PER_PATIENT:
            big = int(np.argmax(sizes))
            room = np.flatnonzero(sizes < _MAX_IMAGES_PER_PATIENT)
            sizes[big] -= 1
            sizes[int(rng.choice(room))] += 1
    return sizes


def _force_both(rng: np.random.Generator, target: np.ndarray, risky: np.ndarray, least: int) -> np.ndarray:
    """Flips a few targets so that each class has at least `least` rows (preferring plausible rows)."""
    target = target.copy()
    for cls in (1, 0):
        missing = least - int((target == cls).sum())
        if missing <= 0:
            continue
        candidates = np.flatnonzero(target != cls)
        preferred = candidates[risky[candidates] == bool(cls)]
        rest = np.setdiff1d(candidates, preferred)
        order = np.concatenate([rng.permutation(preferred), rng.permutation(rest)])
        target[order[:missing]] = cls
    return target


def _make_metadata(
    rng: np.random.Generator, n_rows: int, n_patients: int, malignant_fraction: float, patient_offset: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Metadata rows (without image_name), the latent high-risk flag per row and each row's patient (also where
    its patient_id is left blank)."""
    if n_rows == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in TRAIN_COLUMNS[1:]})
        return empty, np.zeros(0, dtype=bool), np.zeros(0, dtype=int)
    sizes = _patient_sizes(rng, n_rows, n_patients)
    n_pat = len(sizes)
    # Latent risk group: high-risk patients give malignant images with probability q_high, others q_low,
    # so that the overall malignant share is malignant_fraction.
    q_high = _HIGH_RISK_MALIGNANT_P
    p_high = float(np.clip(malignant_fraction, 0.0, 1.0))
    q_low = 0.0 if p_high >= 1.0 else p_high * (1.0 - q_high) / (1.0 - p_high)
    if q_low > q_high:  # very high malignant fractions: everyone is high risk-ish
        q_low = q_high = p_high
    patient_high = rng.random(n_pat) < p_high
    patient_age = np.where(patient_high, rng.normal(66.0, 10.0, n_pat), rng.normal(44.0, 12.0, n_pat))
    patient_male = rng.random(n_pat) < np.where(patient_high, 0.62, 0.45)

    owner = rng.permutation(np.repeat(np.arange(n_pat), sizes))
    high = patient_high[owner]
    target = (rng.random(n_rows) < np.where(high, q_high, q_low)).astype(int)

    age = patient_age[owner] + rng.choice([-5.0, 0.0, 0.0, 0.0, 5.0], size=n_rows)
    age = np.clip(np.round(age / 5.0) * 5.0, 10.0, 90.0)
    sex = np.where(patient_male[owner], "male", "female").astype(object)
    site_benign = rng.choice(len(SITES), size=n_rows, p=_SITE_P_BENIGN)
    site_malignant = rng.choice(len(SITES), size=n_rows, p=_SITE_P_MALIGNANT)
    site_index = np.where(target == 1, site_malignant, site_benign)
    site = np.array(SITES, dtype=object)[site_index]
    patient_id = np.array([f"SYNP_{patient_offset + i:04d}" for i in owner], dtype=object)

    patient_id[rng.random(n_rows) < _MISSING_PATIENT_RATE] = None
    sex[rng.random(n_rows) < _MISSING_SEX_RATE] = None
    age = np.where(rng.random(n_rows) < _MISSING_AGE_RATE, np.nan, age)
    site[rng.random(n_rows) < _MISSING_SITE_RATE] = None

    frame = pd.DataFrame(
        {
            "patient_id": patient_id,
            "sex": sex,
            "age_approx": age.astype(float),
            SITE_COLUMN: site,
            "target": target,
        }
    )
    return frame, high, owner


def _one_melanoma_per_patient(rng: np.random.Generator, target: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """A patient with several images and any melanoma drawn keeps one melanoma, on a random one of its images."""
    target = target.copy()
    for patient in np.unique(owner):
        rows = np.flatnonzero(owner == patient)
        if len(rows) > 1 and target[rows].any():
            target[rows] = 0
            target[int(rng.choice(rows))] = 1
    return target


def _shared_by_patient(rng: np.random.Generator, flags: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """The artifacts of one of a patient's images on all of them: one skin (hair) and one dermoscope (frame, ruler,
    marks) per patient, so that its images differ in the lesion rather than in what lies around it."""
    flags = flags.copy()
    for patient in np.unique(owner):
        rows = np.flatnonzero(owner == patient)
        flags[rows] = flags[int(rng.choice(rows))]
    return flags


def _artifact_flags(rng: np.random.Generator, target: np.ndarray, rate: float, force: bool) -> np.ndarray:
    """0/1 matrix (rows, len(DEFAULT_ARTIFACT_HEADS)); at most one hair type per row; ruler mildly tied to target."""
    n = len(target)
    p = float(np.clip(rate / 2.0, 0.0, 1.0))
    flags = np.zeros((n, len(DEFAULT_ARTIFACT_HEADS)), dtype=int)
    p_hair = min(p, 1.0 / 3.0)
    u = rng.random(n)
    for k in range(3):  # hair_dense, hair_short, hair_medium
        flags[:, k] = (u >= k * p_hair) & (u < (k + 1) * p_hair)
    flags[:, 3] = rng.random(n) < p
    ruler_p = np.where(target == 1, min(1.0, 1.4 * p), 0.85 * p)
    flags[:, 4] = rng.random(n) < ruler_p
    flags[:, 5] = rng.random(n) < p
    if force and n >= len(DEFAULT_ARTIFACT_HEADS) and p > 0:
        for k in range(len(DEFAULT_ARTIFACT_HEADS)):
            if flags[:, k].any():
                continue
            if k < 3:  # hair: pick a row without hair, else steal from the most common hair type
                free = np.flatnonzero(flags[:, :3].sum(axis=1) == 0)
                if len(free) == 0:
                    donor = int(np.argmax(flags[:, :3].sum(axis=0)))
                    free = np.flatnonzero(flags[:, donor] == 1)
                row = int(rng.choice(free))
                flags[row, :3] = 0
            else:
                row = int(rng.choice(n))
            flags[row, k] = 1
    return flags


# --------------------------------------------------------------------------- the data set


def _write_images(
    folder: Path,
    names: Sequence[str],
    looks: np.ndarray,
    flags: np.ndarray,
    image_size: int,
    seed_seq: np.random.SeedSequence,
    styles: Sequence[PatientStyle | None] | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    styles = styles if styles is not None else [None] * len(names)
    for name, look, row, child, style in zip(names, looks, flags, seed_seq.spawn(len(names)), styles, strict=True):
        rgb = render_image(np.random.default_rng(child), image_size, bool(look), row, style)
        if not cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"could not write {folder / f'{name}.jpg'}")


def claim_folder(out: Path, overwrite: bool) -> None:
    """Makes `out` ready for a data set: new or empty, or (with `overwrite`) holding an earlier synthetic data set
    and nothing else, whose files are then deleted. Refused otherwise, before anything is touched: a real data
    folder (the Kaggle one holds train_concat.csv, which a new train.csv would shadow) is never written into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: choose a new or empty folder for the synthetic data set.")
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    try:
        written = {out / name for name in json.loads(manifest.read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{out} is not empty and holds no synthetic data set of this script ({MANIFEST}): choose a new or empty "
            "folder; nothing in it was touched."
        ) from None
    if not overwrite:
        raise UserError(
            f"{out} holds an earlier synthetic data set: pass --overwrite to replace it, or choose a new or empty "
            "folder."
        )
    others = sorted(p for p in out.rglob("*") if p.is_file() and p not in written and p != manifest)
    if others:
        raise UserError(
            f"{out} holds files this script did not write, e.g. {others[0]}: move them out, or choose a new or empty "
            "folder; nothing in it was touched."
        )
    for path in written:
        path.unlink(missing_ok=True)
    manifest.unlink()
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def make_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = 400,
    n_test: int = 100,
    image_size: int = 256,
    seed: int = 0,
    malignant_fraction: float = 0.3,
    artifact_rate: float = 0.3,
    n_patients: int | None = None,
    overwrite: bool = False,
    odd_one_out: bool = False,
) -> Path:
    """Writes a synthetic data set in the Kaggle melanoma-external-malignant-256 layout.

    Writes out_dir/train.csv, out_dir/test.csv, out_dir/train/train/<image_name>.jpg,
    out_dir/test/test/<image_name>.jpg, and out_dir/gans_biases.csv; returns out_dir as Path.

    n_patients is the number of train patients (default about n_train / 3); test patients are distinct,
    about as many per image. Each artifact head is drawn with probability about artifact_rate / 2. `out_dir` must
    be new or empty, or hold an earlier synthetic data set and `overwrite` be set (claim_folder).
    The train split always holds both classes (at least min(3, n_train // 2) of each) and, from
    len(DEFAULT_ARTIFACT_HEADS) images on, at least one positive per artifact head. Deterministic for a given seed.
    odd_one_out: patients whose images share a look, with at most one melanoma each (the module's docstring); the
    default draws exactly the data set it drew before the option existed.
    """
    _check_settings(n_train, n_test, image_size, malignant_fraction, artifact_rate, n_patients)
    out = Path(out_dir)
    claim_folder(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    meta_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(meta_seq)

    n_train_patients = n_patients if n_patients is not None else max(1, round(n_train / 3))
    per_image = n_train_patients / n_train if n_train else 1.0 / 3.0
    n_split_patients = (n_train_patients, max(1, round(n_test * per_image)))
    tables, owners = _draw_tables(rng, (n_train, n_test), n_split_patients, malignant_fraction, odd_one_out)
    looks, flags = _draw_looks_and_artifacts(rng, tables, owners, artifact_rate, odd_one_out)

    settings = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": image_size}
    _write_tables(out, settings, *tables, flags[0])
    styles = _draw_styles(rng, owners, n_split_patients) if odd_one_out else (None, None)
    for split, table, look, flag, style, seed_seq in zip(
        ("train", "test"), tables, looks, flags, styles, (train_seq, test_seq), strict=True
    ):
        _write_images(out / split / split, list(table["image_name"]), look, flag, image_size, seed_seq, style)
    return out


def _check_settings(
    n_train: int,
    n_test: int,
    image_size: int,
    malignant_fraction: float,
    artifact_rate: float,
    n_patients: int | None,
) -> None:
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    if not 0.0 <= malignant_fraction <= 1.0:
        raise ValueError("malignant_fraction must be in [0, 1]")
    if not 0.0 <= artifact_rate <= 2.0:
        raise ValueError("artifact_rate must be in [0, 2]")
    if n_patients is not None and n_patients < 1:
        raise ValueError("n_patients must be >= 1")


def _draw_tables(
    rng: np.random.Generator,
    n_rows: tuple[int, int],
    n_patients: tuple[int, int],
    malignant_fraction: float,
    odd_one_out: bool,
) -> tuple[tuple[pd.DataFrame, pd.DataFrame], tuple[np.ndarray, np.ndarray]]:
    """The train and test tables (image names sorted, test patients after the train ones) and each row's patient."""
    (n_train, n_test), (n_train_patients, n_test_patients) = n_rows, n_patients
    ids = rng.choice(10_000_000, size=n_train + n_test, replace=False)
    names = np.array([f"SYN_{i:07d}" for i in ids], dtype=object)
    train, train_high, train_owner = _make_metadata(rng, n_train, n_train_patients, malignant_fraction, 0)
    test, _, test_owner = _make_metadata(rng, n_test, n_test_patients, malignant_fraction, n_train_patients)
    if odd_one_out:  # only here: the default data set stays the one drawn before this option
        for frame, owner in ((train, train_owner), (test, test_owner)):
            frame["target"] = _one_melanoma_per_patient(rng, frame["target"].to_numpy(dtype=int), owner)
    if n_train:
        train["target"] = _force_both(rng, train["target"].to_numpy(), train_high, min(3, n_train // 2))
    train.insert(0, "image_name", np.sort(names[:n_train]))
    test.insert(0, "image_name", np.sort(names[n_train:]))
    return (train, test), (train_owner, test_owner)


def _draw_looks_and_artifacts(
    rng: np.random.Generator,
    tables: tuple[pd.DataFrame, pd.DataFrame],
    owners: tuple[np.ndarray, np.ndarray],
    artifact_rate: float,
    odd_one_out: bool,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per split: each image's look (its target's, _LOOK_FLIP_RATE of them the other class's) and its artifact
    flags (at least one positive per head in train)."""
    targets = [table["target"].to_numpy(dtype=int) for table in tables]
    looks = [target ^ (rng.random(len(target)) < _LOOK_FLIP_RATE) for target in targets]
    flags = [
        _artifact_flags(rng, targets[0], artifact_rate, force=True),
        _artifact_flags(rng, targets[1], artifact_rate, force=False),
    ]
    if odd_one_out:
        flags = [_shared_by_patient(rng, split_flags, owner) for split_flags, owner in zip(flags, owners, strict=True)]
    return looks, flags


def _draw_styles(
    rng: np.random.Generator, owners: tuple[np.ndarray, np.ndarray], n_patients: tuple[int, int]
) -> tuple[list[PatientStyle], list[PatientStyle]]:
    """Per split, each image's patient style (odd_one_out): the test patients numbered after the train ones."""
    (train_owner, test_owner), (n_train_patients, n_test_patients) = owners, n_patients
    styles = [draw_style(rng) for _ in range(n_train_patients + n_test_patients)]
    return [styles[patient] for patient in train_owner], [styles[n_train_patients + patient] for patient in test_owner]


def _write_tables(out: Path, settings: dict, train: pd.DataFrame, test: pd.DataFrame, train_flags: np.ndarray) -> None:
    """synthetic.json (first: a run killed half-way leaves a folder that is still known to be this script's), the
    two CSVs and the headerless annotation file of the train images."""
    train_names, test_names = list(train["image_name"]), list(test["image_name"])
    files = ["train.csv", "test.csv", "gans_biases.csv"]
    files += [f"train/train/{name}.jpg" for name in train_names] + [f"test/test/{name}.jpg" for name in test_names]
    (out / MANIFEST).write_text(json.dumps({"written_by": "synthetic.py", **settings, "files": files}, indent=1))
    train.to_csv(out / "train.csv", index=False, columns=list(TRAIN_COLUMNS))
    test.to_csv(out / "test.csv", index=False, columns=list(TRAIN_COLUMNS[:-1]))
    with open(out / "gans_biases.csv", "w", encoding="utf-8", newline="") as handle:
        handle.writelines(
            f"{name}.jpg," + ",".join(str(int(v)) for v in row) + "\n"
            for name, row in zip(train_names, train_flags, strict=True)
        )
