"""Train the melanoma classifier (EfficientNet, optional metadata branch) on a Kaggle-layout folder.

    python train.py --save-name efficientnetb2_256_20ep --data-dir ./melanoma_external_256/ --image-size 256 \
        --n-epochs 20 --enet-type efficientnet-b2 --CUDA_VISIBLE_DEVICES 0 [--use-meta]

--fold none refits on every row for --n-epochs (the count cross-validation chose): nothing is validated, so it
writes <save-name>_final.pth and _last.pth but no _best.pth, no out-of-fold predictions and no baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from melanoma_audit.baselines import baseline_aucs
from melanoma_audit.cli import Runtime, training_runtime
from melanoma_audit.config import MelanomaConfig
from melanoma_audit.device_data import resolve_data_path
from melanoma_audit.distributed import World
from melanoma_audit.engine import Epoch, Progress, RunOutputs, Scored, Task, fit
from melanoma_audit.features import colour_statistics, lesion_features
from melanoma_audit.loops import Preparation, melanoma_loss
from melanoma_audit.melanoma_folds import FoldInputs, fold_checkpoint, fold_images, fold_inputs
from melanoma_audit.melanoma_outputs import (
    check_outputs_free,
    data_fingerprint,
    fold_states,
    pooled_oof,
    pooled_oof_path,
    run_paths,
)
from melanoma_audit.metrics import binary_metrics, safe_auc
from melanoma_audit.patients import make_folds
from melanoma_audit.tables import find_train_csv, read_melanoma_table
from melanoma_audit.trainer_flags import add_melanoma_flags, parse_command_line
from models import MelanomaNet, input_normalization, melanoma_logit, melanoma_probability
from utils import (
    ensure_writable_dir,
    exit_on_user_error,
    precision_name,
    seed_everything,
    to_plain,
    write_csv_atomic,
)


def parse_args(argv: list[str] | None = None) -> MelanomaConfig:
    return parse_command_line(__doc__, add_melanoma_flags, MelanomaConfig, argv)


# --------------------------------------------------------------------------- pieces


def log_line(record: dict) -> str:
    """The original trainer's log line (users parse it), with the extra metrics appended."""
    return (
        f"{record['time']} Fold {record['fold']}, Epoch {record['epoch']}, lr: {record['lr']:.7f}, "
        f"train loss: {record['train_loss']:.5f}, valid loss: {record['valid_loss']:.5f}, "
        f"acc: {record['acc']:.4f}, auc: {record['auc']:.6f}, balanced acc: {record['balanced_acc']:.4f}, "
        f"sensitivity: {record['sensitivity']:.4f}, specificity: {record['specificity']:.4f}."
    )


def refit_log_line(record: dict) -> str:
    """A refit's log line: the original line's training half, and why the validation half is missing."""
    return (
        f"{record['time']} Refit on all {record['n_images']} images (no validation fold), Epoch {record['epoch']}, "
        f"lr: {record['lr']:.7f}, train loss: {record['train_loss']:.5f}."
    )


def score_refit_epoch(epoch: Epoch, n_images: int) -> Scored:
    """A refit's epoch: nothing was held out, so no metric and no score (no best epoch)."""
    record = {
        "time": time.ctime(),
        "fold": None,
        "refit": True,
        "epoch": epoch.number,
        "lr": epoch.lr,
        "train_loss": epoch.train_loss,
        "n_images": n_images,
        "seconds": epoch.seconds,
    }
    return Scored(float("nan"), refit_log_line(record), [record], {})


def score_epoch(
    epoch: Epoch, fold: int, valid_rows: pd.DataFrame, evidence: np.ndarray | None, baselines: dict
) -> Scored:
    """One epoch's melanoma metrics (at a threshold of 0.5), its log line, and its out-of-fold predictions."""
    targets = epoch.targets.numpy()
    probs = melanoma_probability(epoch.logits, evidence)
    metrics = binary_metrics(targets, probs)
    if evidence is not None:  # under late fusion, also what the image network scores on its own
        metrics["image_auc"] = safe_auc(targets, melanoma_logit(epoch.logits))
    record = {
        "time": time.ctime(),
        "fold": fold,
        "epoch": epoch.number,
        "lr": epoch.lr,
        "train_loss": epoch.train_loss,
        "valid_loss": epoch.valid_loss,
        **metrics,
        **baselines,
        "seconds": epoch.seconds,
    }
    oof = pd.DataFrame(
        {"image_name": valid_rows["image_name"], "fold": fold, "target": valid_rows["target"], "prob": probs}
    )
    return Scored(metrics["auc"], log_line(record), [record], {"metrics": to_plain(metrics)}, {"oof": oof})


