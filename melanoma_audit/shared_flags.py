"""The command-line flags the scripts share, each defined once with one meaning and one help text: where and how a
script runs (device, precision, memory layout, progress bars, data-loading processes, where images are decoded,
torch.compile) and the switch that lets it replace earlier outputs. The trainers also take the flags with
underscores (--num_workers), the spelling of the scripts they grew from."""

from __future__ import annotations

import argparse
import os

from utils import PRECISIONS

DATA_PATHS = ("auto", "cpu", "gpu")  # --data-path: device_data.resolve_data_path decides what auto takes


def spellings(flag: str, underscore_aliases: bool) -> list[str]:
    """A flag's names: as given, and with underscores for hyphens where `underscore_aliases` asks for it."""
    underscored = "--" + flag[2:].replace("-", "_")
    return [flag, underscored] if underscore_aliases and underscored != flag else [flag]


def add_device_flags(
    parser: argparse.ArgumentParser, underscore_aliases: bool = False, cpu_bf16_from_size: bool = True
) -> None:
    """The device, precision, layout and progress flags every script that runs a network takes.

    cpu_bf16_from_size: whether `--precision auto` picks bf16 on the CPU for large images (the trainers, the
    detector's modes, bench.py: they know the image size), or always fp32 there (the melanoma scoring scripts).
    """
    cpu_auto = "on the CPU bf16 from 192 px where the CPU has native bf16, else fp32"
    if not cpu_bf16_from_size:
        cpu_auto = "fp32 on the CPU"
    parser.add_argument("--CUDA_VISIBLE_DEVICES", default=None, help="GPU ids, e.g. 0 or 0,1, set before CUDA starts")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help=f"auto: bf16 (or fp16 + GradScaler) autocast on a GPU; {cpu_auto}",
    )
    parser.add_argument(
        *spellings("--channels-last", underscore_aliases),
        dest="channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory layout (faster convolutions on GPUs and recent CPUs)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: only on a terminal)",
    )


def default_num_workers() -> int:
    """Half the cores, at most 8: the torch threads need the rest, and a 2-core laptop must not thrash."""
    return min(8, (os.cpu_count() or 2) // 2)


def add_num_workers_flag(parser: argparse.ArgumentParser, underscore_aliases: bool = False) -> None:
    parser.add_argument(
        *spellings("--num-workers", underscore_aliases),
        dest="num_workers",
        type=int,
        default=default_num_workers(),
        help="data-loading processes (default: half the cores, at most 8)",
    )


def add_data_path_flag(parser: argparse.ArgumentParser, underscore_aliases: bool = False, scope: str = "") -> None:
    """--data-path (device_data.resolve_data_path decides "auto"); `scope` starts the help, e.g. "train mode: "."""
    parser.add_argument(
        *spellings("--data-path", underscore_aliases),
        dest="data_path",
        default="auto",
        choices=DATA_PATHS,
        help=f"{scope}where images are decoded and augmented: cpu (in the data-loading processes), gpu (in batches on "
        "the training device, nvJPEG on CUDA; the same code runs on the CPU) or auto (the path measured fastest: cpu "
        "until the device path is timed on a GPU; default)",
    )


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """--compile, for the trainers and bench.py; engine.compile_for_training applies it."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward pass (its first step takes minutes; validation and the saved "
        "weights stay uncompiled)",
    )


def add_overwrite_flag(parser: argparse.ArgumentParser, replaced: str) -> None:
    """--overwrite: without it a script refuses to replace what an earlier run wrote; `replaced` says what that is."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {replaced}")


def add_allow_missing_meta_flag(parser: argparse.ArgumentParser, when: str = "") -> None:
    """--allow-missing-meta for the scripts that score --use-meta models; `when` says where it applies."""
    parser.add_argument(
        "--allow-missing-meta",
        action="store_true",
        help=f"{when}let --use-meta models score images without metadata, or with a sex or site they were not trained "
        "with, encoded as missing (less accurate; each such value is named)",
    )
