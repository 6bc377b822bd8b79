"""Inference shared by predict.py, evaluate.py, audit.py and ensemble.py: a melanoma model rebuilt from its
checkpoint with its own input encoding, test-time augmentation over the eight symmetries of the square, image
tables with metadata from a CSV or from flags, ensembling, and the runtime flags of the scripts that score."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from checkpoints import describe_split, fold_split, load_checkpoint
from dataset import EpochSampler, ImageDataset, Preprocessing, valid_transforms
from features import FeatureScaler, side_inputs
from image_files import IMAGE_EXTENSIONS, list_images
from loops import make_loader, predict_logits
from metadata import MetaEncoder
from models import MetadataLogit, melanoma_probability, model_from_checkpoint
from shared_flags import add_device_flags, add_num_workers_flag
from tables import AGE_RULE, SITE_COLUMN, implausible_ages, read_csv
from utils import (
    UserError,
    ensure_writable_dir,
    refuse_folder,
    resolve_precision,
    select_device,
    set_visible_devices,
    temp_files_of,
)

MAX_TTA = 8
# the CSV column each metadata feature is encoded from (n_images falls back to one image per patient)
META_COLUMNS = {"sex": "sex", "age": "age_approx", "site": SITE_COLUMN}


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A melanoma network with what is needed to feed it: resolution, normalisation, preprocessing (colour
    constancy, the square rule) and the fitted metadata encoding, all read from its checkpoint."""

    path: Path
    model: nn.Module
    image_size: int
    mean: list[float]
    std: list[float]
    encoder: MetaEncoder | None
    info: dict = field(default_factory=dict)  # the checkpoint's fold, n_folds, val_images, refit, config, epoch, ...
    feature_scaler: FeatureScaler | None = None  # lesion features (train.py --lesion-features), else None
    meta_model: MetadataLogit | None = None  # --fusion late: the metadata's logistic regression, else None
    preprocessing: Preprocessing = Preprocessing()  # a checkpoint from before it: none / stretch, as it trained

    @property
    def meta_columns(self) -> list[str]:
        return meta_columns(self.encoder)

    @property
    def uses_lesion_features(self) -> bool:
        return self.feature_scaler is not None


def meta_columns(encoder: MetaEncoder | None) -> list[str]:
    """The CSV columns a model's metadata encoding reads (none without metadata)."""
    if encoder is None:
        return []
    return [META_COLUMNS[feature] for feature in encoder.features if feature in META_COLUMNS]


def load_melanoma_model(path: str | Path, device: torch.device, channels_last: bool = False) -> LoadedModel:
    """Loads a train.py checkpoint (weights_only) and rebuilds its model and metadata encoding from it alone."""
    path = Path(path)
    checkpoint = load_checkpoint(path, "melanoma")
    missing = [key for key in ("image_size", "mean", "std", "use_meta", "meta_encoder") if key not in checkpoint]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: use a checkpoint written by train.py.")
    model = model_from_checkpoint(checkpoint, path).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    encoder = MetaEncoder.from_state_dict(checkpoint["meta_encoder"]) if checkpoint["use_meta"] else None
    info_keys = ("fold", "n_folds", "val_images", "refit", "config", "epoch", "metrics", "data_sha256")
    info = {key: checkpoint.get(key) for key in info_keys}
    scaler_state = checkpoint.get("lesion_features")
    feature_scaler = FeatureScaler.from_state_dict(scaler_state) if scaler_state else None
    meta_state = checkpoint.get("meta_model")
    meta_model = MetadataLogit.from_state_dict(meta_state) if meta_state else None
    return LoadedModel(
        path,
        model,
        int(checkpoint["image_size"]),
        list(checkpoint["mean"]),
        list(checkpoint["std"]),
        encoder,
        info,
        feature_scaler,
        meta_model,
        Preprocessing.from_checkpoint(checkpoint, path),
    )