# --------------------------------------------------------------------------- one fold


def fold_baselines(
    config: MelanomaConfig, frame: pd.DataFrame, fold: int, inputs: FoldInputs, colour: np.ndarray | None
) -> dict:
    """What the network is compared with on this fold, printed: late fusion's metadata regression on its own, and
    the baselines' validation AUCs (returned). First, the validation values the encoding has no column for."""
    for column, value, rows in inputs.encoder.unrecognised(inputs.valid_rows) if inputs.encoder else []:
        print(
            f"notice: {int(rows.sum())} validation image(s) of fold {fold} have {column} {value!r}, which no training "
            "image of the fold has: encoded as missing (predict.py and audit.py will ask for --allow-missing-meta).",
            flush=True,
        )
    if inputs.evidence is not None:
        alone = safe_auc(inputs.valid_rows["target"], inputs.evidence)
        print(f"late fusion: metadata logistic regression on the training fold (alone {alone:.4f})", flush=True)
    if not config.baselines:
        return {}
    in_fold = (frame["fold"] == fold).to_numpy()
    stats = {} if colour is None else {"train_stats": colour[~in_fold], "valid_stats": colour[in_fold]}
    baselines = baseline_aucs(inputs.train_rows, inputs.valid_rows, seed=config.seed, **stats)
    print("baselines on this fold: " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()), flush=True)
    return baselines


def fold_network(config: MelanomaConfig, n_side: int, seed: int, world: World) -> MelanomaNet:
    """The fold's network, its initial weights from `seed` on every rank; dropout then differs per rank."""
    seed_everything(seed)
    net = MelanomaNet(
        config.enet_type,
        out_dim=config.out_dim,
        n_meta_features=n_side,
        n_meta_dim=list(config.n_meta_dim),
        pretrained=config.pretrained,
        weights_path=config.pretrained_weights,
        bn_momentum=config.bn_momentum,
    )
    torch.manual_seed(seed + 1000 * world.rank)
    return net


def fold_task(
    config: MelanomaConfig,
    inputs: FoldInputs,
    fold: int | None,
    run_name: str,
    baselines: dict,
    world: World,
    data_sha256: str,
) -> Task:
    """What the engine trains for one fold (fold None: a refit, with no best checkpoint and no OOF predictions)."""
    refit = fold is None
    n_side = 0 if inputs.train_side is None else inputs.train_side.shape[1]
    seed = config.seed + (0 if refit else fold)  # each fold its own seeds
    train_images, valid_images = fold_images(inputs)
    mean, std = input_normalization(config.enet_type)
    outputs = run_paths(config, run_name)
    if refit:
        score = functools.partial(score_refit_epoch, n_images=len(inputs.train_rows))
        outputs = dataclasses.replace(outputs, best=None, frames={})
    else:
        score = functools.partial(
            score_epoch, fold=fold, valid_rows=inputs.valid_rows, evidence=inputs.evidence, baselines=baselines
        )
    return Task(
        kind="melanoma",
        name=run_name,
        net=fold_network(config, n_side, seed, world),
        train_images=train_images,
        valid_images=valid_images,
        preparation=Preparation(
            config.image_size, mean, std, config.augment, seed=seed, preprocessing=config.preprocessing
        ),
        shuffle_seed=seed,
        loss_fn=melanoma_loss(config.out_dim),
        score=score,
        checkpoint=fold_checkpoint(config, inputs, fold, n_side, data_sha256),
        outputs=outputs,
        log_line=refit_log_line if refit else log_line,
        data_name=str(find_train_csv(Path(config.data_dir))),
    )


