"""The runtime of the scripts that score melanoma models (predict.py, evaluate.py, audit.py, ensemble.py): their
shared flags, the ScoringRuntime those flags make (device, precision, TTA, batching; multi_classification.py's val
and test modes build theirs from their own flags), and the check of an output file before any work."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from melanoma_audit.shared_flags import add_device_flags, add_num_workers_flag
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


def check_n_tta(n_tta: int) -> None:
    if not 1 <= n_tta <= MAX_TTA:
        raise UserError(f"--n-tta {n_tta} is outside 1..{MAX_TTA}: the square has {MAX_TTA} symmetries.")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Device, precision and loading flags shared by predict.py, evaluate.py, audit.py and ensemble.py."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass, TTA views included")
    add_num_workers_flag(parser)
    add_device_flags(parser, cpu_bf16_from_size=False)  # prepare_runtime passes no image size


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


@dataclass(frozen=True)
class ScoringRuntime:
    """Where and how a predictor scores: device, autocast dtype, dihedral TTA views, and the loader. `batch_size`
    counts the images of one forward pass, TTA views included (each loader batch holds batch_size / n_tta images)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    n_tta: int = 1
    batch_size: int = 32
    num_workers: int = 0
    channels_last: bool = False
    progress: bool | None = None


def scoring_runtime(args: argparse.Namespace) -> ScoringRuntime:
    """The ScoringRuntime the shared flags ask for (prepare_runtime; one TTA view where a script has no --n-tta)."""
    device, amp_dtype = prepare_runtime(args)
    n_tta = getattr(args, "n_tta", 1)
    return ScoringRuntime(
        device, amp_dtype, n_tta, args.batch_size, args.num_workers, args.channels_last, args.progress
    )


def check_output(
    path: Path,
    overwrite: bool,
    alternative: str | None = None,
    example: str = "predictions.csv",
    flag: str = "--out",
) -> None:
    """Refuses to replace an earlier result unless asked (or else `alternative`, by default another `flag`), and
    checks the folder is writable before any work (a folder given as the file is refused with `example` as a file
    name). `flag` is the option that names the file. Deletes the temporary files that a killed earlier write of
    `path` left beside it: they are never a finished result."""
    refuse_folder(path, flag, example)
    for leftover in temp_files_of(path):
        leftover.unlink(missing_ok=True)
    if path.exists() and not overwrite:
        raise UserError(
            f"{path} already exists: pass --overwrite to replace it, or {alternative or f'choose another {flag}'}."
        )
    ensure_writable_dir(path.parent, "output folder" if flag == "--out" else f"folder of {flag}")
