"""Data for both trainers: the Kaggle-layout CSVs, the 1st-place metadata encoding, patient-grouped folds,
the augmentations, artifact annotation files, and one Dataset that fuses images with metadata."""

from __future__ import annotations

import csv
import io
import math
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath
from typing import BinaryIO

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold  # noqa: E402

from utils import UserError  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_FEATURES = ("sex", "age", "site", "n_images", "image_size")
SITE_COLUMN = "anatom_site_general_challenge"
MIN_IMAGE_SIZE = 32
MAX_MEGAPIXELS = 100  # far beyond any dermoscope; a larger file is a mistake or a decompression bomb
MAX_AGE = 120
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

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


def is_plain_name(name: str) -> bool:
    """True for a bare file name: no folder part (/ or \\), not . or .., no drive (C:) and no NUL byte, so that
    a path built from it stays inside its image folder."""
    return (
        bool(name)
        and not any(character in name for character in "/\\\0")
        and name not in (".", "..")
        and not PureWindowsPath(name).drive
    )


def _cell_text(value: object) -> str:
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
    if not data_dir.is_dir():
        raise UserError(f"data folder {data_dir} does not exist: pass --data-dir with the unpacked Kaggle folder.")
    if split == "train":
        csv_path = find_train_csv(data_dir)
    else:
        csv_path = data_dir / "test.csv"
        if not csv_path.is_file():
            raise UserError(f"no test.csv in {data_dir}: the Kaggle folder has test.csv beside train.csv.")
    frame = read_csv(csv_path)
    required = ["image_name"]
    if require_target:
        required.append("target")
    if use_meta:
        required += ["sex", "age_approx", SITE_COLUMN]
    _require_columns(frame, required, csv_path)

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
    if require_target:
        target = pd.to_numeric(frame["target"], errors="coerce")
        bad = ~target.isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(
                f"{csv_path} line {row + 2} has target {_cell_text(frame['target'].iloc[row])!r}: targets must be 0 "
                "or 1."
            )
        frame["target"] = target.astype(int)
    if "age_approx" in frame.columns:
        # refused rather than treated as missing: an age of -5, 999 or inf is a typo or a unit mix-up that
        # only the user can resolve, and a silently dropped age would change the model's input unnoticed
        age = pd.to_numeric(frame["age_approx"], errors="coerce")
        bad = frame["age_approx"].notna() & ~age.between(0, MAX_AGE)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(
                f"{csv_path} line {row + 2} has age_approx {_cell_text(frame['age_approx'].iloc[row])!r}: ages must be "
                f"numbers from 0 to {MAX_AGE}, or empty."
            )
        frame["age_approx"] = age

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
    return frame.reset_index(drop=True)


# JPEG start-of-frame markers, which hold the image size: C0-CF but DHT (C4), JPG (C8) and DAC (CC)
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its fixed CRC


