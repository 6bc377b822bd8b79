"""Checkpoint and resume IO: saving and loading checkpoints that load with weights_only=True, the training state
a resumable (_last) checkpoint holds, and the checks that a resumed run is the same run and that no earlier run's
files are overwritten unasked."""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils import UserError, atomic_path, to_plain

CHECKPOINT_FORMAT = 1
# detector files of earlier versions say "bias" (the original code's word for artifact): they still load
LEGACY_KINDS = {"bias": "artifact"}
WRITERS = {"melanoma": "train.py", "artifact": "multi_classification.py"}
READERS = {"melanoma": "train.py / predict.py", "artifact": "multi_classification.py"}


def kind_of(name: str | None) -> str | None:
    """The kind a checkpoint's "kind" value names, an old file's word read as today's."""
    return LEGACY_KINDS.get(name, name) if isinstance(name, str) else name


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Saves atomically; the payload must hold only tensors and plain Python values (weights_only-safe)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # through a Python file: a full disk is then an OSError (torch's own writer raises a RuntimeError)
        torch.save(checkpoint, handle)


def load_checkpoint(path: str | Path, expected_kind: str | None) -> dict:
    """Loads with weights_only=True (a checkpoint can never run code) and checks it belongs to this script.

    expected_kind is 'melanoma' (train.py / predict.py), 'artifact' (multi_classification.py; an old
    detector's 'bias' is read the same way), or None for either (export.py).
    """
    path, expected_kind = Path(path), kind_of(expected_kind)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path (models go to --model-dir).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint {path} needs pickle to load, which could run code: only load checkpoints written by "
            "this project's scripts."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"checkpoint {path} cannot be read ({error}): it is truncated or not a checkpoint.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a checkpoint of this project (no format {CHECKPOINT_FORMAT} marker): "
            "use a file written by train.py or multi_classification.py."
        )
    kind = kind_of(checkpoint.get("kind"))
    if expected_kind is None and kind not in WRITERS:
        raise UserError(
            f"checkpoint {path} was written by another tool: pass a checkpoint of train.py or multi_classification.py."
        )
    if expected_kind is not None and kind != expected_kind:
        writer = WRITERS.get(kind, "another tool")
        raise UserError(
            f"checkpoint {path} was written by {writer}, not {READERS[expected_kind]}: pass a checkpoint that "
            f"{WRITERS[expected_kind]} wrote."
        )
    return checkpoint


# --------------------------------------------------------------------------- resumable state


def rng_state() -> dict:
    """The global RNG states, weights_only-safe, to store in a resumable checkpoint."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": to_plain(list(np.random.get_state())),
        "python": to_plain(list(random.getstate())),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def training_state(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> dict:
    """What a resumable (_last) checkpoint holds beside the weights: optimizer, scheduler, scaler and RNG states."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }


def restore_training_state(
    state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler
) -> None:
    """Puts a run back where a _last checkpoint left it (the parts of training_state, and the weights being trained:
    "training_weights" where the run validates a weight average, else "state_dict")."""
    model.load_state_dict(state.get("training_weights", state["state_dict"]))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def rows_fingerprint(rows: Iterable[Sequence[object]]) -> str:
    """sha256 of a set of rows (tuples of values), in any order: what a checkpoint keeps of the rows it was trained
    and validated on, to tell whether a later start sees the same ones."""
    lines = sorted("\t".join(str(value) for value in row) for row in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def fold_split(checkpoint: dict) -> dict:
    """The fold split a train.py checkpoint's fold was drawn from: the folds of one run share it."""
    config = checkpoint.get("config") or {}
    return {
        "n_folds": checkpoint.get("n_folds"),
        "fold_seed": config.get("fold_seed"),
        "data_sha256": checkpoint.get("data_sha256"),
    }


def describe_split(split: dict) -> str:
    """A fold_split in words, its fingerprint shortened."""
    return ", ".join(f"{key} {short(value) if key == 'data_sha256' else value}" for key, value in split.items())


def short(fingerprint: str | None) -> str:
    """The first 12 hex digits of a sha256, enough to tell two apart in a message."""
    return "none" if fingerprint is None else fingerprint[:12]


def shown(value: Any) -> str:
    """A setting as its flag takes it: lists comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resume_differences(
    state: dict, checkpoint: dict, runtime_fields: Collection[str]
) -> Iterator[tuple[str, Any, Any]]:
    """What differs between a saved run and this start, in the order a message names it: the fold (first, so that
    a refit, --fold none, resumed as a fold's run or the other way round names that rather than a setting that
    follows from it), the settings of the run's record (all but `runtime_fields`, by their flags), the precision and
    data path they resolved to, the data and the fold's validation images."""
    fold, now_fold = state.get("fold"), to_plain(checkpoint.get("fold"))
    if fold != now_fold:
        yield "--fold", "none" if fold is None else fold, "none" if now_fold is None else now_fold
    saved, now = state["config"], to_plain(checkpoint["config"])
    for key in dict.fromkeys([*saved, *now]):
        if key not in runtime_fields and saved.get(key, "unset") != now.get(key, "unset"):
            name = "ImageNet weights" if key == "pretrained" else "--" + key.replace("_", "-")
            yield name, saved.get(key, "unset"), now.get(key, "unset")
    for key, value in to_plain(checkpoint.get("resolved") or {}).items():
        if (state.get("resolved") or {}).get(key) != value:
            yield f"{key.replace('_', ' ')} (resolved)", (state.get("resolved") or {}).get(key), value
    for key in ("data_sha256", "val_sha256"):
        if state.get(key) != to_plain(checkpoint.get(key)):
            yield key, state.get(key), to_plain(checkpoint.get(key))


def check_resume_compatible(
    state: dict, checkpoint: dict, path: str | Path, runtime_fields: Collection[str], data_name: str
) -> None:
    """The resume rule of both trainers: a run continues only as the same run. Its settings (every field of the
    record but `runtime_fields`), the precision and data path they resolved to, its data (the fingerprint of the
    names and labels of every row of `data_name`), its fold and that fold's validation images must equal this
    start's; otherwise a UserError names the first difference."""
    if "config" not in state or "best_epoch" not in state or "data_sha256" not in state:
        raise UserError(
            f"{path} was written by another version of this project: resume with that version, or start a new run "
            "with --overwrite."
        )
    for name, old, new in resume_differences(state, checkpoint, runtime_fields):
        way_out = "or start a new run with --overwrite."
        if name == "data_sha256":
            raise UserError(
                f"{path} was trained on other data: the image names and labels of {data_name} have fingerprint "
                f"{short(new)} now, {short(old)} then (rows added, removed or relabelled): restore the rows, {way_out}"
            )
        if name == "val_sha256":
            raise UserError(
                f"the validation images of {path} (fingerprint {short(old)}) are not this run's ({short(new)}), the "
                "split being drawn otherwise (e.g. other patient_id values, or another version of this project): "
                f"restore what it was trained with, {way_out}"
            )
        raise UserError(
            f"{path} was saved with {name} {shown(old)}, this run has {shown(new)}: resume with the settings it was "
            f"saved with, {way_out}"
        )


def require_resumable(lasts: Sequence[Path], resume: bool, names: str) -> None:
    """--resume needs a run to continue: one of `lasts` (the run's _last.pth files) must exist."""
    if resume and not any(path.is_file() for path in lasts):
        raise UserError(
            f"--resume found no {lasts[0]} to continue: check {names} and the folder, or leave out --resume to start "
            "a new run."
        )
