"""Inference of the artifact detector (multi_classification.py's checkpoints), as inference.py is the melanoma
model's: the networks rebuilt from their checkpoints, each head's probability with test-time augmentation, the
mean over several models and the thresholds that turn probabilities into decisions. multi_classification.py's val
and test modes and export.py's parity check score through it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataset import EpochSampler, Preprocessing
from melanoma_audit.checkpoints import load_checkpoint
from melanoma_audit.inference import tta_logits
from melanoma_audit.loops import Images, Loader, Preparation, image_loader
from melanoma_audit.scoring_runtime import ScoringRuntime
from models import model_from_checkpoint
from utils import UserError

Detector = tuple[nn.Module, dict]  # a network and the checkpoint it was rebuilt from


def load_detectors(
    paths: Sequence[str | Path], device: torch.device, channels_last: bool = False, image_size: int | None = None
) -> list[Detector]:
    """Every detector checkpoint of `paths`, each with its network on `device`; several must detect the same heads,
    in the same order. `image_size` is the size the user asked for: each model is scored at its own, with a notice
    where they differ."""
    loaded: list[Detector] = []
    for path in paths:
        checkpoint = load_checkpoint(path, "artifact")
        model = model_from_checkpoint(checkpoint, path).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if image_size is not None and image_size != checkpoint["image_size"]:
            print(
                f"notice: {path} was trained at {checkpoint['image_size']} px; using that, not --image-size "
                f"{image_size}.",
                flush=True,
            )
        first = loaded[0][1] if loaded else checkpoint
        if checkpoint["heads"] != first["heads"]:
            raise UserError(
                f"{path} detects {', '.join(checkpoint['heads'])}, but {paths[0]} detects "
                f"{', '.join(first['heads'])}: average only models trained on the same heads."
            )
        loaded.append((model, checkpoint))
    return loaded


def predict_probs(
    model: nn.Module,
    filepaths: list[str],
    checkpoint: dict,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    n_tta: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    channels_last: bool = False,
    progress: bool | None = None,
    data_path: str = "auto",
    desc: str = "predict",
) -> np.ndarray:
    """Sigmoid probabilities (images x heads) at the model's own image size and normalisation, in file order, each
    head's averaged over `n_tta` dihedral views; `batch_size` counts the images of a forward pass, views included
    (as predict.py's --batch-size). `data_path` is where the images are decoded (device_data.resolve_data_path)."""
    preprocessing = Preprocessing.from_checkpoint(checkpoint)
    preparation = Preparation(
        checkpoint["image_size"], checkpoint["mean"], checkpoint["std"], preprocessing=preprocessing
    )
    runtime = ScoringRuntime(device, amp_dtype, n_tta, batch_size, num_workers, channels_last, progress)

    def batches(sampler: EpochSampler, images_per_batch: int) -> Loader:
        return image_loader(Images(filepaths), preparation, sampler, images_per_batch, num_workers, device, data_path)

    logits = tta_logits(model, batches, len(filepaths), runtime, independent_heads=True, desc=desc)
    return torch.sigmoid(logits).numpy()


def ensemble_probs(
    models: list[Detector],
    filepaths: list[str],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    **options,
) -> np.ndarray:
    """Each head's probability averaged over the models (each at its own image size and normalisation); `options`
    are predict_probs' keyword arguments."""
    return np.mean([predict_probs(m, filepaths, c, device, amp_dtype, **options) for m, c in models], axis=0)


def thresholds_for(checkpoints: list[dict], heads: list[str], threshold: float | None = None) -> list[float]:
    """`threshold` for every head, else the per-head cut-offs stored in the model; for several models the mean of
    theirs (each was chosen for that model's own probabilities, which the ensemble averages)."""
    if threshold is not None:
        return [threshold] * len(heads)
    stored = [dict(zip(c["heads"], c["thresholds"], strict=True)) for c in checkpoints]
    return [float(np.mean([cut_offs[head] for cut_offs in stored])) for head in heads]
