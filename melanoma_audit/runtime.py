"""The runtime context of a training run: this process's place among the processes, its device, the autocast
dtype, the memory layout and the progress bars. Made once from the run's flags (training_runtime) and passed
whole to the engine and the loops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from melanoma_audit.distributed import World, setup_world, teardown_world
from utils import make_grad_scaler, resolve_precision, set_visible_devices

if TYPE_CHECKING:  # the config module builds networks' settings; the loops need none of it
    from melanoma_audit.config import RunConfig


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs the network. amp_dtype is autocast's (None: fp32); progress is the
    --progress flag (None: bars only on a terminal), shown by the main process alone."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    progress: bool | None = None
    world: World = field(default_factory=World)

    @property
    def shows_progress(self) -> bool | None:
        """What tqdm's switch takes: the flag on the main process, off on the others."""
        return self.progress and self.world.is_main

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A fresh gradient scaler: active only for fp16, whose gradients underflow without it."""
        return make_grad_scaler(self.device, self.amp_dtype)


@contextlib.contextmanager
def training_runtime(config: RunConfig) -> Iterator[Runtime]:
    """The runtime a training run's flags ask for: the process group joined under torchrun (and left at the end),
    this process's device, and --precision resolved for that device and the run's image size."""
    set_visible_devices(config.CUDA_VISIBLE_DEVICES)
    world, device = setup_world(config.device)
    try:
        amp_dtype = resolve_precision(config.precision, device, config.image_size)
        yield Runtime(device, amp_dtype, config.channels_last, config.progress, world)
    finally:
        teardown_world(world)