def train_fold(
    config: MelanomaConfig,
    frame: pd.DataFrame,
    fold: int | None,
    run_name: str,
    runtime: Runtime,
    data_sha256: str,
    colour: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
) -> dict:
    """Trains on every fold but `fold`, validates on `fold`; returns the out-of-fold predictions of the best
    epoch, the baselines' validation AUCs, the trained network and the last epoch's validation AUC (the best epoch
    is picked on this same fold, so its AUC is optimistic). Writes <run>_best/_final/_last.pth, the log,
    the metrics file and the OOF CSV (the main process only, in a distributed run). `data_sha256` fingerprints
    `frame` (data_fingerprint); `colour` and `lesion` hold the colour statistics and lesion features of every row of
    `frame`, computed once per run, where it needs them. Fold None is a refit on every row: no validation, no
    baselines, no best checkpoint and no OOF predictions (their entries are None and NaN)."""
    refit, world = fold is None, runtime.world
    inputs = fold_inputs(config, frame, fold, lesion)
    baselines = fold_baselines(config, frame, fold, inputs, colour) if world.is_main and not refit else {}
    task = fold_task(config, inputs, fold, run_name, baselines, world, data_sha256)
    fitted = fit(task, config, runtime)
    if refit:
        if world.is_main:
            report_refit(config, len(inputs.train_rows), task.outputs)
        return {"oof": None, "baselines": {}, "net": fitted.net, "last_auc": float("nan"), "image_auc": float("nan")}
    history = fitted.progress.history
    last_auc = float(history[-1]["auc"])
    # under late fusion, the image network's own AUC at the best epoch (the network saved); NaN otherwise
    best_record = next(record for record in history if record["epoch"] == fitted.progress.best_epoch)
    image_auc = float(best_record.get("image_auc", float("nan")))
    if world.is_main:
        report_fold(fold, fitted.progress, last_auc, baselines, task.outputs)
    return {
        "oof": fitted.progress.best["oof"],
        "baselines": baselines,
        "net": fitted.net,
        "last_auc": last_auc,
        "image_auc": image_auc,
    }


def report_refit(config: MelanomaConfig, n_images: int, outputs: RunOutputs) -> None:
    print(
        f"refit: {config.n_epochs} epochs on all {n_images} images, nothing validated (no best "
        f"epoch, no out-of-fold predictions, no baselines); checkpoints {outputs.final} and {outputs.last}, "
        f"log {outputs.log}, metrics {outputs.history}",
        flush=True,
    )


