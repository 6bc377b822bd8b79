"""Shared plumbing for both trainers: user errors, device and precision, seeding, the training loop,
metrics, schedules and checkpoints. Everything here is passed what it needs; nothing is global."""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import math
import os
import pickle
import random
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torch import nn
from tqdm import tqdm

CHECKPOINT_FORMAT = 1


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
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write to the {what} {path} ({error.strerror}): choose a folder you can write to."
        ) from None
    return path


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
        # inference, slowed training by a quarter and spent a minute autotuning (README, Benchmark).
        return torch.device("cuda")
    if request == "cuda":
        raise UserError(
            "--device cuda was asked for but no CUDA GPU is visible: check --CUDA_VISIBLE_DEVICES and the "
            "driver, or use --device cpu."
        )
    print("notice: no CUDA GPU found, running on the CPU.", flush=True)
    return torch.device("cpu")


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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_device_flags(parser: argparse.ArgumentParser, underscore_aliases: bool = False) -> None:
    """The device, precision, layout and progress flags every script shares (one definition, one meaning)."""

    def names(flag: str) -> list[str]:
        return [flag, "--" + flag[2:].replace("-", "_")] if underscore_aliases and "-" in flag[2:] else [flag]

    parser.add_argument("--CUDA_VISIBLE_DEVICES", default=None, help="GPU ids, e.g. 0 or 0,1, set before CUDA starts")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 (or fp16 + GradScaler) autocast on a GPU; on the CPU bf16 from 192 px where the CPU has "
        "native bf16, else fp32",
    )
    parser.add_argument(
        *names("--channels-last"),
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


SCRATCH_BN_REFRESH_BATCHES = 10


def add_bn_refresh_flag(parser: argparse.ArgumentParser, underscore_aliases: bool = False) -> None:
    """--bn-refresh-batches, shared by both trainers; resolve its default with `bn_refresh_default`."""
    names = ["--bn-refresh-batches", "--bn_refresh_batches"] if underscore_aliases else ["--bn-refresh-batches"]
    parser.add_argument(
        *names,
        dest="bn_refresh_batches",
        type=int,
        default=None,
        help="re-estimate BatchNorm statistics on this many training batches before each validation "
        f"(default {SCRATCH_BN_REFRESH_BATCHES} with --no-pretrained, 0 with ImageNet weights)",
    )
    parser.add_argument(
        *(["--bn-momentum", "--bn_momentum"] if underscore_aliases else ["--bn-momentum"]),
        dest="bn_momentum",
        type=float,
        default=None,
        help="BatchNorm momentum of the backbone, PyTorch's convention (default 0.1; efficientnet-pytorch's own is "
        "0.01)",
    )


def bn_refresh_default(no_pretrained: bool) -> int:
    """From random weights the running statistics trail the weights (see refresh_batchnorm); fine-tuned ImageNet
    statistics do not need it."""
    return SCRATCH_BN_REFRESH_BATCHES if no_pretrained else 0


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """--compile, shared by both trainers; apply it with `compile_for_training`."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward pass (its first step takes minutes; validation and the saved "
        "weights stay uncompiled)",
    )


def compile_for_training(model: nn.Module, enabled: bool) -> nn.Module:
    """The module the training steps call: `model` compiled when asked, else `model` itself. The caller keeps
    saving, averaging and validating the uncompiled network, so checkpoints carry no compiler wrapper."""
    return torch.compile(model) if enabled else model


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
    fp32; at 128 px bf16 was no faster, README "Benchmark"); fp32 otherwise.
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


def check_resume_compatible(
    state: dict, config: dict, path: str | Path, keys: Sequence[str], arg_flags: dict[str, str]
) -> None:
    """A resumed run must be the same run: `keys` of the checkpoint config and the arguments in `arg_flags`
    (argument name -> the flag that sets it) must equal this run's, else a UserError names the first difference."""
    for key in keys:
        if state.get(key) != to_plain(config[key]):
            raise UserError(
                f"{path} was saved with {key} = {state.get(key)}, this run has {to_plain(config[key])}: "
                "resume with the original flags, or start afresh with --overwrite."
            )
    for key, flag in arg_flags.items():
        if state["args"].get(key) != config["args"].get(key):
            raise UserError(
                f"{path} was saved with {flag} {state['args'].get(key)}, this run has "
                f"{config['args'].get(key)}: resume with the original flags, or start afresh with --overwrite."
            )


def claim_outputs(paths: Sequence[Path], last: Path, resume: bool, overwrite: bool, alternative: str) -> None:
    """Refuses to overwrite an earlier run's files: they are kept when the run is continued (--resume with its
    `last` checkpoint present), deleted with --overwrite, else a UserError suggests `alternative`. Temporary files
    that an interrupted write of these outputs left behind are removed in any case."""
    for path in paths:  # a temporary file is never a finished output: a killed run left it
        for leftover in temp_files_of(path):
            leftover.unlink(missing_ok=True)
    existing = [path for path in paths if path.exists()]
    if not existing or (resume and last.is_file()):
        return
    if overwrite:
        for path in existing:
            path.unlink(missing_ok=True)
        return
    raise UserError(
        f"{existing[0]} already exists from an earlier run: pass --resume to continue it, --overwrite to replace "
        f"it, or {alternative}."
    )


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


def default_num_workers() -> int:
    """Half the cores, at most 8: the torch threads need the rest, and a 2-core laptop must not thrash."""
    return min(8, (os.cpu_count() or 2) // 2)


def make_loader(
    dataset: torch.utils.data.Dataset,
    sampler: torch.utils.data.Sampler,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    drop_last: bool = False,
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
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# --------------------------------------------------------------------------- training loop


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def _model_inputs(batch: dict, device: torch.device, channels_last: bool) -> tuple:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    image = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
    meta = batch.get("meta")
    if meta is not None:
        meta = meta.to(device, non_blocking=True)
    return image, meta


class WeightAverage:
    """An exponential moving average of a model's weights, updated after every optimizer step.

    From random weights on a small data set the weights jump from step to step and the validation AUC with them;
    their average over the last ~1/(1 - decay) steps is a steadier, usually better model. Buffers (BatchNorm
    statistics) are copied, not averaged: refresh_batchnorm re-estimates them for the averaged weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.source, self.decay = model, decay
        self.model = copy.deepcopy(model)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self._pairs = [list(self.model.parameters()), list(model.parameters())]
        self._buffer_pairs = list(zip(self.model.buffers(), model.buffers(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        # one multi-tensor kernel for all parameters rather than a launch per tensor on every training step
        torch._foreach_lerp_(*self._pairs, 1.0 - self.decay)
        for average, current in self._buffer_pairs:
            average.copy_(current)


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    channels_last: bool = False,
    epoch: int = 0,
    progress: bool | None = None,
    world: World | None = None,
    weight_average: WeightAverage | None = None,
) -> float:
    """One pass over `loader`; the scheduler (and the weight average, if any) steps per batch. Returns the mean
    training loss.

    In a distributed run the loss is averaged over all processes every step, so that every rank logs the same
    number and all stop together if it diverges."""
    world = world or World()
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
        image, meta = _model_inputs(batch, device, channels_last)
        target = batch["target"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            logits = model(image, meta)
        loss = loss_fn(logits.float(), target)
        loss_value = mean_over_world(loss.item(), world, device)
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
        if weight_average is not None:
            weight_average.update()
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}", smooth=f"{np.mean(losses[-100:]):.4f}")
    return float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def refresh_batchnorm(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    max_batches: int,
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
        image, meta = _model_inputs(batch, device, channels_last)
        with autocast(device, amp_dtype):
            model(image, meta)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool = False,
    progress: bool | None = None,
    desc: str = "valid",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs the model in eval mode over `loader`; returns all logits (float32, CPU) and targets if any."""
    model.eval()
    all_logits, all_targets = [], []
    for batch in tqdm(
        loader, desc=desc, leave=False, disable=None if progress is None else not progress, dynamic_ncols=True
    ):
        image, meta = _model_inputs(batch, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(image, meta)
        all_logits.append(logits.float().cpu())
        if "target" in batch:
            all_targets.append(batch["target"])
    logits = torch.cat(all_logits) if all_logits else torch.empty(0)
    targets = torch.cat(all_targets) if all_targets else None
    return logits, targets


# --------------------------------------------------------------------------- schedule


def make_warmup_cosine(
    optimizer: torch.optim.Optimizer, n_epochs: int, steps_per_epoch: int, warmup_epochs: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from a tenth of the learning rate over the first epoch, then cosine to zero.

    Stepped once per batch. A one-epoch run skips the warm-up so that it still reaches the full rate.
    """
    total = max(1, n_epochs * steps_per_epoch)
    warmup = warmup_epochs * steps_per_epoch if n_epochs > warmup_epochs else 0
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


# --------------------------------------------------------------------------- metrics


def safe_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (it is undefined there)."""
    targets = np.asarray(targets)
    if targets.size == 0 or np.unique(targets).size < 2:
        return float("nan")
    return float(roc_auc_score(targets, scores))


def binary_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, ROC AUC, balanced accuracy, sensitivity and specificity at `threshold`."""
    targets = np.asarray(targets).astype(int)
    predicted = (np.asarray(probs) >= threshold).astype(int)
    positives, negatives = targets == 1, targets == 0
    sensitivity = float(predicted[positives].mean()) if positives.any() else float("nan")
    specificity = float((1 - predicted[negatives]).mean()) if negatives.any() else float("nan")
    return {
        "acc": float((predicted == targets).mean()) if targets.size else float("nan"),
        "auc": safe_auc(targets, probs),
        "balanced_acc": float(np.nanmean([sensitivity, specificity])),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def best_f1_threshold(targets: np.ndarray, probs: np.ndarray) -> float:
    """The probability cut-off with the highest F1 (predict positive when prob >= cut-off); 0.5 when the
    targets hold no positive, where F1 is undefined."""
    targets, probs = np.asarray(targets).astype(int), np.asarray(probs, dtype=float)
    if not (targets == 1).any():
        return 0.5
    precision, recall, thresholds = precision_recall_curve(targets, probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(thresholds[int(np.argmax(f1[:-1]))])


def head_metrics(targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """One binary head: ROC AUC, average precision, F1, precision, recall and accuracy at `threshold`, and the
    support. Rows whose target is NaN (not annotated) are left out; a metric that is undefined for the rows
    left (AUC and AP without both classes) is NaN, and precision with no positive prediction is 0."""
    targets, probs = np.asarray(targets, dtype=float), np.asarray(probs, dtype=float)
    annotated = ~np.isnan(targets)
    targets, probs = targets[annotated].astype(int), probs[annotated]
    predicted = probs >= threshold
    true_pos = int((predicted & (targets == 1)).sum())
    n_pred, n_pos = int(predicted.sum()), int((targets == 1).sum())
    precision = true_pos / n_pred if n_pred else 0.0
    recall = true_pos / n_pos if n_pos else float("nan")
    f1 = 2 * true_pos / (n_pred + n_pos) if n_pred + n_pos else float("nan")
    has_both = 0 < n_pos < targets.size
    return {
        "auc": safe_auc(targets, probs),
        "ap": float(average_precision_score(targets, probs)) if has_both else float("nan"),
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "acc": float((predicted == (targets == 1)).mean()) if targets.size else float("nan"),
        "threshold": float(threshold),
        "support": int(targets.size),
        "positives": n_pos,
    }


# --------------------------------------------------------------------------- atomic files and checkpoints


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


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Saves atomically; the payload must hold only tensors and plain Python values (weights_only-safe)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # through a Python file: a full disk is then an OSError (torch's own writer raises a RuntimeError)
        torch.save(checkpoint, handle)


def load_checkpoint(path: str | Path, expected_kind: str) -> dict:
    """Loads with weights_only=True (a checkpoint can never run code) and checks it belongs to this script.

    expected_kind is 'melanoma' (train.py / predict.py) or 'bias' (multi_classification.py).
    """
    path = Path(path)
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
    kind = checkpoint.get("kind")
    if kind != expected_kind:
        writer = {"melanoma": "train.py", "bias": "multi_classification.py"}.get(kind, "another tool")
        reader = {"melanoma": "train.py / predict.py", "bias": "multi_classification.py"}[expected_kind]
        raise UserError(f"checkpoint {path} was written by {writer}, not {reader}: pass a {expected_kind} model.")
    return checkpoint


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