def image_dimensions(handle: BinaryIO) -> tuple[int, int] | None:
    """(width, height) from a JPEG, PNG or BMP header, nothing decoded; None when the header does not say."""
    handle.seek(0)
    head = handle.read(26)
    if head.startswith(b"\x89PNG") and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head.startswith(b"BM") and len(head) >= 26 and int.from_bytes(head[14:18], "little") >= 40:
        width, height = (int.from_bytes(head[i : i + 4], "little", signed=True) for i in (18, 22))
        return abs(width), abs(height)  # a negative height means rows stored top-down
    if not head.startswith(b"\xff\xd8"):
        return None
    handle.seek(2)
    while len(segment := handle.read(4)) == 4 and segment[0] == 0xFF:
        marker, length = segment[1], int.from_bytes(segment[2:], "big")
        if marker in _JPEG_FRAMES:
            frame = handle.read(5)  # precision, height, width
            return (int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")) if len(frame) == 5 else None
        if marker == 0xDA or length < 2:  # pixel data before any frame header: not a JPEG we can size
            return None
        handle.seek(length - 2, os.SEEK_CUR)
    return None


def _jpeg_reaches_end(data: bytes) -> bool:
    """True when the JPEG in `data` reaches its end-of-image marker. Follows the segment structure, so that bytes
    appended after the end do not matter and the end marker of a thumbnail inside the metadata does not count."""
    position = 2
    while position + 2 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF or 0xD0 <= marker <= 0xD7:  # a fill byte, or a restart marker: no length field
            position += 1 if marker == 0xFF else 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next marker; FF 00 (a stuffed FF) and restarts are data
            while (position := data.find(b"\xff", position)) != -1 and position + 1 < len(data):
                if data[position + 1] != 0 and not 0xD0 <= data[position + 1] <= 0xD7:
                    break
                position += 2
            if position == -1:
                return False
    return False


def _too_large(width: int, height: int) -> bool:
    return width * height > MAX_MEGAPIXELS * 1_000_000


def _too_large_error(path: str, width: int, height: int) -> UserError:
    return UserError(
        f"image {path} is {width}x{height} px, beyond the {MAX_MEGAPIXELS}-megapixel limit: downscale it or remove "
        "its row."
    )


def image_file_problem(path: str) -> str | None:
    """A cheap integrity check: what is wrong with the file, or None.

    Catches unreadable and empty files, files that are not JPEG or PNG, images beyond MAX_MEGAPIXELS (from the
    header), and files cut short by an interrupted copy (OpenCV would decode a truncated JPEG with a grey lower part
    and only a warning). Reads the header and the last 64 bytes; the whole file only when those lack the end
    marker, as in a truncated file or in a whole one with bytes appended after its end (which is fine).
    Undecodable content beyond that is caught when the image is loaded."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = image_dimensions(handle)
            handle.seek(max(0, os.path.getsize(path) - 64))
            tail = handle.read()
        if not head:
            return "empty file"
        if size and _too_large(*size):
            return f"{size[0]}x{size[1]} px, beyond the {MAX_MEGAPIXELS}-megapixel limit"
        if head.startswith(b"\xff\xd8"):
            whole = b"\xff\xd9" in tail or _jpeg_reaches_end(Path(path).read_bytes())
            return None if whole else "truncated JPEG: no end-of-image marker"
        if head.startswith(b"\x89PNG"):
            return None if b"IEND" in tail or _PNG_END in Path(path).read_bytes() else "truncated PNG"
        return "not a JPEG or PNG file"
    except OSError as error:
        return f"unreadable ({error.strerror})"


# --------------------------------------------------------------------------- metadata encoding


class MetaEncoder:
    """The 1st-place SIIM-ISIC metadata, fitted on training rows only and stored in the checkpoint.

    sex: male 1, female 0, missing -1; age: age/90, missing filled with the training median; site: one-hot
    over the training sites plus a `missing` column that also takes sites never seen in training;
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
            self.sites = sorted(frame[SITE_COLUMN].dropna().astype(str).unique().tolist())
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

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError("MetaEncoder.transform called before fit")
        columns = []
        for feature in self.features:
            if feature == "sex":
                sex = frame["sex"].astype("string").str.strip().str.lower().map({"male": 1.0, "female": 0.0})
                columns.append(sex.astype(float).fillna(-1.0).to_numpy()[:, None])
            elif feature == "age":
                age = _plausible_ages(frame).fillna(self.age_fill) / 90.0
                columns.append(age.to_numpy(dtype=float)[:, None])
            elif feature == "site":
                site = frame[SITE_COLUMN].astype("string")
                one_hot = np.zeros((len(frame), len(self.sites) + 1))
                index = {name: i for i, name in enumerate(self.sites)}
                for row, value in enumerate(site):
                    one_hot[row, index.get(value, len(self.sites)) if not pd.isna(value) else len(self.sites)] = 1
                columns.append(one_hot)
            elif feature == "n_images":
                columns.append(np.log1p(images_per_patient(frame))[:, None])
            elif feature == "image_size":
                sizes = np.array([os.path.getsize(path) for path in frame["filepath"]], dtype=float)
                columns.append(np.log(np.maximum(sizes, 1.0))[:, None])
        return np.concatenate(columns, axis=1).astype(np.float32)

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


def images_per_patient(frame: pd.DataFrame) -> np.ndarray:
    """Counts each patient's images within `frame`; a row without patient_id counts 1 (its own patient),
    so that unlabelled external images do not pool into one giant "patient" that leaks the label."""
    if "patient_id" not in frame.columns:
        return np.ones(len(frame))
    patient = frame["patient_id"].astype("string")
    counts = patient.map(patient.value_counts())
    return counts.astype(float).fillna(1.0).to_numpy()


# --------------------------------------------------------------------------- folds


def patient_groups(frame: pd.DataFrame) -> np.ndarray:
    """Group label per row: its patient_id, or a unique label for a row without one."""
    if "patient_id" not in frame.columns:
        return np.array([f"row-{i}" for i in range(len(frame))])
    patient = frame["patient_id"].astype("string")
    return np.array([f"row-{i}" if pd.isna(value) else f"pid-{value}" for i, value in enumerate(patient)])


def make_folds(frame: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row: stratified by target, grouped by patient (no patient on both sides)."""
    groups = patient_groups(frame)
    n_groups = len(set(groups))
    if n_folds < 2 or n_groups < n_folds:
        raise UserError(f"--n-folds {n_folds} needs at least 2 folds and as many patients ({n_groups} here).")
    largest_class = int(frame["target"].value_counts().max())
    if largest_class < n_folds:  # StratifiedGroupKFold needs one class with an image in every fold
        raise UserError(
            f"--n-folds {n_folds} needs at least {n_folds} images of one class, the largest class has "
            f"{largest_class}: use fewer folds or add images."
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(frame), -1, dtype=int)
    with warnings.catch_warnings():
        # "the least populated class has only N members": a fold without one class is refused in one sentence
        # where it matters (train.py's validation fold), not in a library warning ahead of it
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for fold, (_, valid_index) in enumerate(splitter.split(np.zeros(len(frame)), frame["target"], groups)):
            folds[valid_index] = fold
    return folds


# --------------------------------------------------------------------------- augmentations


AUGMENTATIONS = ("full", "light", "none")


def train_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    strength: str = "full",
):
    """Training augmentation. "full" is the 1st-place SIIM-ISIC pipeline in the albumentations 2.x API; "light"
    keeps only geometric changes (flips, transposes, any rotation, small shift and scale, reflected borders):
    colour is much of the signal, and a
    network learning from random weights on a small set does not get past colour jitter, blur and cutout;
    "none" only resizes and normalises.

    The resize comes first rather than last: every later step then works on image_size pixels instead of the
    file's, which is several times cheaper when training below the stored resolution, and equivalent in
    distribution. ElasticTransform uses its approximate form (about 5x faster, same look).
    """
    resize, normalize = A.Resize(image_size, image_size), A.Normalize(mean=tuple(mean), std=tuple(std))
    dihedral = [A.Transpose(p=0.5), A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)]
    jitter = A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75)
    hsv = A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5)
    affine = A.Affine(
        translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), border_mode=cv2.BORDER_CONSTANT, p=0.85
    )
    if strength == "none":
        return A.Compose([resize, normalize])
    if strength == "light":
        # reflected borders: a black constant border paints fake dark corners, a melanoma confound in real data
        rotate = A.Affine(
            translate_percent=(-0.05, 0.05),
            scale=(0.9, 1.1),
            rotate=(-180, 180),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.85,
        )
        return A.Compose([resize, *dihedral, rotate, normalize])
    if strength != "full":
        raise UserError(f"unknown augmentation strength {strength!r}: choose one of {', '.join(AUGMENTATIONS)}.")
    return A.Compose(
        [
            resize,
            *dihedral,
            jitter,
            A.OneOf(
                [
                    A.MotionBlur(blur_limit=5),
                    A.MedianBlur(blur_limit=5),
                    A.GaussianBlur(blur_limit=(3, 5)),
                    A.GaussNoise(std_range=(math.sqrt(5) / 255, math.sqrt(30) / 255)),
                ],
                p=0.7,
            ),
            A.OneOf(
                [
                    A.OpticalDistortion(distort_limit=0.5),
                    A.GridDistortion(num_steps=5, distort_limit=0.5),
                    A.ElasticTransform(alpha=3, approximate=True),
                ],
                p=0.7,
            ),
            A.CLAHE(clip_limit=4.0, p=0.7),
            hsv,
            affine,
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=(0.375, 0.375), hole_width_range=(0.375, 0.375), p=0.7
            ),
            normalize,
        ]
    )


def valid_transforms(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    return A.Compose([A.Resize(image_size, image_size), A.Normalize(mean=tuple(mean), std=tuple(std))])


# --------------------------------------------------------------------------- images and the Dataset


# decoded at 1/8, 1/4 or 1/2 scale (libjpeg scales in the DCT, a fraction of the work) when the reduced image still
# has REDUCE_MARGIN times the side the caller needs, so the final resize looks the same; the usual 256 px files
# at 64-256 px are decoded in full
_REDUCED_READS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
REDUCE_MARGIN = 4


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """Reads an image as RGB uint8; a file that cannot be read or decoded, or is below MIN_IMAGE_SIZE or beyond
    MAX_MEGAPIXELS, is a UserError naming it. `size`: the side the caller resizes to, for a reduced decode of a
    much larger file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"image {path} cannot be read ({error.strerror}): restore it or remove its row.") from None
    dimensions = image_dimensions(io.BytesIO(data))
    if dimensions and _too_large(*dimensions):
        raise _too_large_error(path, *dimensions)
    flag = cv2.IMREAD_COLOR
    if dimensions and size:
        factors = (read for factor, read in _REDUCED_READS if min(dimensions) >= REDUCE_MARGIN * factor * size)
        flag = next(factors, cv2.IMREAD_COLOR)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag) if data else None
    except cv2.error:
        image = None
    if image is None:
        raise UserError(f"image {path} cannot be decoded: replace the file or remove its row.")
    if _too_large(image.shape[1], image.shape[0]):  # a format whose header image_dimensions does not read
        raise _too_large_error(path, image.shape[1], image.shape[0])
    if min(image.shape[:2]) < MIN_IMAGE_SIZE:
        raise UserError(
            f"image {path} is {image.shape[1]}x{image.shape[0]} px, below the {MIN_IMAGE_SIZE} px minimum: "
            "remove it or use the full-size file."
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_side(transform) -> int | None:
    """The side an albumentations pipeline's first Resize makes (what read_image may decode down to), or None."""
    resize = next((step for step in getattr(transform, "transforms", []) if isinstance(step, A.Resize)), None)
    return None if resize is None else max(resize.height, resize.width)


class ImageDataset(torch.utils.data.Dataset):
    """Images with optional metadata and targets, as dicts {"image", "meta"?, "target"?}.

    targets may be 1-D (melanoma 0/1) or 2-D (one column per artifact head, NaN where not annotated).

    With `augment_seed` set, the augmentation of an item depends only on (seed, epoch, index), never on which
    worker draws it or how many there are: runs are reproducible and a resumed run sees the same images as an
    uninterrupted one. The epoch reaches the workers inside the key, as (epoch, index) from EpochSampler.
    """

    def __init__(
        self,
        filepaths: Sequence[str],
        transform,
        meta: np.ndarray | None = None,
        targets: np.ndarray | None = None,
        augment_seed: int | None = None,
    ) -> None:
        self.filepaths = list(filepaths)
        self.transform = transform
        self.meta = None if meta is None else torch.as_tensor(meta, dtype=torch.float32)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.augment_seed = augment_seed
        self.read_size = resize_side(transform)

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.augment_seed is not None:
            state = np.random.SeedSequence([self.augment_seed, epoch, index]).generate_state(2)
            self.transform.set_random_state(np.random.default_rng(state[0]), random.Random(int(state[1])))
        image = self.transform(image=read_image(self.filepaths[index], self.read_size))["image"]
        item = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy())}
        if self.meta is not None:
            item["meta"] = self.meta[index]
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys: a shuffle that depends only on (seed, epoch), split across `world_size`
    ranks (padded by repetition so every rank gets the same number of items)."""

    def __init__(self, n_items: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n_items, self.shuffle, self.seed = n_items, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n_items / self.world_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n_items, generator=generator).tolist()
        else:
            order = list(range(self.n_items))
        total = len(self) * self.world_size
        order += order[: total - len(order)]
        for index in order[self.rank : total : self.world_size]:
            yield (self.epoch, index)


# --------------------------------------------------------------------------- artifact annotations


DEFAULT_BIAS_HEADS = ("hair_dense", "hair_short", "hair_medium", "black_frame", "ruler_mark", "other")
PROB_SUFFIX = "_prob"
_LABEL_VALUES = {"0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0, "": math.nan}


def bias_train_transforms(image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Augmentations for the artifact detector: flips, transposes, colour and mild noise, nothing that adds or
    erases an artifact. The melanoma pipeline's constant-border Affine paints black wedges (a fake black frame),
    its cutout hole can erase a ruler or paint a patch, and its blurs wipe out marks a few pixels wide at small
    image sizes: each would teach the detector wrong labels."""
    return A.Compose(
        [
            A.Resize(image_size, image_size),
            A.Transpose(p=0.5),
            A.VerticalFlip(p=0.5),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            A.GaussNoise(std_range=(math.sqrt(5) / 255, math.sqrt(30) / 255), p=0.3),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
        ]
    )


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


