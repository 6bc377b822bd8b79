"""Inference shared by predict.py, evaluate.py and audit.py: a melanoma model rebuilt from its checkpoint with
its own input encoding, test-time augmentation over the eight symmetries of the square, image tables with
metadata from a CSV or from flags, and ensembling."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from checkpoints import describe_split, fold_split, load_checkpoint
from dataset import EpochSampler, ImageDataset, valid_transforms
from features import FeatureScaler, side_inputs
from image_files import IMAGE_EXTENSIONS, list_images
from loops import make_loader, predict_logits
from models import MetadataLogit, melanoma_probability, model_from_checkpoint
from tables import AGE_RULE, SITE_COLUMN, MetaEncoder, implausible_ages, read_csv
from utils import UserError

MAX_TTA = 8
# the CSV column each metadata feature is encoded from (n_images falls back to one image per patient)
META_COLUMNS = {"sex": "sex", "age": "age_approx", "site": SITE_COLUMN}


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """A melanoma network with what is needed to feed it: resolution, normalisation and the fitted metadata
    encoding, all read from its checkpoint."""

    path: Path
    model: nn.Module
    image_size: int
    mean: list[float]
    std: list[float]
    encoder: MetaEncoder | None
    info: dict = field(default_factory=dict)  # the checkpoint's fold, n_folds, val_images, config, epoch, metrics, ...
    feature_scaler: FeatureScaler | None = None  # lesion features (train.py --lesion-features), else None
    meta_model: MetadataLogit | None = None  # --fusion late: the metadata's logistic regression, else None

    @property
    def meta_columns(self) -> list[str]:
        if self.encoder is None:
            return []
        return [META_COLUMNS[feature] for feature in self.encoder.features if feature in META_COLUMNS]


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
    info_keys = ("fold", "n_folds", "val_images", "config", "epoch", "metrics", "data_sha256")
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
    )


def held_out_images(loaded: LoadedModel, fix: str) -> set[str]:
    """The names of the images `loaded` validated on, so never trained on, as train.py stored them: fold
    membership is read, never rebuilt (a rebuilt split would follow today's code and flags, not the run's)."""
    names = loaded.info.get("val_images")
    if names is None:
        raise UserError(
            f"checkpoint {loaded.path} does not list its validation images (an older train.py wrote it): retrain "
            f"it, or {fix}."
        )
    return set(names)


def expand_model_paths(specs: Sequence[str], which: str = "best") -> list[Path]:
    """Each spec is a checkpoint file, or a run given as <model-dir>/<save-name>: that run's
    <save-name>_<which>.pth, or the checkpoints of all its folds, <save-name>_fold<k>_<which>.pth."""
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
        if folds:
            paths += [candidate for _, candidate in folds]
        elif single.is_file():
            paths.append(single)
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
    specs: Sequence[str], which: str, device: torch.device, channels_last: bool = False
) -> list[LoadedModel]:
    """The models `specs` name (files, or run prefixes: expand_model_paths), loaded; the folds of one run prefix
    must be one run (check_one_split)."""
    models: list[LoadedModel] = []
    for spec in specs:
        loaded = [load_melanoma_model(path, device, channels_last) for path in expand_model_paths([spec], which)]
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


class TTAModel(nn.Module):
    """Scores every image under the first `n_tta` dihedral transforms in ONE forward pass of n_tta x batch images,
    and returns logits whose probability is the mean of the per-transform probabilities. Because the output
    is still a logit, utils.predict_logits and train.melanoma_probability work on it unchanged."""

    def __init__(self, model: nn.Module, n_tta: int) -> None:
        super().__init__()
        if not 1 <= n_tta <= MAX_TTA:
            raise UserError(f"--n-tta {n_tta} is outside 1..{MAX_TTA}: the square has {MAX_TTA} symmetries.")
        self.model, self.n_tta = model, n_tta

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
            if logits.shape[-1] == 1:
                return torch.logit(torch.sigmoid(logits).mean(0)).float()
            return torch.softmax(logits, dim=-1).mean(0).log().float()


def make_dataset(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    transform=None,
    augment_seed: int | None = None,
    lesion: np.ndarray | None = None,
) -> ImageDataset:
    """The images of `frame` (column filepath) as this model sees them, with its metadata encoding and lesion
    features (computed from the files, so a `transform` that edits pixels does not reach them; pass `lesion`, the
    unscaled features of the rows of `frame`, to reuse them across models)."""
    # under late fusion the metadata goes to the logistic regression, not into the network
    network_encoder = None if loaded.meta_model is not None else loaded.encoder
    meta = side_inputs(frame, network_encoder, loaded.feature_scaler, lesion)
    transform = transform or valid_transforms(loaded.image_size, loaded.mean, loaded.std)
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
) -> np.ndarray:
    """P(melanoma) per row of `frame`, in row order, averaged over `n_tta` dihedral transforms.

    `batch_size` counts the images of one forward pass, TTA views included: each loader batch holds
    batch_size / n_tta images. A forward pass then costs what a bare one of batch_size images does; eight times
    larger passes run slower per image on a CPU (the activations outgrow its caches)."""
    dataset = make_dataset(loaded, frame, transform, augment_seed, lesion)
    images_per_batch = max(1, batch_size // n_tta)
    sampler = EpochSampler(len(dataset), shuffle=False, seed=0)
    loader = make_loader(dataset, sampler, images_per_batch, num_workers, device)
    tta_model = TTAModel(loaded.model, n_tta)
    logits, _ = predict_logits(tta_model, loader, device, amp_dtype, channels_last, progress, desc="predict")
    evidence = loaded.meta_model.evidence(loaded.encoder.transform(frame)) if loaded.meta_model is not None else None
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


def require_metadata(frame: pd.DataFrame, models: Sequence[LoadedModel], allow_missing: bool, source: str) -> None:
    """A model trained with --use-meta needs its metadata columns: refuse without them, or (when the user asks
    for it) add them empty so that the encoder's missing-value codes are used."""
    for loaded in models:
        absent = [column for column in loaded.meta_columns if column not in frame.columns]
        if not absent:
            continue
        if not allow_missing:
            raise UserError(
                f"{loaded.path} was trained with --use-meta and {source} has no {', '.join(absent)}: give the "
                "metadata (--meta-csv, or --sex/--age/--site), or --allow-missing-meta to encode it as missing."
            )
        for column in absent:
            frame[column] = np.nan
