"""The files of a train.py run and of its folds: where each goes, the one claim on them all (no overwrite without
--overwrite, --resume needs a _last.pth), and the out-of-fold predictions of every finished fold pooled from their
_last.pth."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from melanoma_audit.checkpoints import (
    describe_split,
    fold_split,
    load_checkpoint,
    require_resumable,
    rows_fingerprint,
)
from melanoma_audit.cli import claim_run_files
from melanoma_audit.config import MelanomaConfig
from melanoma_audit.engine import RunOutputs
from utils import UserError


def run_paths(config: MelanomaConfig, run_name: str) -> RunOutputs:
    """Every file a run (one fold, or the single run) writes; its out-of-fold predictions are the "oof" frame."""
    model_dir, log_dir = Path(config.model_dir), Path(config.log_dir)
    return RunOutputs(
        best=model_dir / f"{run_name}_best.pth",
        final=model_dir / f"{run_name}_final.pth",
        last=model_dir / f"{run_name}_last.pth",
        log=log_dir / f"log_{run_name}.txt",
        history=log_dir / f"metrics_{run_name}.jsonl",
        frames={"oof": log_dir / f"oof_{run_name}.csv"},
        tensorboard=log_dir / "tb" / run_name,
    )


def pooled_oof_path(config: MelanomaConfig) -> Path:
    """The out-of-fold predictions of all folds of a multi-fold run."""
    return Path(config.log_dir) / f"oof_{config.save_name}.csv"


def data_fingerprint(frame: pd.DataFrame) -> str:
    """What a run's checkpoints keep of the rows it read (their names and targets), to tell the same data later."""
    return rows_fingerprint(zip(frame["image_name"], frame["target"].astype(int), strict=True))


def earlier_fold_runs(config: MelanomaConfig) -> list[str]:
    """The fold runs (<save-name>_fold<k>) of which a file lies in the model or log folder."""
    pattern = re.compile(re.escape(config.save_name) + r"_fold\d+")
    found = set()
    for folder in {Path(config.model_dir), Path(config.log_dir)}:
        for path in folder.iterdir() if folder.is_dir() else []:
            for match in pattern.finditer(path.name):
                if path in run_paths(config, match.group(0)).files():
                    found.add(match.group(0))
    return sorted(found)


def check_outputs_free(config: MelanomaConfig, run_names: list[str]) -> None:
    """Refuses to overwrite an earlier run's files unless asked to (--overwrite), or told to continue it (--resume,
    which needs one of its _last.pth). The files of a --save-name are one unit: the single run's, those of every
    fold an earlier start trained, and the pooled predictions; --overwrite removes them all."""
    lasts = [run_paths(config, run_name).last for run_name in run_names]
    require_resumable(lasts, config.resume, "--save-name")
    names = dict.fromkeys([config.save_name, *run_names, *earlier_fold_runs(config)])
    files = dict.fromkeys(
        [*(path for name in names for path in run_paths(config, name).files()), pooled_oof_path(config)]
    )
    last = next((path for path in lasts if path.is_file()), lasts[0])
    claim_run_files(list(files), last, config.resume, config.overwrite, "choose another --save-name")


def fold_states(config: MelanomaConfig, data_sha256: str) -> list[dict]:
    """The _last.pth of every fold of the run that has one, this start's and earlier ones'; each must share this
    run's split (n_folds, fold seed, data fingerprint)."""
    split = {"n_folds": config.n_folds, "fold_seed": config.fold_seed, "data_sha256": data_sha256}
    states = []
    for fold in range(config.n_folds):
        last = run_paths(config, f"{config.save_name}_fold{fold}").last
        if not last.is_file():
            continue
        state = load_checkpoint(last, "melanoma")
        if fold_split(state) != split:
            raise UserError(
                f"{last} belongs to another fold split ({describe_split(fold_split(state))}) than this run: retrain "
                "the whole run with --overwrite, or choose another --save-name."
            )
        states.append(state)
    return states


def pooled_oof(config: MelanomaConfig, data_sha256: str) -> pd.DataFrame:
    """The best-epoch out-of-fold predictions of every finished fold of the run, read from their _last.pth:
    continuing some of the folds never drops the others; an unfinished fold joins once it has finished."""
    states = fold_states(config, data_sha256)
    finished = [state for state in states if state["epoch"] == state["config"]["n_epochs"]]
    return pd.concat([pd.DataFrame(state["best"]["oof"]) for state in finished], ignore_index=True)
