"""The optimisation recipe the engine applies to every run: torch.compile of the training forward pass, the
exponential moving average of the weights, and the learning-rate schedule (one warm-up epoch, then cosine)."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def compile_for_training(model: nn.Module, enabled: bool) -> nn.Module:
    """The module the training steps call: `model` compiled when asked, else `model` itself. The caller keeps
    saving, averaging and validating the uncompiled network, so checkpoints carry no compiler wrapper."""
    return torch.compile(model) if enabled else model


def weight_average(net: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `net`'s weights, to be updated after every optimizer step.

    From random weights on a small data set the weights jump from step to step and the validation AUC with them;
    their average over the last ~1/(1 - decay) steps is a steadier, usually better model. Buffers (BatchNorm
    statistics) are copied, not averaged (use_buffers=False): the BatchNorm refresh re-estimates them for the
    averaged weights. AveragedModel copies the weights on its first update; that update is made here, so the
    average starts from the initial weights and every training step is averaged in."""
    average = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    average.requires_grad_(False)
    average.update_parameters(net)
    return average


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
