"""The artifact detector's train mode (multi_classification.py --mode train): the seeded train/val split of the
annotations, the masked loss, each epoch's per-head metrics and thresholds, and the run the engine trains."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from melanoma_audit.annotations import read_artifact_annotations
from melanoma_audit.checkpoints import require_resumable, rows_fingerprint
from melanoma_audit.cli import Runtime, claim_run_files
from melanoma_audit.config import ArtifactConfig
from melanoma_audit.device_data import resolve_data_path
from melanoma_audit.engine import Epoch, RunOutputs, Scored, Task, fit
from melanoma_audit.loops import Images, Preparation
from melanoma_audit.metrics import choose_thresholds, format_table, mean_auc, metrics_table
from models import ArtifactNet, input_normalization
from utils import UserError, ensure_writable_dir, precision_name, seed_everything, to_plain


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the annotated cells; NaN targets (blank = not annotated) add nothing,
    neither loss nor gradient. A batch without any annotated cell gives 0."""
    annotated = ~torch.isnan(targets)
    if not annotated.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[annotated], targets[annotated].to(logits.dtype))


def split_train_val(labels: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the rows into train and val indices: stratified on the full label combination (blanks
    included) where every combination can be split, else on "has any artifact", else plain random."""
    n_rows = len(labels)
    n_val = n_rows - int(round(n_rows * ratio))
    if n_val < 1 or n_val >= n_rows:
        raise UserError(
            f"--ratio {ratio} leaves {n_rows - n_val} training and {n_val} validation images of {n_rows}: both "
            "need at least one; annotate more images or change --ratio."
        )
    combination = np.array(["".join("-" if np.isnan(v) else str(int(v)) for v in row) for row in labels])
    any_artifact = np.array([str(int((row == 1).any())) for row in labels])
    for keys in (combination, any_artifact, None):
        if keys is not None:
            values, counts = np.unique(keys, return_counts=True)
            keys = np.where(np.isin(keys, values[counts < 2]), "rare", keys)
        try:
            train_index, val_index = train_test_split(
                np.arange(n_rows), test_size=n_val, random_state=seed, shuffle=True, stratify=keys
            )
        except ValueError:  # a class with one member, or more classes than val rows
            continue
        return np.sort(train_index), np.sort(val_index)
    raise AssertionError("an unstratified split cannot fail")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_outputs(model_path: str | Path) -> RunOutputs:
    """What train mode writes: the best epoch's model at --model_path, and beside it the resumable state, the
    per-epoch metrics and the TensorBoard folder."""
    model = Path(model_path)
    return RunOutputs(
        best=model,
        last=model.with_name(f"{model.stem}_last.pth"),
        history=model.with_name(f"{model.stem}_history.csv"),
        tensorboard=model.parent / "tb" / model.stem,
    )


def score_epoch(epoch: Epoch, heads: list[str], n_epochs: int) -> Scored:
    """Per head, the metrics at the cut-off with the highest F1 on the val split; the score is their mean AUC."""
    probs, targets = torch.sigmoid(epoch.logits).numpy(), epoch.targets.numpy()
    thresholds = choose_thresholds(targets, probs)
    table = metrics_table(heads, targets, probs, thresholds)
    score = mean_auc(table)
    message = (
        f"epoch {epoch.number}/{n_epochs}, lr {epoch.lr:.7f}, train loss {epoch.train_loss:.5f}, valid loss "
        f"{epoch.valid_loss:.5f}, mean val auc {score:.4f}, {epoch.seconds} s\n{format_table(table)}"
    )
    common = {"epoch": epoch.number, "lr": epoch.lr, "train_loss": epoch.train_loss, "valid_loss": epoch.valid_loss}
    records = [{**common, "seconds": epoch.seconds, **row} for row in table.to_dict(orient="records")]
    checkpoint = {"thresholds": thresholds, "metrics": to_plain(table.to_dict(orient="list"))}
    return Scored(score, message, records, checkpoint, {"table": table})


@dataclass(frozen=True)
class Annotations:
    """The annotation file's rows, heads and labels (NaN: blank), and its split into train and val rows."""

    frame: pd.DataFrame
    heads: list[str]
    labels: np.ndarray
    train_index: np.ndarray
    val_index: np.ndarray

    def images(self, index: np.ndarray) -> Images:
        return Images(self.frame["filepath"].iloc[index].tolist(), targets=self.labels[index])

    def names(self, index: np.ndarray) -> list[str]:
        return self.frame["image_name"].iloc[index].tolist()


def run_train(config: ArtifactConfig, runtime: Runtime) -> dict:
    """Trains the detector; under torchrun as DistributedDataParallel, rank 0 alone writing (as train.py)."""
    world = runtime.world
    frame, heads, labels = read_artifact_annotations(config.ann_path, config.img_path)
    data = Annotations(frame, heads, labels, *split_train_val(labels, config.ratio, config.seed))
    outputs = run_outputs(config.model_path)
    if world.is_main:
        ensure_writable_dir(outputs.best.parent, "model folder (--model_path)")
        require_resumable([outputs.last], config.resume, "--model_path")
        claim_run_files(outputs.files(), outputs.last, config.resume, config.overwrite, "choose another --model_path")
    if world.distributed:
        dist.barrier()
    log = print if world.is_main else (lambda *_, **__: None)
    announce_training(log, config, data, runtime)
    progress = fit(detector_task(config, data, outputs), config, runtime).progress
    best_table = progress.best["table"]
    log(
        f"best epoch {progress.best_epoch} (mean val auc {mean_auc(best_table):.4f}), thresholds chosen on the val "
        f"split:\n{format_table(best_table)}\nmodel {outputs.best}, resumable state {outputs.last}, "
        f"per-epoch metrics {outputs.history}",
        flush=True,
    )
    return {
        "best_epoch": progress.best_epoch,
        "mean_auc": mean_auc(best_table),
        "table": best_table,
        "outputs": outputs,
    }


def announce_training(
    log: Callable[..., None],
    config: ArtifactConfig,
    data: Annotations,
    runtime: Runtime,
) -> None:
    """A notice for each head that cannot learn, and what the run trains on, where and how."""
    for i, head in enumerate(data.heads):
        column = data.labels[data.train_index, i]
        if not (column == 1).any() or not (column == 0).any():
            log(f"notice: head {head} has only one class among the training images: it cannot learn.", flush=True)
    log(
        f"{len(data.frame)} annotated images, heads {', '.join(data.heads)}; {len(data.train_index)} train / "
        f"{len(data.val_index)} val; "
        f"{config.enet_type} at {config.image_size} px on {runtime.device}, "
        f"precision {precision_name(runtime.amp_dtype)}, "
        f"data path {resolve_data_path(config.data_path, runtime.device)}, lr {config.init_lr}",
        flush=True,
    )


def detector_task(config: ArtifactConfig, data: Annotations, outputs: RunOutputs) -> Task:
    """What the engine trains: the seeded network, the split's images, the masked loss and the epoch score."""
    seed_everything(config.seed)
    net = ArtifactNet(
        config.enet_type,
        data.heads,
        pretrained=config.pretrained,
        weights_path=config.pretrained_weights,
        bn_momentum=config.bn_momentum,
    )
    mean, std = input_normalization(config.enet_type)
    return Task(
        kind="artifact",
        name=str(outputs.best),
        net=net,
        train_images=data.images(data.train_index),
        valid_images=data.images(data.val_index),
        preparation=Preparation(
            config.image_size, mean, std, "artifact", seed=config.seed, preprocessing=config.preprocessing
        ),
        shuffle_seed=config.seed,
        loss_fn=masked_bce,
        score=functools.partial(score_epoch, heads=data.heads, n_epochs=config.n_epochs),
        checkpoint=detector_checkpoint(config, data),
        outputs=outputs,
        score_name="mean val auc",
        data_name=str(config.ann_path),
    )


def detector_checkpoint(config: ArtifactConfig, data: Annotations) -> dict:
    """What every checkpoint of the run holds: the model, its input encoding, how it was trained and on what."""
    mean, std = input_normalization(config.enet_type)
    heads = data.heads
    return {
        "model": {"enet_type": config.enet_type, "heads": list(heads)},
        "heads": list(heads),
        "image_size": config.image_size,
        "mean": list(mean),
        "std": list(std),
        **config.preprocessing.record(),
        "loss": "sigmoid + binary cross-entropy per head, blank labels masked",
        "threshold_rule": "max F1 on the val split",
        "ann_path": str(Path(config.ann_path).resolve()),
        "ann_sha256": file_sha256(config.ann_path),
        "train_images": data.names(data.train_index),
        "val_images": data.names(data.val_index),
        # what --resume compares: every annotated row (name and labels) and the val images
        "data_sha256": rows_fingerprint(
            (name, *(f"{head}={value}" for head, value in zip(heads, row, strict=True)))
            for name, row in zip(data.frame["image_name"], data.labels.tolist(), strict=True)
        ),
        "val_sha256": rows_fingerprint((name,) for name in data.names(data.val_index)),
    }
