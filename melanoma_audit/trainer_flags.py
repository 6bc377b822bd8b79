"""The command lines of both trainers: the flags they share, with one meaning (their defaults from config.DEFAULTS),
and each trainer's own; the device, worker, data-path, compile and overwrite flags come from cli."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dataset import AUGMENTATIONS, RESIZE_MODES
from melanoma_audit.cli import (
    MAX_TTA,
    add_compile_flag,
    add_data_path_flag,
    add_device_flags,
    add_num_workers_flag,
    add_overwrite_flag,
)
from melanoma_audit.color import COLOR_CONSTANCY
from melanoma_audit.config import DEFAULTS, RunConfig
from melanoma_audit.metadata import META_FEATURES
from models import ENET_TYPES

AddFlag = Callable[..., None]


def parse_command_line(
    description: str,
    add_flags: Callable[[argparse.ArgumentParser], None],
    config_type: type[RunConfig],
    argv: list[str] | None = None,
) -> RunConfig:
    """A trainer's configuration from its command line (`argv`, else sys.argv); `description` heads its --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    return config_type.from_args(parser.parse_args(argv))


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


def flag_adder(parser: argparse.ArgumentParser, trainer: str) -> AddFlag:
    """add(flag, **options): a shared flag under all its spellings (see `spellings`)."""

    def add(flag: str, **options) -> None:
        parser.add_argument(*spellings(flag, trainer), dest=flag[2:].replace("-", "_"), **options)

    return add


def add_training_flags(parser: argparse.ArgumentParser, trainer: str) -> None:
    """The flags both trainers share, with one meaning; `trainer` ("melanoma" or "artifact") picks the defaults."""
    add_schedule_flags(parser, trainer)
    add_preprocessing_flags(parser, trainer)
    add_weights_flags(parser, trainer)
    add_run_flags(parser, trainer)


def add_schedule_flags(parser: argparse.ArgumentParser, trainer: str) -> None:
    """The network, the input size, how long and how fast it trains, how the images are loaded, the seed."""
    any_weights = DEFAULTS[trainer]["any"]
    add = flag_adder(parser, trainer)
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


def add_preprocessing_flags(parser: argparse.ArgumentParser, trainer: str) -> None:
    """Colour constancy and the square rule, stored in the checkpoint."""
    any_weights = DEFAULTS[trainer]["any"]
    add = flag_adder(parser, trainer)
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


def add_weights_flags(parser: argparse.ArgumentParser, trainer: str) -> None:
    """Where the backbone's weights start, and how BatchNorm and the weight average follow them."""
    add = flag_adder(parser, trainer)
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


def add_run_flags(parser: argparse.ArgumentParser, trainer: str) -> None:
    """How the run executes and logs, and how it treats an earlier run's files."""
    add = flag_adder(parser, trainer)
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
    add_melanoma_side_flags(add)
    add("--model-dir", default="./weights")
    add("--log-dir", default="./logs")
    add_fold_flags(add)
    add_melanoma_recipe_flags(add)


def add_melanoma_side_flags(add: AddFlag) -> None:
    """train.py's side branch (the metadata and lesion features beside the image) and its output head."""
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


def add_fold_flags(add: AddFlag) -> None:
    """train.py's patient-grouped cross-validation."""
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


def add_melanoma_recipe_flags(add: AddFlag) -> None:
    """train.py's augmentation, baselines, fusion and lesion features, and what it does with unreadable images."""
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