def read_bias_annotations(path: str | Path, img_dir: str | Path) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Reads an artifact annotation file; returns (frame, heads, labels).

    Two forms are accepted:
    - the original headerless one, lines `image_file,hair_dense,hair_short,hair_medium,black_frame,ruler_mark,other`;
    - a CSV whose header names the heads: first column the image (with or without extension), every other
      column a head, of any name and number (e.g. isic2018/bias.csv).
    The first line is a header when none of its label cells is a number.

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
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            separator = max(",;\t", key=handle.readline().count)  # Excel writes `;` in some locales
            handle.seek(0)
            lines = enumerate(csv.reader(handle, delimiter=separator), start=1)
            rows = [(number, [cell.strip() for cell in row]) for number, row in lines]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} is not a readable CSV text file ({error}): save it as UTF-8 CSV.") from None
    rows = [(number, row) for number, row in rows if any(row)]
    if not rows:
        raise UserError(f"annotation file {path} is empty: it needs one line per image, image name then 0/1 labels.")

    first_number, first = rows[0]
    if len(first) < 2:
        raise UserError(
            f"{path} line {first_number} has no label columns: each line needs the image name, then one 0/1 "
            "value per artifact head."
        )
    if not any(_is_number(cell) for cell in first[1:]):
        columns = first[1:]
        rows = rows[1:]
        for index, name in enumerate(columns, start=2):
            if not name:
                raise UserError(f"{path} line {first_number}: header column {index} has no name; name every head.")
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise UserError(f"{path} line {first_number} names head {repeated[0]} twice: give each column one name.")
        if not rows:
            raise UserError(f"{path} has a header but no rows: add one line per image.")
    else:
        if len(first) != len(DEFAULT_BIAS_HEADS) + 1:
            raise UserError(
                f"{path} line {first_number} has {len(first) - 1} labels without a header; the headerless form "
                f"has {len(DEFAULT_BIAS_HEADS)} ({','.join(DEFAULT_BIAS_HEADS)}): fix the line or add a header line "
                "naming the heads."
            )
        columns = list(DEFAULT_BIAS_HEADS)
    keep = [
        i for i, name in enumerate(columns) if not (name.endswith(PROB_SUFFIX) and name[: -len(PROB_SUFFIX)] in columns)
    ]
    heads = [columns[i] for i in keep]

    names, filepaths, numbers, labels = [], [], [], []
    seen: dict[str, int] = {}
    for number, row in rows:
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


def list_images(img_dir: str | Path) -> list[Path]:
    """Every image file (jpg, jpeg, png, bmp, either case) directly in `img_dir`, sorted by name."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise UserError(f"image folder {img_dir} does not exist: check --img_path.")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(
            f"image folder {img_dir} holds no .jpg, .jpeg, .png or .bmp files: point --img_path at the images."
        )
    return files
