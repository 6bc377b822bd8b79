"""One synthetic dermoscopy-like image: skin with tone variation, texture and light fall-off, a benign-looking
(small, regular, one brown) or malignant-looking (larger, irregular, two or three colours) lesion, and the
artifacts of synthetic_artifacts.py. Deterministic for a given numpy Generator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from melanoma_audit.annotations import DEFAULT_ARTIFACT_HEADS
from melanoma_audit.synthetic_artifacts import (
    HAIR_KINDS,
    blend,
    draw_black_frame,
    draw_hair,
    draw_other,
    draw_ruler,
    fill_polygon,
)


@dataclass(frozen=True)
class PatientStyle:
    """What the lesions of one patient share (synthetic.py's odd-one-out patients): the skin, and the brown and
    size of the benign moles, so that a patient's melanoma is the lesion unlike the others rather than merely
    unlike the average mole of the data set."""

    skin: float  # 0 light .. 1 tan
    brown: float  # benign colour, 0 light tan .. 1 medium brown
    radius: float  # benign radius as a fraction of the image side


def draw_style(rng: np.random.Generator) -> PatientStyle:
    return PatientStyle(float(rng.beta(2.0, 2.5)), float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.09, 0.16)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise of shape (size, size, channels), roughly unit variance, float32."""
    coarse = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return field.reshape(size, size, channels)


def _soft_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 0/255 mask -> float32 alpha in [0, 1], blurred with a Gaussian of `sigma` pixels."""
    alpha = mask.astype(np.float32) * (1.0 / 255.0)
    if sigma > 0.3:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=sigma)
    return alpha


def _skin(rng: np.random.Generator, size: int, style: PatientStyle | None = None) -> np.ndarray:
    """Skin-coloured background with tone variation, blotches, texture and illumination fall-off."""
    light = np.array([238.0, 204.0, 184.0], dtype=np.float32)
    tan = np.array([186.0, 134.0, 104.0], dtype=np.float32)
    tone = light + (tan - light) * (float(rng.beta(2.0, 2.5)) if style is None else style.skin)
    tone = tone + rng.normal(0.0, 6.0, 3).astype(np.float32)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = tone
    # Large, slightly reddish blotches and a medium-scale texture.
    blotch = _smooth_noise(rng, size, 5)
    image += blotch * np.array([9.0, 6.0, 5.0], dtype=np.float32) * float(rng.uniform(0.5, 1.5))
    image += _smooth_noise(rng, size, 3, 3) * 4.0
    texture = _smooth_noise(rng, size, max(8, size // 6))
    image += texture * float(rng.uniform(3.0, 7.0))
    # Fine sensor noise (luminance only, cheap).
    image += rng.standard_normal((size, size, 1), dtype=np.float32) * float(rng.uniform(2.0, 5.0))
    # Illumination fall-off from an off-centre light spot.
    yy, xx = np.ogrid[:size, :size]
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    dist2 = ((xx - cx) ** 2 + (yy - cy) ** 2).astype(np.float32) / float(size * size)
    image *= (1.0 - float(rng.uniform(0.05, 0.25)) * dist2 * 2.0)[..., None]
    return image


def _lesion_outline(rng: np.random.Generator, radius: float, irregular: bool) -> np.ndarray:
    """Closed outline (N, 2) around the origin: an ellipse, or a polygon with radial harmonics and noise."""
    n = 96
    theta = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    if irregular:
        r = np.ones(n)
        for k in range(2, 8):
            r += rng.uniform(0.0, 0.22 / k**0.6) * np.cos(k * theta + rng.uniform(0.0, 2.0 * math.pi))
        jitter = rng.normal(0.0, 0.09, n)
        kernel = np.array([0.25, 0.5, 0.25])
        jitter = np.convolve(np.concatenate([jitter[-1:], jitter, jitter[:1]]), kernel, mode="valid")
        r = np.clip(r + jitter, 0.45, None)
        aspect = rng.uniform(0.7, 1.0)
    else:
        r = np.ones(n)
        aspect = rng.uniform(0.72, 1.0)
    x = radius * r * np.cos(theta)
    y = radius * r * aspect * np.sin(theta)
    angle = rng.uniform(0.0, math.pi)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * x - s * y, s * x + c * y], axis=1)


def _benign_radius(rng: np.random.Generator, style: PatientStyle | None) -> float:
    return rng.uniform(0.08, 0.17) if style is None else style.radius * rng.uniform(0.92, 1.08)


def _draw_lesion(
    rng: np.random.Generator, image: np.ndarray, malignant_look: bool, style: PatientStyle | None = None
) -> None:
    """Draws a benign-looking (small, regular, one brown) or malignant-looking lesion in place; a `style` fixes
    the benign size and brown up to a little jitter."""
    size = image.shape[0]
    centre = size / 2.0 + np.clip(rng.normal(0.0, 0.06 * size, 2), -0.13 * size, 0.13 * size)
    radius = (rng.uniform(0.15, 0.28) if malignant_look else _benign_radius(rng, style)) * size
    outline = _lesion_outline(rng, radius, irregular=malignant_look) + centre
    mask = fill_polygon(outline, size)
    edge = radius * (rng.uniform(0.015, 0.045) if malignant_look else rng.uniform(0.025, 0.05))
    alpha = _soft_mask(mask, edge) * float(rng.uniform(0.82, 0.95))

    mottling = _smooth_noise(rng, size, max(6, size // 16))
    if malignant_look:
        base = np.array([112.0, 70.0, 48.0]) * rng.uniform(0.88, 1.06) + rng.normal(0.0, 4.0, 3)
    else:  # one brown, from light tan to medium brown
        light, dark = np.array([172.0, 120.0, 86.0]), np.array([124.0, 80.0, 54.0])
        mix = rng.uniform(0.0, 1.0) if style is None else np.clip(style.brown + rng.normal(0.0, 0.04), 0.0, 1.0)
        base = light + (dark - light) * mix + rng.normal(0.0, 4.0, 3)
    colour = np.empty_like(image)
    colour[:] = base.astype(np.float32)
    colour *= 1.0 + mottling * (0.10 if malignant_look else 0.035)

    if malignant_look:
        palette = np.array(
            [[32.0, 26.0, 28.0], [72.0, 42.0, 28.0], [88.0, 98.0, 118.0], [140.0, 92.0, 66.0]],
            dtype=np.float32,
        )
        n_colours = int(rng.integers(2, 4))
        chosen = rng.choice(len(palette), size=n_colours, replace=False)
        if 0 not in chosen and 2 not in chosen:  # keep at least one really dark or blue-grey patch
            chosen[0] = int(rng.choice([0, 2]))
        for index in chosen:
            patch = np.zeros((size, size), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                offset = rng.normal(0.0, 0.45 * radius, 2)
                axes = (rng.uniform(0.2, 0.55, 2) * radius).astype(int) + 1
                cv2.ellipse(
                    patch,
                    (int(centre[0] + offset[0]), int(centre[1] + offset[1])),
                    (int(axes[0]), int(axes[1])),
                    float(rng.uniform(0.0, 180.0)),
                    0.0,
                    360.0,
                    255,
                    -1,
                    lineType=cv2.LINE_AA,
                )
            patch_alpha = _soft_mask(patch, 0.08 * radius) * float(rng.uniform(0.6, 0.9))
            blend(colour, patch_alpha, palette[index] + rng.normal(0.0, 5.0, 3).astype(np.float32))
    blend(image, alpha, colour)


def render_image(
    rng: np.random.Generator,
    image_size: int,
    malignant_look: bool,
    artifacts: Sequence[int],
    style: PatientStyle | None = None,
) -> np.ndarray:
    """Renders one synthetic dermoscopy image as an RGB uint8 array of shape (image_size, image_size, 3).

    `artifacts` holds 0/1 flags in the order of DEFAULT_ARTIFACT_HEADS; at most one hair flag may be set. `style`:
    the skin and benign mole that this image shares with the patient's other images (None: drawn for this image).
    """
    flags = dict(zip(DEFAULT_ARTIFACT_HEADS, (int(v) for v in artifacts), strict=True))
    hair = [kind for kind in HAIR_KINDS if flags[kind]]
    if len(hair) > 1:
        raise ValueError(f"at most one hair type per image, got {hair}")
    image = _skin(rng, image_size, style)
    _draw_lesion(rng, image, malignant_look, style)
    if hair:
        draw_hair(rng, image, hair[0])
    if flags["black_frame"]:
        draw_black_frame(rng, image)
    if flags["other"]:
        draw_other(rng, image)
    if flags["ruler_mark"]:
        draw_ruler(rng, image)
    sigma = float(rng.uniform(0.3, 0.8)) * image_size / 256.0
    if sigma > 0.35:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    return np.clip(image + 0.5, 0.0, 255.0).astype(np.uint8)
