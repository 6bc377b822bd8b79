"""What an exported model computes and the JSON that says how to feed it: the graphs export.py traces (the
normalisation inside them, then the network, and for a melanoma model the lesion features' scaling and late fusion's
metadata regression) and the model-specific part of their JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from melanoma_audit.checkpoints import kind_of
from melanoma_audit.inference import LoadedModel, load_melanoma_model
from melanoma_audit.onnx_model import IMAGE_INPUT, LESION_INPUT, MELANOMA_OUTPUTS, META_INPUT
from models import model_from_checkpoint

# --------------------------------------------------------------------------- what the exported graph computes


class Normalise(nn.Module):
    """uint8 (or 0-255 float) RGB NCHW to the network's input: (x / 255 - mean) / std per channel."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() - self.mean) / self.std


class MelanomaGraph(nn.Module):
    """A train.py model as predict.py scores one view: the normalisation, the lesion features' scaling, the network
    and, under late fusion, the metadata logistic regression's log-odds added to the network's. Returns
    MELANOMA_OUTPUTS: P(melanoma), the network's log-odds and the metadata's (zero without late fusion)."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.normalise = Normalise(loaded.mean, loaded.std)
        self.net = loaded.model
        self.out_dim = loaded.model.fc.out_features
        self.meta_in_network = loaded.encoder is not None and loaded.meta_model is None
        self.lesion = loaded.feature_scaler is not None
        if self.lesion:
            scaler = loaded.feature_scaler
            # a scaler stored before the unmeasurable flag (no fill): the flag column is dropped, the mean fills
            self.drop_flag = scaler.fill is None
            fill = scaler.mean if scaler.fill is None else scaler.fill
            for name, values in (("lesion_mean", scaler.mean), ("lesion_std", scaler.std), ("lesion_fill", fill)):
                self.register_buffer(name, torch.tensor(np.asarray(values), dtype=torch.float32))
        self.late = loaded.meta_model is not None
        if self.late:
            regression = loaded.meta_model
            self.register_buffer("meta_mean", torch.tensor(regression.mean, dtype=torch.float32))
            self.register_buffer("meta_scale", torch.tensor(regression.scale, dtype=torch.float32))
            self.register_buffer("meta_coef", torch.tensor(regression.coef, dtype=torch.float32))
            self.meta_offset = regression.intercept - regression.prior_logit

    def scaled_lesion(self, features: torch.Tensor) -> torch.Tensor:
        """features.FeatureScaler.transform."""
        if self.drop_flag:
            features = features[:, :-1]
        features = torch.where(torch.isfinite(features), features, self.lesion_fill)
        return ((features - self.lesion_mean) / self.lesion_std).clamp(-6.0, 6.0)

    def forward(
        self, image: torch.Tensor, meta: torch.Tensor | None = None, lesion_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        side = []
        if self.meta_in_network:
            side.append(meta)
        if self.lesion:
            side.append(self.scaled_lesion(lesion_features))
        logits = self.net(self.normalise(image), torch.cat(side, dim=1) if side else None)
        network = logits[:, 0] if self.out_dim == 1 else logits[:, 1] - logits[:, 0]  # models.melanoma_logit
        if self.late:  # models.MetadataLogit.evidence
            metadata = ((meta - self.meta_mean) / self.meta_scale) @ self.meta_coef + self.meta_offset
        else:
            metadata = torch.zeros_like(network)
        return torch.sigmoid(network + metadata), network, metadata


class ArtifactGraph(nn.Module):
    """A detector as multi_classification.py scores it: ARTIFACT_OUTPUTS, the per-head probabilities and logits."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalise, self.net = Normalise(mean, std), model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.normalise(image))
        return torch.sigmoid(logits), logits


# --------------------------------------------------------------------------- the JSON