def held_out_images(loaded: LoadedModel, fix: str) -> set[str]:
    """The names of the images `loaded` validated on, so never trained on, as train.py stored them: fold
    membership is read, never rebuilt (a rebuilt split would follow today's code and flags, not the run's)."""
    names = loaded.info.get("val_images")
    if loaded.info.get("refit"):
        raise UserError(
            f"checkpoint {loaded.path} is a refit on every training image (train.py --fold none): it held out none, "
            f"so nothing it scores there is unseen; use a cross-validated fold checkpoint, or {fix}."
        )
    if names is None:
        raise UserError(
            f"checkpoint {loaded.path} does not list its validation images (an older train.py wrote it): retrain "
            f"it, or {fix}."
        )
    return set(names)


def is_refit(path: Path) -> bool:
    """Whether a melanoma checkpoint was trained on every row (train.py --fold none)."""
    return bool(load_checkpoint(path, "melanoma").get("refit"))


def expand_model_paths(specs: Sequence[str], which: str = "best") -> list[Path]:
    """Each spec is a checkpoint file, or a run given as <model-dir>/<save-name>: that run's
    <save-name>_<which>.pth, or the checkpoints of all its folds, <save-name>_fold<k>_<which>.pth. A refit
    (train.py --fold none) has no best epoch: for which="best" its <save-name>_final.pth is taken, with a notice."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            paths.append(path)
            continue
        pattern = re.compile(re.escape(path.name) + rf"_fold(\d+)_{which}\.pth")
        folds = sorted(
            (int(match.group(1)), candidate)
            for candidate in (path.parent.glob(f"{path.name}_fold*_{which}.pth") if path.parent.is_dir() else [])
            if (match := pattern.fullmatch(candidate.name))
        )
        single = path.parent / f"{path.name}_{which}.pth"
        final = path.parent / f"{path.name}_final.pth"
        if folds:
            paths += [candidate for _, candidate in folds]
        elif single.is_file():
            paths.append(single)
        elif which == "best" and final.is_file() and is_refit(final):
            print(f"notice: {path} is a refit (train.py --fold none), which has no best epoch: using {final}.")
            paths.append(final)
        else:
            raise UserError(
                f"no checkpoint {path}, nor {single.name} or {path.name}_fold<k>_{which}.pth beside it: pass a .pth "
                "file or <model-dir>/<save-name> of a train.py run."
            )
    return paths


def check_one_split(spec: str, folds: Sequence[LoadedModel]) -> None:
    """The fold checkpoints a run prefix names are one run: one split (checkpoints.fold_split), each fold once, and
    (what a split means) no image validated by two of them. A UserError names the first that does not fit."""
    for index, loaded in enumerate(folds):
        for earlier in folds[:index]:
            if loaded.info.get("fold") == earlier.info.get("fold"):
                raise UserError(
                    f"{spec} holds fold {loaded.info.get('fold')} twice, in {earlier.path} and {loaded.path}: remove "
                    "the stray file, or retrain the run with --overwrite."
                )
            split, other = fold_split(loaded.info), fold_split(earlier.info)
            shared = set(loaded.info.get("val_images") or []) & set(earlier.info.get("val_images") or [])
            if split != other or shared:
                raise UserError(
                    f"{spec} mixes folds of different splits: {loaded.path} ({describe_split(split)}) does not fit "
                    f"{earlier.path}{f' (both validated on {min(shared)})' if shared else ''}: remove the stray file, "
                    "or retrain the run with --overwrite."
                )


def load_melanoma_models(
    specs: Sequence[str],
    which: str,
    device: torch.device,
    channels_last: bool = False,
    load: Callable[[Path, torch.device, bool], Any] = load_melanoma_model,
) -> list:
    """The models `specs` name (files, or run prefixes: expand_model_paths), each read by `load` (predict.py's
    also reads exported files: onnx_model.load_scoring_model); the folds of one run prefix must be one run
    (check_one_split)."""
    models = []
    for spec in specs:
        loaded = [load(path, device, channels_last) for path in expand_model_paths([spec], which)]
        if not Path(spec).is_file():
            check_one_split(spec, loaded)
        models += loaded
    return models


# --------------------------------------------------------------------------- test-time augmentation


def dihedral(images: torch.Tensor, index: int) -> torch.Tensor:
    """The index-th of the 8 symmetries of the square, in the 1st-place order: 0 identity, 1 vertical flip,
    2 horizontal flip, 3 both (a half turn); 4-7 the same after a transpose. `images` is (N, C, H, W)."""
    if index >= 4:
        images = images.transpose(2, 3)
    if index % 4 in (1, 3):
        images = images.flip(2)
    if index % 4 in (2, 3):
        images = images.flip(3)
    return images


def check_n_tta(n_tta: int) -> None:
    if not 1 <= n_tta <= MAX_TTA:
        raise UserError(f"--n-tta {n_tta} is outside 1..{MAX_TTA}: the square has {MAX_TTA} symmetries.")


class TTAModel(nn.Module):
    """Scores every image under the first `n_tta` dihedral transforms in ONE forward pass of n_tta x batch images,
    and returns logits whose probability is the mean of the per-transform probabilities. Because the output
    is still a logit, utils.predict_logits and train.melanoma_probability work on it unchanged. A single output is
    a sigmoid logit and several are one softmax, unless `independent_heads` says that every output is a sigmoid
    logit of its own (the artifact detector's heads): then each head's probability is averaged."""

    def __init__(self, model: nn.Module, n_tta: int, independent_heads: bool = False) -> None:
        super().__init__()
        check_n_tta(n_tta)
        self.model, self.n_tta, self.independent_heads = model, n_tta, independent_heads

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_tta == 1:
            return self.model(image, meta)
        batch = image.shape[0]
        views = torch.cat([dihedral(image, index) for index in range(self.n_tta)])
        if image.is_contiguous(memory_format=torch.channels_last):
            views = views.contiguous(memory_format=torch.channels_last)
        logits = self.model(views, None if meta is None else meta.repeat(self.n_tta, 1))
        # average in probability space, in float64 so that the logit of the mean stays exact
        with torch.autocast(image.device.type, enabled=False):
            logits = logits.double().view(self.n_tta, batch, -1)
            if logits.shape[-1] == 1 or self.independent_heads:
                return mean_probability_logit(logits).float()
            return torch.softmax(logits, dim=-1).mean(0).log().float()


def encode_metadata(loaded: LoadedModel, frame: pd.DataFrame) -> np.ndarray | None:
    """The model's metadata encoding of the rows of `frame` (None for an image-only model). Images per patient are
    counted over `frame`: encode every scored row at once, then pass slices of it (`meta=`) to score subsets."""
    return None if loaded.encoder is None else loaded.encoder.transform(frame)


def mean_probability_logit(log_odds: torch.Tensor) -> torch.Tensor:
    """The log-odds of the mean probability over the first axis (the TTA views), computed in float64 so that the
    logit of the mean stays exact."""
    return torch.logit(torch.sigmoid(log_odds.double()).mean(0))


def make_dataset(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    transform=None,
    augment_seed: int | None = None,
    lesion: np.ndarray | None = None,
    meta: np.ndarray | None = None,
) -> ImageDataset:
    """The images of `frame` (column filepath) as this model sees them (its preprocessing, resolution and
    normalisation), with its metadata encoding and lesion features (computed from the files, so a `transform`
    that edits pixels does not reach them; pass `lesion`, the unscaled features of the rows of `frame` under the
    model's preprocessing, to reuse them across models, and `meta`, their encode_metadata rows, to encode a subset
    as part of a larger table)."""
    # under late fusion the metadata goes to the logistic regression, not into the network
    network_encoder = None if loaded.meta_model is not None else loaded.encoder
    meta = side_inputs(frame, network_encoder, loaded.feature_scaler, lesion, meta, loaded.preprocessing)
    transform = transform or valid_transforms(loaded.image_size, loaded.mean, loaded.std, loaded.preprocessing)
    return ImageDataset(frame["filepath"], transform, meta, augment_seed=augment_seed)


def predict_probabilities(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    n_tta: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    channels_last: bool = False,
    transform=None,
    augment_seed: int | None = None,
    progress: bool | None = None,
    lesion: np.ndarray | None = None,
    meta: np.ndarray | None = None,
) -> np.ndarray:
    """P(melanoma) per row of `frame`, in row order, averaged over `n_tta` dihedral transforms. `lesion` and `meta`:
    the rows' lesion features and encoded metadata when computed beforehand (see make_dataset).

    `batch_size` counts the images of one forward pass, TTA views included: each loader batch holds
    batch_size / n_tta images. A forward pass then costs what a bare one of batch_size images does; eight times
    larger passes run slower per image on a CPU (the activations outgrow its caches)."""
    if meta is None:
        meta = encode_metadata(loaded, frame)
    dataset = make_dataset(loaded, frame, transform, augment_seed, lesion, meta)
    images_per_batch = max(1, batch_size // n_tta)
    sampler = EpochSampler(len(dataset), shuffle=False, seed=0)
    loader = make_loader(dataset, sampler, images_per_batch, num_workers, device)
    tta_model = TTAModel(loaded.model, n_tta)
    logits, _ = predict_logits(tta_model, loader, device, amp_dtype, channels_last, progress, desc="predict")
    evidence = loaded.meta_model.evidence(meta) if loaded.meta_model is not None else None
    return melanoma_probability(logits, evidence)


def combine(probabilities: Sequence[np.ndarray], rank_average: bool = False) -> np.ndarray:
    """Ensembles models: the mean probability, or the mean of each model's ranks scaled to (0, 1], which ignores
    how differently calibrated the models are (it orders images well but is no longer a probability). NaN marks
    a row a model did not score: that row's mean is over the other models, and the model's ranks over its own
    rows. Every row needs at least one score."""
    stack = np.stack([np.asarray(probs, dtype=float) for probs in probabilities])
    if rank_average:
        stack = np.stack([pd.Series(probs).rank(pct=True).to_numpy() for probs in stack])
    return np.nanmean(stack, axis=0)


# --------------------------------------------------------------------------- image tables and metadata


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


# --------------------------------------------------------------------------- runtime flags


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Device, precision and loading flags shared by predict.py, evaluate.py, audit.py and ensemble.py."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass, TTA views included")
    add_num_workers_flag(parser)
    add_device_flags(parser)


def prediction_options(args: argparse.Namespace) -> dict:
    """The runtime flags as predict_probabilities' keyword arguments (predict.py's, audit.py's, ensemble.py's)."""
    return {
        "n_tta": args.n_tta,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "channels_last": args.channels_last,
        "progress": args.progress,
    }


def check_runtime_counts(args: argparse.Namespace) -> None:
    """--batch-size, --num-workers and (where the script has it) --n-tta, refused in one sentence when they would
    score nothing or fail in the loader."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1.")
    if args.num_workers < 0:
        raise UserError(f"--num-workers {args.num_workers} must be 0 or more.")
    check_n_tta(getattr(args, "n_tta", 1))


def prepare_runtime(args: argparse.Namespace):
    """Device and autocast dtype from the shared flags, after the counts among them are checked."""
    check_runtime_counts(args)
    set_visible_devices(args.CUDA_VISIBLE_DEVICES)
    device = select_device(args.device)
    return device, resolve_precision(args.precision, device)


def check_output(
    path: Path, overwrite: bool, alternative: str = "choose another --out", example: str = "predictions.csv"
) -> None:
    """Refuses to replace an earlier result unless asked, and checks the folder is writable before any work (a
    folder given as the file is refused with `example` as a file name). Deletes the temporary files that a killed
    earlier write of `path` left beside it: they are never a finished result."""
    refuse_folder(path, "--out", example)
    for leftover in temp_files_of(path):
        leftover.unlink(missing_ok=True)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists: pass --overwrite to replace it, or {alternative}.")
    ensure_writable_dir(path.parent, "output folder")
