"""Inference shared by predict.py, evaluate.py, audit.py and ensemble.py: a melanoma model rebuilt from its
checkpoint with its own input encoding, test-time augmentation over the eight symmetries of the square, the
MelanomaPredictor that scores images with it, and ensembling. The images and metadata to score are read by
scoring_inputs.py, the runtime flags by cli.py."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dataset import EpochSampler, ImageDataset, Preprocessing, valid_transforms
from melanoma_audit.checkpoints import describe_split, fold_split, load_checkpoint
from melanoma_audit.cli import ScoringRuntime, check_n_tta
from melanoma_audit.features import FeatureScaler, side_inputs
from melanoma_audit.loops import Loader, make_loader, predict_logits
from melanoma_audit.metadata import MetaEncoder
from melanoma_audit.tables import SITE_COLUMN
from models import MetadataLogit, melanoma_probability, model_from_checkpoint
from utils import UserError

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
    specs: Sequence[str], which: str, runtime: ScoringRuntime, load: Callable[[Path, ScoringRuntime], Any] | None = None
) -> list:
    """The predictors of the models `specs` name (files, or run prefixes: expand_model_paths), each made by `load`
    (MelanomaPredictor.from_checkpoint; predict.py's also reads exported files: onnx_model.scoring_predictor); the
    folds of one run prefix must be one run (check_one_split)."""
    load = load or MelanomaPredictor.from_checkpoint
    predictors = []
    for spec in specs:
        loaded = [load(path, runtime) for path in expand_model_paths([spec], which)]
        if not Path(spec).is_file():
            check_one_split(spec, [predictor.loaded for predictor in loaded])
        predictors += loaded
    return predictors


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


def tta_logits(
    network: nn.Module,
    batches: Callable[[EpochSampler, int], Loader],
    n_items: int,
    runtime: ScoringRuntime,
    independent_heads: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """The TTAModel logits of `n_items` images, in order: the one prediction loop of both checkpoint kinds.
    `batches(sampler, images_per_batch)` is the kind's loader; each of its batches holds batch_size / n_tta images,
    so that a forward pass of the views holds runtime.batch_size."""
    sampler = EpochSampler(n_items, shuffle=False, seed=0)
    loader = batches(sampler, max(1, runtime.batch_size // runtime.n_tta))
    tta_model = TTAModel(network, runtime.n_tta, independent_heads)
    logits, _ = predict_logits(tta_model, loader, runtime, desc)
    return logits


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
    side = side_inputs(frame, network_encoder, loaded.feature_scaler, lesion, meta, loaded.preprocessing)
    transform = transform or valid_transforms(loaded.image_size, loaded.mean, loaded.std, loaded.preprocessing)
    return ImageDataset(frame["filepath"], transform, side, augment_seed=augment_seed)


@dataclass
class Predictor:
    """What every melanoma predictor holds: the model it loaded (a LoadedModel, or onnx_model's ExportedModel) and
    the runtime it scores under. A subclass adds encode_metadata and probabilities."""

    loaded: Any
    runtime: ScoringRuntime

    @property
    def path(self) -> Path:
        return self.loaded.path

    @property
    def preprocessing(self) -> Preprocessing:
        return self.loaded.preprocessing

    @property
    def uses_lesion_features(self) -> bool:
        return self.loaded.uses_lesion_features


@dataclass
class MelanomaPredictor(Predictor):
    """A train.py checkpoint ready to score images: its network with the input encoding it trained with
    (LoadedModel: size, normalisation, preprocessing, metadata encoder, lesion-feature scaler, late-fusion
    regression) and the runtime it scores under (device, precision, TTA views, loader)."""

    loaded: LoadedModel

    @classmethod
    def from_checkpoint(cls, path: str | Path, runtime: ScoringRuntime) -> MelanomaPredictor:
        return cls(load_melanoma_model(path, runtime.device, runtime.channels_last), runtime)

    def encode_metadata(self, frame: pd.DataFrame) -> np.ndarray | None:
        return encode_metadata(self.loaded, frame)

    def probabilities(
        self,
        frame: pd.DataFrame,
        transform=None,
        augment_seed: int | None = None,
        lesion: np.ndarray | None = None,
        meta: np.ndarray | None = None,
    ) -> np.ndarray:
        """P(melanoma) per row of `frame`, in row order, averaged over the runtime's TTA views, the late-fusion
        metadata's log-odds added. `lesion` and `meta`: the rows' lesion features and encoded metadata when
        computed beforehand (see make_dataset). With n_tta views a forward pass of batch_size images costs what a
        bare one does; eight times larger passes run slower per image on a CPU (the activations outgrow its
        caches)."""
        runtime, loaded = self.runtime, self.loaded
        if meta is None:
            meta = encode_metadata(loaded, frame)
        dataset = make_dataset(loaded, frame, transform, augment_seed, lesion, meta)

        def batches(sampler: EpochSampler, images_per_batch: int) -> Loader:
            return make_loader(dataset, sampler, images_per_batch, runtime.num_workers, runtime.device)

        logits = tta_logits(loaded.model, batches, len(dataset), runtime)
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
