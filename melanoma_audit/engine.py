"""The training engine both trainers share. A trainer hands `fit` a Task (its data, its network, how it scores an
epoch, what its checkpoints add); the engine does the rest: device placement, channels_last,
DistributedDataParallel and --compile, the loaders, Adam with one warm-up epoch then cosine, the weight average,
resume, the epoch loop with the BatchNorm refresh, gathering the validation predictions over processes, the
best/last/final checkpoints, the history file and its TensorBoard view. A task without validation images (a
refit on every row) trains the same way and writes no best checkpoint: with nothing held out there is no best
epoch."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dataset import EpochSampler
from melanoma_audit.checkpoints import (
    CHECKPOINT_FORMAT,
    check_resume_compatible,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from melanoma_audit.cli import Runtime
from melanoma_audit.config import RunConfig
from melanoma_audit.device_data import resolve_data_path
from melanoma_audit.distributed import average_buffers_over_world, batch_for_share, gather_over_world, wrap_for_world
from melanoma_audit.loops import (
    Images,
    Loader,
    LossFn,
    Preparation,
    image_loader,
    predict_logits,
    refresh_batchnorm,
    train_one_epoch,
)
from melanoma_audit.tensorboard_log import TensorBoardLog
from melanoma_audit.training_recipe import compile_for_training, make_warmup_cosine, weight_average
from utils import precision_name, to_plain, write_csv_atomic, write_text_atomic


@dataclass(frozen=True)
class Epoch:
    """One trained and validated epoch, as the trainer's score function gets it."""

    number: int
    lr: float  # at the epoch's first step
    train_loss: float
    valid_loss: float  # NaN without validation images
    logits: torch.Tensor | None  # every validation item's, gathered over processes, in data set order; None
    targets: torch.Tensor | None  # without validation images
    seconds: float


@dataclass
class Scored:
    """A trainer's verdict on one epoch."""

    score: float  # the best checkpoint holds the epoch with the highest; NaN counts as the lowest
    message: str  # printed after the epoch
    records: list[dict]  # added to the history file
    checkpoint: dict  # what this epoch's checkpoints add: its metrics, its thresholds
    best: dict[str, pd.DataFrame] = field(default_factory=dict)  # kept from the best epoch; see RunOutputs.frames


@dataclass(frozen=True)
class RunOutputs:
    """Where a run's files go. None: the run writes no such file."""

    last: Path  # the resumable checkpoint of the latest epoch
    history: Path  # every epoch's records: JSON lines (.jsonl) or CSV
    best: Path | None = None  # the best epoch's checkpoint; None without validation images (no best epoch)
    final: Path | None = None  # the last epoch's checkpoint
    log: Path | None = None  # one line per history record, where the task has a log_line
    tensorboard: Path | None = None  # a folder
    frames: Mapping[str, Path] = field(default_factory=dict)  # the Scored.best frames written as CSV, by name

    def files(self) -> list[Path]:
        """Every path the run may write: its checkpoints, its logs, its frames and its TensorBoard folder."""
        paths = [self.best, self.final, self.last, self.log, self.history, *self.frames.values(), self.tensorboard]
        return [path for path in paths if path is not None]


@dataclass
class Task:
    """What a trainer supplies to `fit`."""

    kind: str  # "melanoma" or "artifact": the checkpoints' kind
    name: str  # the run, in messages
    net: nn.Module  # built and seeded, on the CPU
    train_images: Images
    valid_images: Images | None  # None: a refit on every row, nothing validated
    preparation: Preparation  # of the training images; the validation images are prepared without augmentation
    shuffle_seed: int
    loss_fn: LossFn
    score: Callable[[Epoch], Scored]
    # what every checkpoint of the run holds: the model's configuration, its input encoding, and the fingerprints
    # of its data and validation images (data_sha256, val_sha256) that --resume compares
    checkpoint: dict
    outputs: RunOutputs
    score_name: str = "auc"
    log_line: Callable[[dict], str] | None = None  # the log file's line for a history record
    data_name: str = "the data"  # what data_sha256 fingerprints, in messages: e.g. the table it was read from


