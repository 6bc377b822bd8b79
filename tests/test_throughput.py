"""throughput: the timed training step is the training loop's own (its divergence guard included)."""

import math

import pytest
import torch
from torch import nn

from melanoma_audit.loops import TrainingDiverged, melanoma_loss
from melanoma_audit.throughput import forward_throughput, random_batch, training_step_throughput

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """The loops' model interface, model(image, side) -> logits, at a few parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 1)

    def forward(self, image: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.conv(image).mean((2, 3)))


def test_the_timed_step_trains_the_model():
    torch.manual_seed(0)
    model = TinyNet()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    batch = random_batch(4, 16, 0, CPU, channels_last=False)
    assert set(batch) == {"image", "target"}
    rate = training_step_throughput(model, batch, melanoma_loss(1), 3, 1, CPU, None, channels_last=False)
    assert math.isfinite(rate) and rate > 0
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))


def test_a_diverging_step_stops_as_the_training_loop_does():
    batch = random_batch(4, 16, 0, CPU, channels_last=False)
    batch["image"] = torch.full_like(batch["image"], math.nan)
    with pytest.raises(TrainingDiverged, match="training loss became nan"):
        training_step_throughput(TinyNet(), batch, melanoma_loss(1), 2, 0, CPU, None, channels_last=False)


def test_the_forward_pass_leaves_the_model_untouched():
    model = TinyNet().eval()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    batch = random_batch(2, 16, 3, CPU, channels_last=True)
    assert batch["side"].shape == (2, 3) and batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert forward_throughput(model, batch, 2, 1, CPU, None) > 0
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
