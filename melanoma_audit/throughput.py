"""How fast a network runs on inputs already on the device, with no data loading (bench.py's ceilings): its forward
pass as prediction runs it, and the engine's own training step (loops.train_one_epoch); with the device clock and
peak memory they are read with."""

from __future__ import annotations

import resource
import time

import torch
from torch import nn

from melanoma_audit.cli import Runtime
from melanoma_audit.loops import LossFn, train_one_epoch
from utils import autocast


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def random_batch(batch_size: int, image_size: int, n_meta: int, device: torch.device, channels_last: bool) -> dict:
    """A batch as the loops read it, {"image", "side"?, "target"}, of random values already on the device (the
    images in the model's memory layout)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    batch = {"image": image}
    if n_meta:
        batch["side"] = torch.randn(batch_size, n_meta, device=device)
    batch["target"] = torch.randint(0, 2, (batch_size,), device=device).float()
    return batch


@torch.no_grad()
def forward_throughput(
    model: nn.Module, batch: dict, steps: int, warmup: int, device: torch.device, amp_dtype: torch.dtype | None
) -> float:
    """Images per second of the model's forward pass alone on `batch`, the output copied back as prediction does:
    `warmup` untimed passes, then `steps` timed ones."""
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        with autocast(device, amp_dtype):
            model(batch["image"], batch.get("side")).float().cpu()
    synchronize(device)
    return steps * len(batch["image"]) / (time.perf_counter() - started)


def training_step_throughput(
    model: nn.Module,
    batch: dict,
    loss_fn: LossFn,
    steps: int,
    warmup: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> float:
    """Images per second of the training loop's own step (train_one_epoch: forward, loss, backward, Adam step, the
    loss read back) on `batch` again and again: `warmup` untimed steps, then `steps` timed ones."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    runtime = Runtime(device, amp_dtype, channels_last, progress=False)
    scaler = runtime.grad_scaler()

    def train(n_steps: int) -> None:
        train_one_epoch(model, [batch] * n_steps, optimizer, loss_fn, runtime, scaler)

    train(warmup)
    synchronize(device)
    started = time.perf_counter()
    train(steps)
    synchronize(device)
    return steps * len(batch["image"]) / (time.perf_counter() - started)