@dataclass
class Progress:
    """Where a run stands: the last finished epoch, the best so far and the history."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    best: dict[str, pd.DataFrame] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def update(self, epoch: int, scored: Scored) -> bool:
        """Records a finished epoch; True when it is the best so far."""
        self.epoch = epoch
        self.history += scored.records
        score = -math.inf if math.isnan(scored.score) else scored.score
        improved = self.best_epoch == 0 or score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.best = score, epoch, scored.best
        return improved

    def state(self) -> dict:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best": {name: to_plain(frame.to_dict(orient="list")) for name, frame in self.best.items()},
            "history": to_plain(self.history),
        }

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        best = {name: pd.DataFrame(columns) for name, columns in state["best"].items()}
        return cls(state["epoch"], state["best_score"], state["best_epoch"], best, state["history"])


@dataclass
class Fitted:
    net: nn.Module  # the network that was validated and saved: the weight average where there is one
    progress: Progress


# --------------------------------------------------------------------------- pieces


def make_loaders(task: Task, config: RunConfig, runtime: Runtime) -> tuple[Loader, Loader | None]:
    """Shuffled training batches, each process its share, and the validation items in order (None without
    validation images); each process decodes its own share, on the side --data-path says."""
    n_train, world = len(task.train_images.filepaths), runtime.world
    train_sampler = EpochSampler(n_train, True, task.shuffle_seed, world.rank, world.size)
    batch_size = batch_for_share(config.batch_size, n_train, world, "--batch-size")
    # drop_last keeps BatchNorm away from a final batch of one image
    drop_last = len(train_sampler) > batch_size
    common = {
        "num_workers": config.num_workers,
        "device": runtime.device,
        "data_path": config.data_path,
        "rank": world.rank,
    }
    train_loader = image_loader(
        task.train_images, task.preparation, train_sampler, batch_size, drop_last=drop_last, **common
    )
    if task.valid_images is None:
        return train_loader, None
    valid_sampler = EpochSampler(len(task.valid_images.filepaths), False, 0, world.rank, world.size)
    no_augmentation = dataclasses.replace(task.preparation, strength="none")
    valid_loader = image_loader(task.valid_images, no_augmentation, valid_sampler, config.batch_size, **common)
    return train_loader, valid_loader


def validate(
    net: nn.Module, train_loader: Loader, valid_loader: Loader | None, config: RunConfig, runtime: Runtime
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The logits and targets of every validation item, from all processes, after re-estimating BatchNorm; without
    a validation loader only the BatchNorm statistics are brought up to date (the saved network needs them)."""
    if config.bn_refresh_batches:
        refresh_batchnorm(net, train_loader, runtime, config.bn_refresh_batches)
    average_buffers_over_world(net, runtime.world)
    if valid_loader is None:
        return None, None
    logits, targets = predict_logits(net, valid_loader, runtime)
    return gather_over_world(logits, targets, len(valid_loader.dataset), runtime.world, runtime.device)


def write_history(task: Task, history: list[dict]) -> None:
    """Rewrites the history file (JSON lines or CSV) and the log from the run's history: each epoch appears once,
    even after a resume, and an interrupted write never leaves half a file."""
    path = task.outputs.history
    if path.suffix == ".jsonl":
        write_text_atomic(path, "".join(pd.Series(record).to_json() + "\n" for record in history))
    else:
        write_csv_atomic(pd.DataFrame(history), path)
    if task.log_line is not None:
        write_text_atomic(task.outputs.log, "".join(task.log_line(record) + "\n" for record in history))


def save_epoch(
    task: Task, scored: Scored, improved: bool, progress: Progress, checkpoint: dict, resumable: dict
) -> None:
    """The main process's output after an epoch: its message, the checkpoints, the history and the best frames."""
    outputs = task.outputs
    print(scored.message, flush=True)
    if improved and outputs.best is not None:
        save_checkpoint(outputs.best, checkpoint)
        print(f"  best {task.score_name} {scored.score:.4f}: saved {outputs.best}", flush=True)
    save_checkpoint(outputs.last, {**checkpoint, **resumable, **progress.state()})
    write_history(task, progress.history)
    write_best_frames(task, progress)


def write_best_frames(task: Task, progress: Progress) -> None:
    for name, frame in progress.best.items():
        if name in task.outputs.frames:
            write_csv_atomic(frame, task.outputs.frames[name])


def epoch_checkpoint(last: dict) -> dict:
    """An epoch's own checkpoint (what _best.pth and _final.pth hold) from the _last.pth of that epoch: without the
    training state and the progress that save_epoch adds to it."""
    resumable = {"optimizer", "scheduler", "scaler", "rng", "training_weights", *Progress().state()}
    return {key: value for key, value in last.items() if key not in resumable}


def repair_outputs(task: Task, progress: Progress, last: dict, n_epochs: int) -> None:
    """What a kill after _last.pth was written may have left undone, redone from it: the history, the best epoch's
    frames and, when that was the last epoch, _final.pth."""
    write_history(task, progress.history)
    write_best_frames(task, progress)
    final = task.outputs.final
    if final is not None and progress.epoch == n_epochs and not final.is_file():
        save_checkpoint(final, epoch_checkpoint(last))


# --------------------------------------------------------------------------- the run


