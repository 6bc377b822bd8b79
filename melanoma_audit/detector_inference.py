"""Inference of the artifact detector (multi_classification.py's checkpoints), as inference.py is the melanoma
model's: the ArtifactPredictor that scores images with a network rebuilt from its checkpoint (each head's
probability with test-time augmentation, through inference.tta_logits), and the ArtifactEnsemble that averages
several and turns probabilities into decisions with their thresholds. multi_classification.py's val and test modes
and export.py's parity check score through it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataset import EpochSampler, Preprocessing
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.cli import ScoringRuntime
from melanoma_audit.inference import tta_logits
from melanoma_audit.loops import Images, Loader, Preparation, image_loader
from models import model_from_checkpoint
from utils import UserError


@dataclass
class ArtifactPredictor:
    """A multi_classification.py checkpoint ready to score images: its network with the input it trained on (size,
    normalisation, preprocessing), its heads and their thresholds, the runtime it scores under (device, precision,
    TTA views, loader) and where the images are decoded (`data_path`: device_data.resolve_data_path)."""

    path: Path
    network: nn.Module
    checkpoint: dict
    runtime: ScoringRuntime
    data_path: str = "auto"

    @classmethod
    def from_checkpoint(cls, path: str | Path, runtime: ScoringRuntime, data_path: str = "auto") -> ArtifactPredictor:
        checkpoint = load_checkpoint(path, "artifact")
        network = model_from_checkpoint(checkpoint, path).to(runtime.device)
        if runtime.channels_last:
            network = network.to(memory_format=torch.channels_last)
        return cls(Path(path), network, checkpoint, runtime, data_path)

    @property
    def heads(self) -> list[str]:
        return list(self.checkpoint["heads"])

    @property
    def thresholds(self) -> list[float]:
        """One cut-off per head, in head order: the highest F1 on the model's val split."""
        return list(self.checkpoint["thresholds"])

    @property
    def image_size(self) -> int:
        return int(self.checkpoint["image_size"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_checkpoint(self.checkpoint)

    def probabilities(self, filepaths: Sequence[str], desc: str = "predict") -> np.ndarray:
        """Sigmoid probabilities (images x heads) at the model's own image size and normalisation, in file order,
        each head's averaged over the runtime's TTA views; runtime.batch_size counts the images of a forward pass,
        views included (as predict.py's --batch-size)."""
        runtime, checkpoint = self.runtime, self.checkpoint
        preparation = Preparation(
            self.image_size, checkpoint["mean"], checkpoint["std"], preprocessing=self.preprocessing
        )
        images = Images(list(filepaths))

        def batches(sampler: EpochSampler, images_per_batch: int) -> Loader:
            return image_loader(
                images, preparation, sampler, images_per_batch, runtime.num_workers, runtime.device, self.data_path
            )

        logits = tta_logits(self.network, batches, len(filepaths), runtime, independent_heads=True, desc=desc)
        return torch.sigmoid(logits).numpy()


@dataclass
class ArtifactEnsemble:
    """Detectors that detect the same heads, in the same order (checked here): each head's probability is the mean
    over them (each scored at its own image size and normalisation), its threshold the mean of theirs."""

    predictors: list[ArtifactPredictor]

    def __post_init__(self) -> None:
        first = self.predictors[0]
        for predictor in self.predictors[1:]:
            if predictor.heads != first.heads:
                raise UserError(
                    f"{predictor.path} detects {', '.join(predictor.heads)}, but {first.path} detects "
                    f"{', '.join(first.heads)}: average only models trained on the same heads."
                )

    @property
    def heads(self) -> list[str]:
        return self.predictors[0].heads

    @property
    def checkpoints(self) -> list[dict]:
        return [predictor.checkpoint for predictor in self.predictors]

    def probabilities(self, filepaths: Sequence[str], desc: str = "predict") -> np.ndarray:
        """Each head's probability (images x heads) averaged over the models."""
        return np.mean([predictor.probabilities(filepaths, desc) for predictor in self.predictors], axis=0)

    def thresholds(self, heads: Sequence[str], threshold: float | None = None) -> list[float]:
        """`threshold` for each of `heads`, else the per-head cut-offs stored in the models, the mean of theirs for
        several (each was chosen for that model's own probabilities, which the ensemble averages)."""
        if threshold is not None:
            return [threshold] * len(heads)
        stored = [dict(zip(p.heads, p.thresholds, strict=True)) for p in self.predictors]
        return [float(np.mean([cut_offs[head] for cut_offs in stored])) for head in heads]