def image_spec(size: int, mean: list[float], std: list[float]) -> dict:
    return {
        "dtype": "uint8",
        "shape": ["batch", 3, size, size],
        "height": size,
        "width": size,
        "layout": "NCHW, RGB channel order, values 0-255",
        "preprocessing": f"decode the image as RGB and resize it to {size} x {size} (bilinear, OpenCV INTER_LINEAR; "
        "no crop, the aspect ratio is not kept); do not scale or normalise: the graph does",
        "normalisation_in_graph": {"formula": "(image / 255 - mean) / std, per channel", "mean": mean, "std": std},
    }


def melanoma_spec(loaded: LoadedModel, checkpoint: dict) -> dict:
    inputs = {IMAGE_INPUT: image_spec(loaded.image_size, loaded.mean, loaded.std)}
    if loaded.encoder is not None:
        late = loaded.meta_model is not None
        inputs[META_INPUT] = {
            "dtype": "float32",
            "shape": ["batch", loaded.encoder.n_features],
            "used_by": "the metadata logistic regression, whose log-odds the graph adds to the network's (late fusion)"
            if late
            else "the network's metadata branch (concat fusion)",
            "feature_names": loaded.encoder.feature_names,
            "encoding": loaded.encoder.describe(),
            "encoder": loaded.encoder.state_dict(),  # metadata.MetaEncoder.from_state_dict rebuilds it
        }
    if loaded.feature_scaler is not None:
        width = loaded.feature_scaler.n_features + (1 if loaded.feature_scaler.fill is None else 0)
        inputs[LESION_INPUT] = {
            "dtype": "float32",
            "shape": ["batch", width],
            "computed_by": "features.lesion_features([image file paths]) of this project, unscaled: the graph "
            "standardises and clips them with the training fold's statistics",
        }
    meanings = {
        "probability": "P(melanoma) in [0, 1]: what predict.py writes as target for one view (with --n-tta, "
        "predict.py averages the network's probability over the views before adding the metadata's log-odds)",
        "network_log_odds": "the image network's log-odds of melanoma (with the metadata inside it under concat "
        "fusion)",
        "metadata_log_odds": "what late fusion's metadata logistic regression adds to the log-odds (its logit minus "
        "the training prevalence's); 0 without late fusion",
    }
    return {
        "kind": "melanoma",
        "fusion": checkpoint.get("fusion") if loaded.encoder is not None else None,
        "inputs": inputs,
        "outputs": [{"name": name, "shape": ["batch"], "meaning": meanings[name]} for name in MELANOMA_OUTPUTS],
        "fold": checkpoint.get("fold"),
        "n_folds": checkpoint.get("n_folds"),
        "validation_images": checkpoint.get("val_images"),
    }


def artifact_spec(checkpoint: dict) -> dict:
    heads = list(checkpoint["heads"])
    return {
        "kind": "artifact",
        "heads": heads,
        "thresholds": dict(zip(heads, map(float, checkpoint["thresholds"]), strict=True)),
        "threshold_rule": checkpoint.get("threshold_rule", "max F1 on the val split")
        + "; a head is present when its probability >= its threshold",
        "inputs": {IMAGE_INPUT: image_spec(int(checkpoint["image_size"]), checkpoint["mean"], checkpoint["std"])},
        "outputs": [
            {
                "name": "probabilities",
                "shape": ["batch", len(heads)],
                "meaning": "sigmoid per head, columns in the order of heads",
            },
            {"name": "logits", "shape": ["batch", len(heads)], "meaning": "the heads' logits"},
        ],  # fmt: skip
        "validation_images": checkpoint.get("val_images"),
    }


# --------------------------------------------------------------------------- both


def build_graph(checkpoint: dict, path: Path) -> tuple[nn.Module, dict]:
    """The module to export and the JSON's model-specific part."""
    if kind_of(checkpoint["kind"]) == "artifact":
        model = model_from_checkpoint(checkpoint, path)
        return ArtifactGraph(model, checkpoint["mean"], checkpoint["std"]).eval(), artifact_spec(checkpoint)
    loaded = load_melanoma_model(path, torch.device("cpu"))
    return MelanomaGraph(loaded).eval(), melanoma_spec(loaded, checkpoint)