@dataclass
class Training:
    """What one run trains with: the network, the module the training steps call, the weight average, the loaders,
    the optimizer, its schedule, the gradient scaler and the runtime."""

    net: nn.Module  # on the device; saved and averaged uncompiled
    model: nn.Module  # `net` wrapped for the world and compiled where asked
    average: AveragedModel | None
    train_loader: Loader
    valid_loader: Loader | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    runtime: Runtime

    @property
    def eval_net(self) -> nn.Module:
        """What is validated and saved: the weight average where there is one."""
        return self.net if self.average is None else self.average.module


def start_training(task: Task, config: RunConfig, runtime: Runtime) -> Training:
    net = task.net.to(runtime.device)
    if runtime.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = compile_for_training(wrap_for_world(net, runtime.world, runtime.device), config.compile)
    average = weight_average(net, config.ema_decay) if config.ema_decay > 0 else None
    train_loader, valid_loader = make_loaders(task, config, runtime)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.init_lr)
    scheduler = make_warmup_cosine(optimizer, config.n_epochs, len(train_loader))
    scaler = runtime.grad_scaler()
    return Training(net, model, average, train_loader, valid_loader, optimizer, scheduler, scaler, runtime)


def run_checkpoint(task: Task, config: RunConfig, runtime: Runtime) -> dict:
    """What every checkpoint of the run holds, whatever the epoch."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": task.kind,
        **task.checkpoint,
        "config": config.record(),  # the run's record
        # what its "auto" values came to on this device: a resumed run must train as the run it continues did
        "resolved": {
            "precision": precision_name(runtime.amp_dtype),
            "data_path": resolve_data_path(config.data_path, runtime.device),
        },
    }


def resume_run(task: Task, config: RunConfig, training: Training, checkpoint: dict) -> Progress:
    """The progress of the run this one continues (--resume with a _last.pth), its training state restored, and
    what a kill may have left unwritten redone; a fresh Progress otherwise."""
    if not (config.resume and task.outputs.last.is_file()):
        return Progress()
    state = load_checkpoint(task.outputs.last, task.kind)
    check_resume_compatible(state, checkpoint, task.outputs.last, config.fields_free_on_resume(), task.data_name)
    restore_training_state(state, training.net, training.optimizer, training.scheduler, training.scaler)
    if training.average is not None:
        training.average.module.load_state_dict(state["state_dict"])
    progress = Progress.from_state(state)
    if training.runtime.world.is_main:
        repair_outputs(task, progress, state, config.n_epochs)
        print(
            f"resuming {task.name} after epoch {progress.epoch} (best {task.score_name} so far "
            f"{progress.best_score:.4f}, epoch {progress.best_epoch})",
            flush=True,
        )
    return progress


def train_epoch(task: Task, config: RunConfig, training: Training, epoch: int) -> Epoch:
    """One epoch of training, then validation of the network that is saved."""
    started = time.time()
    training.train_loader.sampler.set_epoch(epoch)
    lr = training.optimizer.param_groups[0]["lr"]
    average = training.average
    train_loss = train_one_epoch(
        training.model,
        training.train_loader,
        training.optimizer,
        task.loss_fn,
        training.runtime,
        training.scaler,
        training.scheduler,
        epoch=epoch,
        update_average=None if average is None else functools.partial(average.update_parameters, training.net),
    )
    loaders = training.train_loader, training.valid_loader
    logits, targets = validate(training.eval_net, *loaders, config, training.runtime)
    valid_loss = math.nan if logits is None else float(task.loss_fn(logits, targets))
    return Epoch(epoch, lr, train_loss, valid_loss, logits, targets, round(time.time() - started, 2))


def fit(task: Task, config: RunConfig, runtime: Runtime) -> Fitted:
    """Trains task.net for config.n_epochs, or what is left of them after the last checkpoint with --resume.
    Every process trains; the main one alone prints and writes."""
    training = start_training(task, config, runtime)
    checkpoint = run_checkpoint(task, config, runtime)
    progress = resume_run(task, config, training, checkpoint)
    world = runtime.world
    tensorboard = TensorBoardLog(task.outputs.tensorboard if world.is_main else None, config.tensorboard)
    try:
        for epoch in range(progress.epoch + 1, config.n_epochs + 1):
            scored = task.score(train_epoch(task, config, training, epoch))
            improved = progress.update(epoch, scored)
            if not world.is_main:
                continue
            saved = {**checkpoint, "epoch": epoch, **scored.checkpoint, "state_dict": training.eval_net.state_dict()}
            resumable = training_state(training.optimizer, training.scheduler, training.scaler)
            if training.average is not None:
                resumable["training_weights"] = training.net.state_dict()
            save_epoch(task, scored, improved, progress, saved, resumable)
            tensorboard.write(progress.history)
            if epoch == config.n_epochs and task.outputs.final is not None:
                save_checkpoint(task.outputs.final, saved)
    finally:
        tensorboard.close()
    return Fitted(training.eval_net, progress)
