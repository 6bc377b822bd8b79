"""This process's place in a torchrun run and the operations over processes that training needs: joining the
process group, wrapping the network in DistributedDataParallel, averaging and gathering over processes."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils import UserError, select_device


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE); one process
    without torchrun."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(device_request: str) -> tuple[World, torch.device]:
    """Joins the process group when started by torchrun (NCCL on GPUs, gloo on CPUs) and picks this process's
    device; a plain `python train.py` is a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), select_device(device_request)
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)
    if device_request != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        device, backend = torch.device("cuda", world.local_rank), "nccl"
    elif device_request == "cuda":
        raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu with torchrun.")
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if world.is_main:
        print(f"distributed: {size} processes on the {backend} backend", flush=True)
    return world, device


def teardown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_for_world(net: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module the training steps call: DistributedDataParallel averages the gradients over processes and keeps
    the weights identical; `net` itself is what gets saved, so a checkpoint is the same on 1 or N processes."""
    if not world.distributed:
        return net
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_world(value: float, world: World, device: torch.device) -> float:
    """The mean of a per-process number over all processes (identical on every rank)."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world.size


def average_buffers_over_world(model: nn.Module, world: World) -> None:
    """Averages the BatchNorm running statistics over processes (each rank saw other images), so that every
    rank validates, and rank 0 saves, the same model, estimated from all the data."""
    if not world.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world.size


def gather_over_world(
    logits: torch.Tensor, targets: torch.Tensor | None, n_items: int, world: World, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reassembles the predictions of an EpochSampler(shuffle=False) split over ranks into the full, ordered set
    of `n_items` rows on every rank, so that AUC is computed over the whole validation set, never per rank.

    Rank r held items r, r + size, r + 2 size, ... (padded by repetition to equal length), hence the interleave."""
    if not world.distributed:
        return logits, targets

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor, device=device) for _ in range(world.size)]
        dist.all_gather(parts, tensor.to(device).contiguous())
        stacked = torch.stack([part.cpu() for part in parts], dim=1)  # (per_rank, size, ...)
        return stacked.reshape(-1, *tensor.shape[1:])[:n_items]

    return gather(logits), None if targets is None else gather(targets)


def batch_for_share(batch_size: int, n_items: int, world: World, flag: str) -> int:
    """The training batch size for one process: `batch_size`, or the process's share of the `n_items` training
    images when that is smaller (with a notice). Each rank then trains at least one step an epoch: under torchrun
    a batch larger than a rank's share, with drop_last, would train none."""
    share = math.ceil(n_items / world.size)
    if share >= batch_size:
        return batch_size
    if world.is_main:
        where = f"each of the {world.size} processes has" if world.distributed else "there are"
        print(
            f"notice: {flag} {batch_size} is more than the {share} training images {where}: batches of {share}.",
            flush=True,
        )
    return share
