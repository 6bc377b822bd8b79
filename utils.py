"""Small helpers every script shares: user errors, atomic files, device and precision, seeding. Everything here
is passed what it needs; nothing is global."""

from __future__ import annotations

import contextlib
import glob
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------- errors a user can cause


class UserError(Exception):
    """A mistake the user can fix (bad path, bad column, wrong checkpoint): one sentence, exit code 2."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turns a UserError into one line on stderr and exit code 2, with no traceback."""
    try:
        yield
    except UserError as error:
        message = str(error)
        if message.startswith("Caught ") and "Original Traceback" in message:
            # a DataLoader worker re-raises with the worker's whole traceback; its last line is the sentence
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Creates `path` if needed and checks that files can be written there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} {path} is a file, not a folder: choose a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write to the {what} {path} ({error.strerror}): choose a folder you can write to."
        ) from None
    return path


def refuse_folder(path: str | Path, flag: str, example: str) -> None:
    """An output file named as an existing folder would fail only when written, after all the work."""
    if Path(path).is_dir():
        raise UserError(f"{flag} {path} is a folder: name the file to write, e.g. {Path(path) / example}.")


# --------------------------------------------------------------------------- atomic files


def temp_files_of(path: str | Path) -> list[Path]:
    """Temporary files that atomic_path left beside `path` when its process was killed (kill -9 runs no cleanup)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def _write_error(path: Path, error: OSError) -> UserError:
    return UserError(
        f"could not write {path} ({error.strerror or error}): free space on that disk or choose another folder; "
        "the earlier version of the file, if any, is kept."
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path `.<name>.<random>.tmp` in the target's folder; renamed onto `path` only if the block
    succeeds, so an interrupted write never leaves a truncated file behind. A failed write (a full disk, a
    vanished folder) is a UserError naming `path`, and the earlier file stays as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
    except OSError as error:
        raise _write_error(path, error) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide outputs from the rest of a shared cluster
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except OSError as error:
        raise _write_error(path, error) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv_atomic(frame: Any, path: str | Path) -> None:
    """Writes a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def to_plain(value: Any) -> Any:
    """Turns NumPy scalars and arrays into plain Python so a checkpoint loads with weights_only=True."""
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------- device, precision, seeding


def set_visible_devices(spec: str | None) -> None:
    """Applies --CUDA_VISIBLE_DEVICES; it only takes effect before CUDA is first initialised.

    A second run in the same process (demo.py, tests calling main() twice) may repeat the same value."""
    if spec is None or spec == "":
        return
    if torch.cuda.is_initialized():
        if os.environ.get("CUDA_VISIBLE_DEVICES") == spec:
            return
        raise UserError(
            f"--CUDA_VISIBLE_DEVICES {spec} was given after CUDA started on devices "
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}: set it before any GPU work."
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = spec


def select_device(request: str) -> torch.device:
    """'auto' takes the GPU when there is one and says so when there is not; 'cuda' insists on one."""
    if request == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        # torch.backends.cudnn.benchmark stays off: an H100 run with it on (efficientnet-b2, 256 px, bf16) halved
        # inference, slowed training by a quarter and spent a minute autotuning (docs/benchmark.md).
        return torch.device("cuda")
    if request == "cuda":
        raise UserError(
            "--device cuda was asked for but no CUDA GPU is visible: check --CUDA_VISIBLE_DEVICES and the "
            "driver, or use --device cpu."
        )
    print("notice: no CUDA GPU found, running on the CPU.", flush=True)
    return torch.device("cpu")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


CPU_BF16_MIN_SIZE = 192


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device, image_size: int | None = None) -> torch.dtype | None:
    """Returns the autocast dtype, or None for plain fp32.

    auto: bf16 on GPUs that have it, fp16 (with a GradScaler) on older GPUs. On the CPU, bf16 where it measured
    faster: a CPU with native bf16 and images of at least 192 px (b0 train step at 256 px: 5.9 img/s bf16 vs 2.7
    fp32; at 128 px bf16 was no faster, docs/benchmark.md); fp32 otherwise.
    """
    if name == "fp32":
        return None
    if name == "auto":
        if device.type != "cuda":
            fast_bf16 = image_size is not None and image_size >= CPU_BF16_MIN_SIZE and cpu_has_native_bf16()
            return torch.bfloat16 if fast_bf16 else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU: use bf16 or fp32 on the CPU.")
    return torch.bfloat16 if name == "bf16" else torch.float16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def make_grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (weight init, dropout). Shuffling and augmentation have their own seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
