"""The passes over a DataLoader that training and inference share: one training epoch, a BatchNorm refresh and
prediction, and the loader itself: images decoded and augmented in the DataLoader workers (--data-path cpu) or on
the training device (gpu, device_data)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataset import ImageDataset, Preprocessing, train_transforms
from melanoma_audit import device_data as dd
from melanoma_audit.cli import Runtime
from melanoma_audit.distributed import mean_over_world
from utils import UserError, autocast

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Loader = torch.utils.data.DataLoader | dd.DeviceBatches  # what image_loader makes: the loops read either


def melanoma_loss(out_dim: int) -> LossFn:
    """The melanoma network's training loss (train.py, bench.py): binary cross-entropy on its one logit, or
    cross-entropy over two classes."""
    if out_dim == 1:
        return lambda logits, target: F.binary_cross_entropy_with_logits(logits[:, 0], target)
    return lambda logits, target: F.cross_entropy(logits, target.long())


def make_loader(
    dataset: torch.utils.data.Dataset,
    sampler: torch.utils.data.Sampler,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    drop_last: bool = False,
    collate_fn: Callable[[list], dict] | None = None,
) -> torch.utils.data.DataLoader:
    """Pinned memory and persistent, prefetching workers on a GPU box; plain in-process loading with 0 workers.

    With workers, OpenCV is set to one thread in this process before they fork, and so in each of them: by default
    it starts a thread per core in every process, N workers on N cores then run N x N threads. (Setting it inside a
    freshly forked worker instead can deadlock on the parent's thread pool.)"""
    if num_workers > 0:
        cv2.setNumThreads(1)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


@dataclass(frozen=True)
class Images:
    """A loader's rows: image files, with their side inputs (metadata, lesion features) and targets where any."""

    filepaths: Sequence[str]
    side: np.ndarray | None = None
    targets: np.ndarray | None = None


@dataclass(frozen=True)
class Preparation:
    """How a file becomes the network's input: preprocessed (`preprocessing`: colour constancy, the square rule),
    resized to `size` x `size`, augmented at `strength` (one of dataset.TRAINING_AUGMENTATIONS, reproducibly from
    `seed`), normalised with `mean` and `std` (0-1 scale)."""

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    strength: str = "none"
    seed: int = 0
    preprocessing: Preprocessing = Preprocessing()


def image_loader(
    images: Images,
    preparation: Preparation,
    sampler: torch.utils.data.Sampler,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    data_path: str,
    rank: int = 0,
    drop_last: bool = False,
) -> Loader:
    """Batches of `images` as the loops read them, {"image", "side"?, "target"?}, prepared where --data-path
    (`data_path`, resolved for `device`) says: by albumentations in the DataLoader workers, or on `device` in
    batches (the workers only read bytes). `rank` keeps the device path's augmentation apart between processes."""
    if dd.resolve_data_path(data_path, device) == "cpu":
        return make_loader(image_dataset(images, preparation), sampler, batch_size, num_workers, device, drop_last)
    dataset = dd.ByteDataset(images.filepaths, images.side, images.targets)
    loader = make_loader(dataset, sampler, batch_size, num_workers, device, drop_last, dd.collate_bytes)
    return dd.DeviceBatches(loader, device_pipeline(preparation, device, rank))


def image_dataset(images: Images, preparation: Preparation) -> ImageDataset:
    """The CPU path's Dataset: each item read, augmented and normalised by albumentations where it is loaded."""
    prep = preparation
    transform = train_transforms(prep.size, prep.mean, prep.std, prep.strength, prep.preprocessing)
    return ImageDataset(images.filepaths, transform, images.side, images.targets, augment_seed=prep.seed)


def device_pipeline(preparation: Preparation, device: torch.device, rank: int = 0) -> dd.DevicePipeline:
    """The device path's batch preparation on `device`."""
    prep = preparation
    return dd.DevicePipeline(prep.size, prep.strength, prep.mean, prep.std, device, prep.seed, rank, prep.preprocessing)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def model_inputs(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image batch and its side inputs (metadata and lesion features), on `device`."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
    side = batch.get("side")
    if side is not None:
        side = side.to(device, non_blocking=True)
    return image, side


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 0,
    update_average: Callable[[], None] | None = None,
) -> float:
    """One pass over `loader`; the scheduler steps, and `update_average` (the weight average's update) is called,
    after every optimizer step. Returns the mean training loss.

    In a distributed run the loss is averaged over all processes every step, so that every rank logs the same
    number and all stop together if it diverges."""
    device, progress = runtime.device, runtime.shows_progress
    model.train()
    losses = []
    bar = tqdm(
        loader,
        desc=f"train {epoch}",
        leave=False,
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
    for step, batch in enumerate(bar):
        image, side = model_inputs(batch, device, runtime.channels_last)
        target = batch["target"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, runtime.amp_dtype):
            logits = model(image, side)
        loss = loss_fn(logits.float(), target)
        loss_value = mean_over_world(loss.item(), runtime.world, device)
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"the training loss became {loss_value} at epoch {epoch}, batch {step}: lower --init-lr or "
                "use --precision fp32; the checkpoints already saved are kept."
            )
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if update_average is not None:
            update_average()
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}", smooth=f"{np.mean(losses[-100:]):.4f}")
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def refresh_batchnorm(
    model: nn.Module, loader: torch.utils.data.DataLoader, runtime: Runtime, max_batches: int
) -> None:
    """Re-estimates every BatchNorm's running statistics as a plain average over `max_batches` training batches
    of the current weights. From random weights the weights move so fast that running averages trail them, and
    in eval mode the network then gives every image the same output (validation AUC exactly 0.5)."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms or max_batches <= 0:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    for index, batch in enumerate(loader):
        if index >= max_batches:
            break
        image, side = model_inputs(batch, runtime.device, runtime.channels_last)
        with autocast(runtime.device, runtime.amp_dtype):
            model(image, side)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: torch.utils.data.DataLoader, runtime: Runtime, desc: str = "valid"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the model in eval mode over `loader`; returns all logits (float32, CPU) and targets if any."""
    model.eval()
    all_logits, all_targets = [], []
    progress = runtime.shows_progress
    for batch in tqdm(
        loader, desc=desc, leave=False, disable=None if progress is None else not progress, dynamic_ncols=True
    ):
        image, side = model_inputs(batch, runtime.device, runtime.channels_last)
        with autocast(runtime.device, runtime.amp_dtype):
            logits = model(image, side)
        all_logits.append(logits.float().cpu())
        if "target" in batch:
            all_targets.append(batch["target"])
    logits = torch.cat(all_logits) if all_logits else torch.empty(0)
    targets = torch.cat(all_targets) if all_targets else None
    return logits, targets
