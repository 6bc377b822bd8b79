"""Colour constancy: Shades of Gray (Finlayson and Trezzi, 2004), the illuminant correction the ISIC 2018 and 2019
winners applied to every image (Minkowski norm p = 6). Each image's illuminant is estimated as the per-channel
Minkowski mean of its pixels, e_c = (mean I_c^p)^(1/p); each channel is divided by its gain, e_c scaled so that the
three gains have the length of (1, 1, 1): a grey illuminant leaves the image as it is, and the overall brightness
is kept. p = 1 is Gray World, a large p tends to White Patch (the brightest pixel). One version on numpy images
for the CPU path and one on batches of tensors for the device path, with the same arithmetic."""

from __future__ import annotations

import math

import numpy as np
import torch

from utils import UserError

COLOR_CONSTANCY = ("none", "shades-of-gray")  # --color-constancy's
DEFAULT_MINKOWSKI_P = 6.0
_DARK = 1e-6  # an illuminant channel below this (an image without light in a channel) is left uncorrected


def check_minkowski_p(p: float) -> None:
    if not (1.0 <= p < math.inf):
        raise UserError(
            f"--minkowski-p {p} must be a finite number of at least 1 (1 is Gray World, 6 the ISIC winners')."
        )


def illuminant(image: np.ndarray, p: float = DEFAULT_MINKOWSKI_P) -> np.ndarray:
    """The Shades of Gray estimate of an RGB image's illuminant (H, W, 3), 0..255: three Minkowski means."""
    pixels = image.reshape(-1, 3).astype(np.float64) / 255
    return np.power(np.mean(np.power(pixels, p), axis=0), 1 / p) * 255


def _gains(estimate: np.ndarray | torch.Tensor, length: np.ndarray | torch.Tensor):
    """The per-channel divisors: the estimate scaled to the length of (1, 1, 1), 1 where the image is black."""
    scale = math.sqrt(3) / (length + _DARK)
    return estimate * scale + (length <= _DARK) * 1.0


def shades_of_gray(image: np.ndarray, p: float = DEFAULT_MINKOWSKI_P) -> np.ndarray:
    """An RGB uint8 image with its illuminant divided out (uint8, clipped to 0..255)."""
    estimate = illuminant(image, p)
    gains = np.maximum(_gains(estimate, np.linalg.norm(estimate)), _DARK)
    return np.clip(image.astype(np.float64) / gains + 0.5, 0, 255).astype(np.uint8)


def shades_of_gray_batch(images: torch.Tensor, p: float = DEFAULT_MINKOWSKI_P) -> torch.Tensor:
    """shades_of_gray on float images (N, 3, H, W) in 0..255, each with its own illuminant; float out, not
    rounded (the device path keeps floats throughout)."""
    pixels = (images.double() / 255).flatten(2)
    estimate = pixels.pow(p).mean(2).pow(1 / p) * 255  # (N, 3)
    gains = _gains(estimate, estimate.norm(dim=1, keepdim=True)).clamp(min=_DARK)
    return (images.double() / gains[:, :, None, None]).clamp(0, 255).to(images.dtype)