def report_fold(fold: int, progress: Progress, last_auc: float, baselines: dict, outputs: RunOutputs) -> None:
    print(
        f"fold {fold}: best valid auc {progress.best_score:.4f} (epoch {progress.best_epoch}), "
        f"last epoch {last_auc:.4f}"
        + "".join(f" ({key} {value:.4f})" for key, value in baselines.items())
        + f"; checkpoints {outputs.best} and {outputs.final}, log {outputs.log}, metrics {outputs.history}, "
        f"out-of-fold predictions {outputs.frames['oof']}",
        flush=True,
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    with exit_on_user_error():
        config = parse_args(argv)
        with training_runtime(config) as runtime:
            return run(config, runtime)


def run(config: MelanomaConfig, runtime: Runtime) -> dict:
    """Trains the requested folds; returns per-fold AUCs, their mean, the baselines and the trained networks."""
    world = runtime.world
    if not world.distributed and config.CUDA_VISIBLE_DEVICES and "," in config.CUDA_VISIBLE_DEVICES:
        print(
            "notice: one process trains on the first listed GPU; to train on all of them start "
            "`torchrun --nproc_per_node N train.py ...`.",
            flush=True,
        )
    folds = list(config.folds)
    frame = read_melanoma_table(
        config.data_dir, "train", config.use_meta, require_target=True, bad_images=config.bad_images
    )
    if not config.refit:  # a refit trains on every row: it needs no folds
        frame["fold"] = make_folds(frame, config.n_folds, config.fold_seed)
    data_sha256 = data_fingerprint(frame)
    run_names = [config.save_name] if len(folds) <= 1 else [f"{config.save_name}_fold{fold}" for fold in folds]
    if world.is_main:
        claim_run_outputs(config, run_names, data_sha256)
    if world.distributed:
        dist.barrier()
    if world.is_main:
        announce_run(config, frame, runtime)
    colour, lesion = image_features(config, frame, world)
    if config.refit:
        result = train_fold(config, frame, None, config.save_name, runtime, data_sha256, colour, lesion)
        return {"refit": True, "folds": [], "models": [result["net"]]}
    results = [
        train_fold(config, frame, fold, run_name, runtime, data_sha256, colour, lesion)
        for fold, run_name in zip(folds, run_names, strict=True)
    ]
    summary = summarise_folds(folds, results)
    if len(folds) > 1 and world.is_main:
        write_pooled_oof(config, data_sha256, summary)
    return summary


def claim_run_outputs(config: MelanomaConfig, run_names: list[str], data_sha256: str) -> None:
    """The output folders exist and are writable, and no earlier run's file is in the way (melanoma_outputs)."""
    ensure_writable_dir(config.model_dir, "model folder (--model-dir)")
    ensure_writable_dir(config.log_dir, "log folder (--log-dir)")
    check_outputs_free(config, run_names)
    if config.resume and len(config.folds) > 1:
        fold_states(config, data_sha256)  # a fold of another split is refused before any training


def announce_run(config: MelanomaConfig, frame: pd.DataFrame, runtime: Runtime) -> None:
    device = runtime.device
    split = (
        "a refit on every row, no validation fold"
        if config.refit
        else f"{config.n_folds} patient-grouped folds, validating on fold(s) {list(config.folds)}"
    )
    print(
        f"{len(frame)} images ({int(frame['target'].sum())} melanoma), {split}; {config.enet_type} at "
        f"{config.image_size} px on {device}, "
        f"precision {precision_name(runtime.amp_dtype)}, data path {resolve_data_path(config.data_path, device)}"
        f"{', metadata branch' if config.use_meta else ''}"
        f"{', lesion features' if config.lesion_features else ''}"
        f"{', Shades of Gray colour constancy' if config.color_constancy != 'none' else ''}"
        f"{f', {config.resize_mode} to square' if config.resize_mode != 'stretch' else ''}",
        flush=True,
    )


def image_features(
    config: MelanomaConfig, frame: pd.DataFrame, world: World
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The colour statistics and lesion features of every row, where the run needs them: once per run, not per fold,
    since the baselines' colour statistics are also part of the lesion ones."""
    colour = lesion = None
    if config.lesion_features or (config.baselines and world.is_main and not config.refit):
        started = time.time()
        colour = colour_statistics(list(frame["filepath"]), preprocessing=config.preprocessing)
        if config.lesion_features:
            lesion = lesion_features(list(frame["filepath"]), colour, config.preprocessing)
            if world.is_main:
                print(f"lesion features of {len(frame)} images in {time.time() - started:.1f} s", flush=True)
    return colour, lesion


def summarise_folds(folds: list[int], results: list[dict]) -> dict:
    """Per fold and averaged: the best epoch's AUC, the last epoch's, the image network's own; the baselines."""
    summary = {
        "folds": folds,
        "fold_auc": [binary_metrics(result["oof"]["target"], result["oof"]["prob"])["auc"] for result in results],
        "last_fold_auc": [result["last_auc"] for result in results],
        "image_fold_auc": [result["image_auc"] for result in results],
        "baselines": [result["baselines"] for result in results],
        "models": [result["net"] for result in results],
    }
    summary["mean_auc"] = float(np.mean(summary["fold_auc"]))
    summary["last_mean_auc"] = float(np.mean(summary["last_fold_auc"]))
    summary["image_mean_auc"] = float(np.mean(summary["image_fold_auc"]))
    return summary


def write_pooled_oof(config: MelanomaConfig, data_sha256: str, summary: dict) -> None:
    """The pooled out-of-fold predictions of every finished fold, and the cross-validation's line."""
    oof_path = pooled_oof_path(config)
    pooled = pooled_oof(config, data_sha256)
    write_csv_atomic(pooled, oof_path)
    print(
        f"cross-validation: best-epoch auc per fold {[round(a, 4) for a in summary['fold_auc']]}, "
        f"mean {summary['mean_auc']:.4f} +- {np.std(summary['fold_auc']):.4f}; last-epoch auc per fold "
        f"{[round(a, 4) for a in summary['last_fold_auc']]}, mean {summary['last_mean_auc']:.4f} (the best epoch "
        f"is picked on the fold it is scored on: optimistic); pooled best-epoch predictions of the finished "
        f"folds {sorted(pooled['fold'].unique().tolist())}: {oof_path}",
        flush=True,
    )


if __name__ == "__main__":
    main()
