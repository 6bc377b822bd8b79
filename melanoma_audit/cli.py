"""The layer every script shares between its command line and the library: the flags they all take (each defined
once, with one meaning and one help text), the runtime context those flags make (Runtime for training,
ScoringRuntime for scoring: device, precision, memory layout, progress bars, the process's world; TTA and batching
for scoring), and the one rule for claiming output files before any work. The trainers also take the flags with
underscores (--num_workers), the spelling of the scripts they grew from."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from melanoma_audit.distributed import World, setup_world, teardown_world
from utils import (
    PRECISIONS,
    UserError,
    ensure_writable_dir,
    make_grad_scaler,
    refuse_folder,
    resolve_precision,
    select_device,
    set_visible_devices,
    temp_files_of,
)

if TYPE_CHECKING:  # config.py reads MAX_TTA from here
    from melanoma_audit.config import RunConfig

MAX_TTA = 8


# --------------------------------------------------------------------------- the shared flags


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


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Device, precision and loading flags shared by predict.py, evaluate.py, audit.py and ensemble.py."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass, TTA views included")
    add_num_workers_flag(parser)
    add_device_flags(parser, cpu_bf16_from_size=False)  # prepare_runtime passes no image size


# --------------------------------------------------------------------------- the runtime context


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs the network. amp_dtype is autocast's (None: fp32); progress is the
    --progress flag (None: bars only on a terminal), shown by the main process alone."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    progress: bool | None = None
    world: World = field(default_factory=World)

    @property
    def shows_progress(self) -> bool | None:
        """What tqdm's switch takes: the flag on the main process, off on the others."""
        return self.progress and self.world.is_main

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A fresh gradient scaler: active only for fp16, whose gradients underflow without it."""
        return make_grad_scaler(self.device, self.amp_dtype)


@contextlib.contextmanager
def training_runtime(config: RunConfig) -> Iterator[Runtime]:
    """The runtime a training run's flags ask for: the process group joined under torchrun (and left at the end),
    this process's device, and --precision resolved for that device and the run's image size."""
    set_visible_devices(config.CUDA_VISIBLE_DEVICES)
    world, device = setup_world(config.device)
    try:
        amp_dtype = resolve_precision(config.precision, device, config.image_size)
        yield Runtime(device, amp_dtype, config.channels_last, config.progress, world)
    finally:
        teardown_world(world)


@dataclass(frozen=True)
class ScoringRuntime(Runtime):
    """A Runtime for scoring: dihedral TTA views and the loader besides. `batch_size` counts the images of one
    forward pass, TTA views included (each loader batch holds batch_size / n_tta images)."""

    n_tta: int = 1
    batch_size: int = 32
    num_workers: int = 0


def check_n_tta(n_tta: int) -> None:
    if not 1 <= n_tta <= MAX_TTA:
        raise UserError(f"--n-tta {n_tta} is outside 1..{MAX_TTA}: the square has {MAX_TTA} symmetries.")


def check_runtime_counts(args: argparse.Namespace) -> None:
    """--batch-size, --num-workers and (where the script has it) --n-tta, refused in one sentence when they would
    score nothing or fail in the loader."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1.")
    if args.num_workers < 0:
        raise UserError(f"--num-workers {args.num_workers} must be 0 or more.")
    check_n_tta(getattr(args, "n_tta", 1))


def prepare_runtime(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """Device and autocast dtype from the shared flags, after the counts among them are checked."""
    check_runtime_counts(args)
    set_visible_devices(args.CUDA_VISIBLE_DEVICES)
    device = select_device(args.device)
    return device, resolve_precision(args.precision, device)


def scoring_runtime(args: argparse.Namespace) -> ScoringRuntime:
    """The ScoringRuntime the shared flags ask for (prepare_runtime)."""
    return runtime_from_flags(args, *prepare_runtime(args))


def runtime_from_flags(flags: Any, device: torch.device, amp_dtype: torch.dtype | None) -> ScoringRuntime:
    """A ScoringRuntime on `device` with the layout, progress, TTA and loading flags of `flags` (parsed arguments or
    a run configuration; one TTA view where it has no n_tta)."""
    return ScoringRuntime(
        device,
        amp_dtype,
        channels_last=flags.channels_last,
        progress=flags.progress,
        n_tta=getattr(flags, "n_tta", 1),
        batch_size=flags.batch_size,
        num_workers=flags.num_workers,
    )


# --------------------------------------------------------------------------- claiming outputs
# The one rule: what an earlier run wrote is never replaced unless --overwrite says so (or --resume continues the
# run that wrote it); the temporary files a killed write left are never a finished result and are removed; the
# output folder is checked writable before any work.


def claim_file(
    path: Path,
    overwrite: bool,
    alternative: str | None = None,
    example: str = "predictions.csv",
    flag: str = "--out",
) -> None:
    """Claims one output file, named by `flag` (a folder given as the file is refused with `example` as a file
    name); without --overwrite an existing one is refused, suggesting `alternative` (by default another `flag`)."""
    refuse_folder(path, flag, example)
    remove_leftovers(temp_files_of(path))
    if path.exists() and not overwrite:
        raise UserError(
            f"{path} already exists: pass --overwrite to replace it, or {alternative or f'choose another {flag}'}."
        )
    ensure_writable_dir(path.parent, "output folder" if flag == "--out" else f"folder of {flag}")


def claim_folder(folder: Path, overwrite: bool, leftovers: Iterable[Path], name: str, flag: str) -> None:
    """Claims a folder of outputs (`name` says what it is, `flag` names it): without --overwrite it must be empty
    once the `leftovers` of a killed earlier write are removed."""
    remove_leftovers(leftovers)  # first: a folder that holds only those is empty, not an earlier result
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{name} {folder} is not empty: pass --overwrite to replace it, or choose another.")
    ensure_writable_dir(folder, f"{name} ({flag})")


def claim_run_files(paths: Sequence[Path], last: Path, resume: bool, overwrite: bool, alternative: str) -> None:
    """Claims a training run's files: they are kept when the run is continued (--resume with its `last`
    checkpoint present), deleted with --overwrite (so that no file of the earlier run is left to be mistaken for
    this one's), else a UserError suggests `alternative`."""
    remove_leftovers(leftover for path in paths for leftover in temp_files_of(path))
    existing = [path for path in paths if path.exists()]
    if not existing or (resume and last.is_file()):
        return
    if overwrite:
        for path in existing:
            if path.is_dir():  # a run's TensorBoard folder
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return
    raise UserError(
        f"{existing[0]} already exists from an earlier run: pass --resume to continue it, --overwrite to replace "
        f"it, or {alternative}."
    )


def remove_leftovers(paths: Iterable[Path]) -> None:
    for path in list(paths):
        path.unlink(missing_ok=True)
