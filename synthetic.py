"""Synthetic dermoscopy-like data in the Kaggle "melanoma-external-malignant-256" layout.

The generated folder looks like the Kaggle one::

    out_dir/train.csv           image_name, patient_id, sex, age_approx, anatom_site_general_challenge, target
    out_dir/test.csv            the same columns without target
    out_dir/train/train/<image_name>.jpg
    out_dir/test/test/<image_name>.jpg
    out_dir/gans_biases.csv     headerless: <image_name>.jpg,hair_dense,hair_short,hair_medium,black_frame,
                                ruler_mark,other (0/1 per train image, exactly what was drawn)

Both the metadata and the image carry signal about the target, neither perfectly:

* metadata: every patient belongs to a latent risk group; high-risk patients are older (mean ~65 against ~45),
  slightly more often male, and most malignant images come from them; malignant lesions sit on the torso a
  little more often.
* image: benign lesions are smaller, regular ellipses of one brown; malignant ones are larger, with an
  irregular border and two or three colour patches (black, dark brown, blue-grey). About 12% of the images
  get the look of the other class, so the image alone cannot be perfect.

Artifacts (hair in three kinds, dermoscope black frame, ruler strip, ink marks / bright patches) are drawn
independently of the target, except the ruler, which is mildly more common on malignant images.

Everything is deterministic for a given seed (numpy Generators only, no global random state).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

DEFAULT_HEADS = ("hair_dense", "hair_short", "hair_medium", "black_frame", "ruler_mark", "other")

SITES = ("torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital")
SITE_COLUMN = "anatom_site_general_challenge"
TRAIN_COLUMNS = ("image_name", "patient_id", "sex", "age_approx", SITE_COLUMN, "target")

# Site probabilities (order of SITES) for benign and malignant images.
_SITE_P_BENIGN = (0.46, 0.26, 0.15, 0.08, 0.03, 0.02)
_SITE_P_MALIGNANT = (0.58, 0.18, 0.12, 0.09, 0.02, 0.01)

_LOOK_FLIP_RATE = 0.12  # share of images drawn with the other class's look
_HIGH_RISK_MALIGNANT_P = 0.88  # P(malignant image | high-risk patient)
_MISSING_PATIENT_RATE = 0.10
_MISSING_SEX_RATE = 0.05
_MISSING_AGE_RATE = 0.05
_MISSING_SITE_RATE = 0.10
_MAX_IMAGES_PER_PATIENT = 6
_JPEG_QUALITY = 90

_HAIR_HEADS = ("hair_dense", "hair_short", "hair_medium")


# ----------------------------------------------------------------------------------------------------
# Image rendering
# ----------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise of shape (size, size, channels), roughly unit variance, float32."""
    coarse = rng.standard_normal((cells, cells, channels), dtype=np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return field.reshape(size, size, channels)


def _blend(image: np.ndarray, alpha: np.ndarray, color: np.ndarray | Sequence[float]) -> None:
    """In place: image = image * (1 - alpha) + color * alpha, alpha of shape (H, W) in [0, 1]."""
    a = alpha[..., None]
    image *= 1.0 - a
    image += a * np.asarray(color, dtype=np.float32)


def _soft_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """uint8 0/255 mask -> float32 alpha in [0, 1], blurred with a Gaussian of `sigma` pixels."""
    alpha = mask.astype(np.float32) * (1.0 / 255.0)
    if sigma > 0.3:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=sigma)
    return alpha


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin-coloured background with tone variation, blotches, texture and illumination fall-off."""
    light = np.array([238.0, 204.0, 184.0], dtype=np.float32)
    tan = np.array([186.0, 134.0, 104.0], dtype=np.float32)
    tone = light + (tan - light) * float(rng.beta(2.0, 2.5))
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


def _fill(points: np.ndarray, size: int) -> np.ndarray:
    """Filled polygon mask (uint8 0/255), sub-pixel precise."""
    mask = np.zeros((size, size), dtype=np.uint8)
    pts = np.round(points * 16.0).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=4)
    return mask


def _draw_lesion(rng: np.random.Generator, image: np.ndarray, malignant_look: bool) -> None:
    """Draws a benign-looking (small, regular, one brown) or malignant-looking lesion in place."""
    size = image.shape[0]
    centre = size / 2.0 + np.clip(rng.normal(0.0, 0.06 * size, 2), -0.13 * size, 0.13 * size)
    radius = (rng.uniform(0.15, 0.28) if malignant_look else rng.uniform(0.08, 0.17)) * size
    outline = _lesion_outline(rng, radius, irregular=malignant_look) + centre
    mask = _fill(outline, size)
    edge = radius * (rng.uniform(0.015, 0.045) if malignant_look else rng.uniform(0.025, 0.05))
    alpha = _soft_mask(mask, edge) * float(rng.uniform(0.82, 0.95))

    mottling = _smooth_noise(rng, size, max(6, size // 16))
    if malignant_look:
        base = np.array([112.0, 70.0, 48.0]) * rng.uniform(0.88, 1.06) + rng.normal(0.0, 4.0, 3)
    else:  # one brown, from light tan to medium brown
        light, dark = np.array([172.0, 120.0, 86.0]), np.array([124.0, 80.0, 54.0])
        base = light + (dark - light) * rng.uniform(0.0, 1.0) + rng.normal(0.0, 4.0, 3)
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
            _blend(colour, patch_alpha, palette[index] + rng.normal(0.0, 5.0, 3).astype(np.float32))
    _blend(image, alpha, colour)


def _bezier_strands(
    rng: np.random.Generator, count: int, size: int, length: tuple[float, float], bend: float
) -> list[np.ndarray]:
    """`count` curved strands (quadratic Bezier polylines) as int32 point arrays for cv2 with shift=4."""
    t = np.linspace(0.0, 1.0, 12)[:, None]
    strands = []
    for _ in range(count):
        start = rng.uniform(-0.1, 1.1, 2) * size
        angle = rng.uniform(0.0, 2.0 * math.pi)
        span = rng.uniform(*length) * size
        direction = np.array([math.cos(angle), math.sin(angle)])
        end = start + span * direction
        normal = np.array([-direction[1], direction[0]])
        control = (start + end) / 2.0 + normal * span * rng.uniform(-bend, bend)
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        strands.append(np.round(points * 16.0).astype(np.int32).reshape(-1, 1, 2))
    return strands


def _draw_hair(rng: np.random.Generator, image: np.ndarray, kind: str) -> None:
    """Draws hair of one kind (hair_dense, hair_short or hair_medium) in place. Strands are 2-4 px wide at 256 px,
    as in real dermoscopy: thinner ones fade to nothing when the image is trained at 64 px."""
    size = image.shape[0]
    scale = size / 256.0
    mask = np.zeros((size, size), dtype=np.uint8)
    if kind == "hair_dense":
        groups = [(int(rng.integers(45, 90)), (0.25, 0.7), 0.35, 2)]
    elif kind == "hair_short":
        groups = [(int(rng.integers(14, 30)), (0.05, 0.12), 0.15, 3)]  # stubble: short and thick
    elif kind == "hair_medium":
        count = int(rng.integers(5, 16))
        thick = int(rng.integers(0, count // 2 + 1))  # some of the strands a little thicker
        groups = [(count - thick, (0.5, 1.1), 0.25, 3), (thick, (0.5, 1.1), 0.25, 4)]
    else:
        raise ValueError(f"unknown hair kind {kind!r}")
    for count, length, bend, thickness in groups:
        if count <= 0:
            continue
        strands = _bezier_strands(rng, count, size, length, bend)
        width = max(1, round(thickness * scale))
        cv2.polylines(mask, strands, False, 255, thickness=width, lineType=cv2.LINE_AA, shift=4)
    colour = np.array([38.0, 26.0, 20.0]) + rng.normal(0.0, 8.0, 3)
    opacity = float(rng.uniform(0.8, 0.95))
    _blend(image, mask.astype(np.float32) * (opacity / 255.0), np.clip(colour, 5.0, 90.0))


def _draw_black_frame(rng: np.random.Generator, image: np.ndarray) -> None:
    """Dark circular vignette of a contact dermoscope: black corners (and sometimes edges)."""
    size = image.shape[0]
    yy, xx = np.ogrid[:size, :size]
    cx, cy = size / 2.0 + rng.uniform(-0.04, 0.04, 2) * size
    radius = rng.uniform(0.46, 0.62) * size
    dist = np.sqrt(((xx - cx) ** 2 + (yy - cy) ** 2).astype(np.float32))
    width = max(1.0, float(rng.uniform(0.01, 0.04)) * size)
    alpha = np.clip((dist - radius) / width, 0.0, 1.0).astype(np.float32) * float(rng.uniform(0.93, 1.0))
    _blend(image, alpha, rng.uniform(2.0, 14.0, 3))


def _draw_ruler(rng: np.random.Generator, image: np.ndarray) -> None:
    """A straight ruler strip along one edge with long and short tick marks."""
    size = image.shape[0]
    scale = size / 256.0
    width = max(4, round(rng.uniform(0.065, 0.1) * size))
    margin = round(rng.uniform(0.0, 0.03) * size)
    length = round(rng.uniform(0.6, 1.0) * size)
    start = int(rng.integers(0, size - length + 1))
    # Draw horizontally into a strip, then place it on the chosen edge.
    strip = np.empty((width, length, 3), dtype=np.float32)
    strip[:] = rng.uniform(215.0, 248.0) + rng.normal(0.0, 4.0, 3).astype(np.float32)
    tick_colour = tuple(float(v) for v in rng.uniform(20.0, 60.0, 3))
    spacing = max(2.0, rng.uniform(0.022, 0.034) * size)
    line = max(1, round(3 * scale))  # bold ticks: hairlines vanish when 256 px images are trained at 64 px
    first = rng.uniform(0.0, spacing)
    for i, x in enumerate(np.arange(first, length, spacing)):
        tick = 0.7 if i % 5 == 0 else 0.35
        cv2.line(strip, (int(x), 0), (int(x), int(tick * width)), tick_colour, line, cv2.LINE_AA)
    cv2.line(strip, (0, width - 1), (length - 1, width - 1), tick_colour, line, cv2.LINE_AA)
    edge = int(rng.integers(0, 4))  # 0 top, 1 bottom, 2 left, 3 right
    if edge == 1:
        strip = strip[::-1]
    elif edge in (2, 3):
        strip = strip.transpose(1, 0, 2)
        if edge == 3:
            strip = strip[:, ::-1]
    opacity = float(rng.uniform(0.85, 0.97))
    if edge == 0:
        region = image[margin : margin + width, start : start + length]
    elif edge == 1:
        region = image[size - margin - width : size - margin, start : start + length]
    elif edge == 2:
        region = image[start : start + length, margin : margin + width]
    else:
        region = image[start : start + length, size - margin - width : size - margin]
    region *= 1.0 - opacity
    region += opacity * strip


def _draw_other(rng: np.random.Generator, image: np.ndarray) -> None:
    """An ink ring, a marker dot or a coloured rectangular sticker, inside the dermoscope field; large enough to stay
    visible (several pixels) when the image is trained at 64 px. Every mark is much darker than skin: a white patch
    on light skin, a navy dot on a dark lesion or a round sticker (a second lesion?) was measured to be learnt
    poorly from random weights at 64 px (held-out AUC 0.77-0.86 against 0.98 now)."""
    size = image.shape[0]
    scale = size / 256.0
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dist = rng.uniform(0.2, 0.34) * size
    cx = size / 2.0 + dist * math.cos(angle)
    cy = size / 2.0 + dist * math.sin(angle)
    inks = np.array([[120.0, 40.0, 160.0], [30.0, 60.0, 200.0], [30.0, 140.0, 60.0]])
    stickers = np.array([[200.0, 30.0, 40.0], [30.0, 90.0, 200.0], [20.0, 150.0, 90.0], [150.0, 40.0, 170.0]])
    kind = int(rng.integers(0, 3))
    mask = np.zeros((size, size), dtype=np.uint8)
    centre = (round(cx * 16), round(cy * 16))
    if kind == 0:  # ink ring
        radius = rng.uniform(0.09, 0.13) * size
        thickness = max(1, round(rng.uniform(8.0, 11.0) * scale))
        cv2.circle(mask, centre, round(radius * 16), 255, thickness, cv2.LINE_AA, shift=4)
        colour = inks[rng.integers(0, len(inks))]
    elif kind == 1:  # marker dot
        radius = rng.uniform(0.07, 0.10) * size
        cv2.circle(mask, centre, round(radius * 16), 255, -1, cv2.LINE_AA, shift=4)
        colour = inks[rng.integers(0, len(inks))]
    else:  # coloured sticker, square-cornered: a round one reads as a second lesion
        half = rng.uniform(0.07, 0.10, 2) * size
        box = ((float(cx), float(cy)), (float(2 * half[0]), float(2 * half[1])), float(rng.uniform(0, 90)))
        mask = _fill(cv2.boxPoints(box), size)
        colour = stickers[rng.integers(0, len(stickers))]
    opacity = float(rng.uniform(0.8, 0.95))
    _blend(image, mask.astype(np.float32) * (opacity / 255.0), colour + rng.normal(0.0, 6.0, 3))


def render_image(
    rng: np.random.Generator, image_size: int, malignant_look: bool, artifacts: Sequence[int]
) -> np.ndarray:
    """Renders one synthetic dermoscopy image as an RGB uint8 array of shape (image_size, image_size, 3).

    `artifacts` holds 0/1 flags in the order of DEFAULT_HEADS; at most one hair flag may be set.
    """
    flags = dict(zip(DEFAULT_HEADS, (int(v) for v in artifacts), strict=True))
    hair = [kind for kind in _HAIR_HEADS if flags[kind]]
    if len(hair) > 1:
        raise ValueError(f"at most one hair type per image, got {hair}")
    image = _skin(rng, image_size)
    _draw_lesion(rng, image, malignant_look)
    if hair:
        _draw_hair(rng, image, hair[0])
    if flags["black_frame"]:
        _draw_black_frame(rng, image)
    if flags["other"]:
        _draw_other(rng, image)
    if flags["ruler_mark"]:
        _draw_ruler(rng, image)
    sigma = float(rng.uniform(0.3, 0.8)) * image_size / 256.0
    if sigma > 0.35:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    return np.clip(image + 0.5, 0.0, 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------


def _patient_sizes(rng: np.random.Generator, n_rows: int, n_patients: int) -> np.ndarray:
    """Images per patient: every patient at least one, mostly 1-6, summing to n_rows."""
    n_patients = max(1, min(n_patients, n_rows))
    sizes = np.ones(n_patients, dtype=int)
    extra = n_rows - n_patients
    if extra > 0:
        weights = rng.gamma(2.0, 1.0, n_patients)
        sizes += rng.multinomial(extra, weights / weights.sum())
        # Move images away from patients over the cap where others have room (keeps groups at 1-6).
        while sizes.max() > _MAX_IMAGES_PER_PATIENT and sizes.min() < _MAX_IMAGES_PER_PATIENT:
            big = int(np.argmax(sizes))
            room = np.flatnonzero(sizes < _MAX_IMAGES_PER_PATIENT)
            sizes[big] -= 1
            sizes[int(rng.choice(room))] += 1
    return sizes


def _force_both(rng: np.random.Generator, target: np.ndarray, risky: np.ndarray, least: int) -> np.ndarray:
    """Flips a few targets so that each class has at least `least` rows (preferring plausible rows)."""
    target = target.copy()
    for cls in (1, 0):
        missing = least - int((target == cls).sum())
        if missing <= 0:
            continue
        candidates = np.flatnonzero(target != cls)
        preferred = candidates[risky[candidates] == bool(cls)]
        rest = np.setdiff1d(candidates, preferred)
        order = np.concatenate([rng.permutation(preferred), rng.permutation(rest)])
        target[order[:missing]] = cls
    return target


def _make_metadata(
    rng: np.random.Generator, n_rows: int, n_patients: int, malignant_fraction: float, patient_offset: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata rows (without image_name) and the latent high-risk flag per row."""
    if n_rows == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in TRAIN_COLUMNS[1:]})
        return empty, np.zeros(0, dtype=bool)
    sizes = _patient_sizes(rng, n_rows, n_patients)
    n_pat = len(sizes)
    # Latent risk group: high-risk patients give malignant images with probability q_high, others q_low,
    # so that the overall malignant share is malignant_fraction.
    q_high = _HIGH_RISK_MALIGNANT_P
    p_high = float(np.clip(malignant_fraction, 0.0, 1.0))
    q_low = 0.0 if p_high >= 1.0 else p_high * (1.0 - q_high) / (1.0 - p_high)
    if q_low > q_high:  # very high malignant fractions: everyone is high risk-ish
        q_low = q_high = p_high
    patient_high = rng.random(n_pat) < p_high
    patient_age = np.where(patient_high, rng.normal(66.0, 10.0, n_pat), rng.normal(44.0, 12.0, n_pat))
    patient_male = rng.random(n_pat) < np.where(patient_high, 0.62, 0.45)

    owner = rng.permutation(np.repeat(np.arange(n_pat), sizes))
    high = patient_high[owner]
    target = (rng.random(n_rows) < np.where(high, q_high, q_low)).astype(int)

    age = patient_age[owner] + rng.choice([-5.0, 0.0, 0.0, 0.0, 5.0], size=n_rows)
    age = np.clip(np.round(age / 5.0) * 5.0, 10.0, 90.0)
    sex = np.where(patient_male[owner], "male", "female").astype(object)
    site_benign = rng.choice(len(SITES), size=n_rows, p=_SITE_P_BENIGN)
    site_malignant = rng.choice(len(SITES), size=n_rows, p=_SITE_P_MALIGNANT)
    site_index = np.where(target == 1, site_malignant, site_benign)
    site = np.array(SITES, dtype=object)[site_index]
    patient_id = np.array([f"SYNP_{patient_offset + i:04d}" for i in owner], dtype=object)

    patient_id[rng.random(n_rows) < _MISSING_PATIENT_RATE] = None
    sex[rng.random(n_rows) < _MISSING_SEX_RATE] = None
    age = np.where(rng.random(n_rows) < _MISSING_AGE_RATE, np.nan, age)
    site[rng.random(n_rows) < _MISSING_SITE_RATE] = None

    frame = pd.DataFrame(
        {
            "patient_id": patient_id,
            "sex": sex,
            "age_approx": age.astype(float),
            SITE_COLUMN: site,
            "target": target,
        }
    )
    return frame, high


def _artifact_flags(rng: np.random.Generator, target: np.ndarray, rate: float, force: bool) -> np.ndarray:
    """0/1 matrix (rows, len(DEFAULT_HEADS)); at most one hair type per row; ruler mildly tied to target."""
    n = len(target)
    p = float(np.clip(rate / 2.0, 0.0, 1.0))
    flags = np.zeros((n, len(DEFAULT_HEADS)), dtype=int)
    p_hair = min(p, 1.0 / 3.0)
    u = rng.random(n)
    for k in range(3):  # hair_dense, hair_short, hair_medium
        flags[:, k] = (u >= k * p_hair) & (u < (k + 1) * p_hair)
    flags[:, 3] = rng.random(n) < p
    ruler_p = np.where(target == 1, min(1.0, 1.4 * p), 0.85 * p)
    flags[:, 4] = rng.random(n) < ruler_p
    flags[:, 5] = rng.random(n) < p
    if force and n >= len(DEFAULT_HEADS) and p > 0:
        for k in range(len(DEFAULT_HEADS)):
            if flags[:, k].any():
                continue
            if k < 3:  # hair: pick a row without hair, else steal from the most common hair type
                free = np.flatnonzero(flags[:, :3].sum(axis=1) == 0)
                if len(free) == 0:
                    donor = int(np.argmax(flags[:, :3].sum(axis=0)))
                    free = np.flatnonzero(flags[:, donor] == 1)
                row = int(rng.choice(free))
                flags[row, :3] = 0
            else:
                row = int(rng.choice(n))
            flags[row, k] = 1
    return flags


# ----------------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------------


def _write_images(
    folder: Path,
    names: Sequence[str],
    looks: np.ndarray,
    flags: np.ndarray,
    image_size: int,
    seed_seq: np.random.SeedSequence,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
    for name, look, row, child in zip(names, looks, flags, seed_seq.spawn(len(names)), strict=True):
        rgb = render_image(np.random.default_rng(child), image_size, bool(look), row)
        if not cv2.imwrite(str(folder / f"{name}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"could not write {folder / f'{name}.jpg'}")


def make_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = 400,
    n_test: int = 100,
    image_size: int = 256,
    seed: int = 0,
    malignant_fraction: float = 0.3,
    artifact_rate: float = 0.3,
    n_patients: int | None = None,
) -> Path:
    """Writes a synthetic data set in the Kaggle melanoma-external-malignant-256 layout.

    Writes out_dir/train.csv, out_dir/test.csv, out_dir/train/train/<image_name>.jpg,
    out_dir/test/test/<image_name>.jpg, and out_dir/gans_biases.csv; returns out_dir as Path.

    n_patients is the number of train patients (default about n_train / 3); test patients are distinct,
    about as many per image. Each artifact head is drawn with probability about artifact_rate / 2.
    The train split always holds both classes (at least min(3, n_train // 2) of each) and, from
    len(DEFAULT_HEADS) images on, at least one positive per artifact head. Deterministic for a given seed.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    if not 0.0 <= malignant_fraction <= 1.0:
        raise ValueError("malignant_fraction must be in [0, 1]")
    if not 0.0 <= artifact_rate <= 2.0:
        raise ValueError("artifact_rate must be in [0, 2]")
    if n_patients is not None and n_patients < 1:
        raise ValueError("n_patients must be >= 1")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(meta_seq)

    n_train_patients = n_patients if n_patients is not None else max(1, round(n_train / 3))
    per_image = n_train_patients / n_train if n_train else 1.0 / 3.0
    n_test_patients = max(1, round(n_test * per_image))

    ids = rng.choice(10_000_000, size=n_train + n_test, replace=False)
    names = np.array([f"SYN_{i:07d}" for i in ids], dtype=object)
    train_names = np.sort(names[:n_train])
    test_names = np.sort(names[n_train:])

    train, train_high = _make_metadata(rng, n_train, n_train_patients, malignant_fraction, 0)
    test, _ = _make_metadata(rng, n_test, n_test_patients, malignant_fraction, n_train_patients)
    if n_train:
        train["target"] = _force_both(rng, train["target"].to_numpy(), train_high, min(3, n_train // 2))
    train.insert(0, "image_name", train_names)
    test.insert(0, "image_name", test_names)

    train_target = train["target"].to_numpy(dtype=int)
    test_target = test["target"].to_numpy(dtype=int)
    train_looks = train_target ^ (rng.random(n_train) < _LOOK_FLIP_RATE)
    test_looks = test_target ^ (rng.random(n_test) < _LOOK_FLIP_RATE)
    train_flags = _artifact_flags(rng, train_target, artifact_rate, force=True)
    test_flags = _artifact_flags(rng, test_target, artifact_rate, force=False)

    train.to_csv(out / "train.csv", index=False, columns=list(TRAIN_COLUMNS))
    test.to_csv(out / "test.csv", index=False, columns=list(TRAIN_COLUMNS[:-1]))
    with open(out / "gans_biases.csv", "w", encoding="utf-8", newline="") as handle:
        handle.writelines(
            f"{name}.jpg," + ",".join(str(int(v)) for v in row) + "\n"
            for name, row in zip(train_names, train_flags, strict=True)
        )

    _write_images(out / "train" / "train", list(train_names), train_looks, train_flags, image_size, train_seq)
    _write_images(out / "test" / "test", list(test_names), test_looks, test_flags, image_size, test_seq)
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line: OUT_DIR [--n-train N] [--n-test N] [--image-size PX] [--seed S]."""
    parser = argparse.ArgumentParser(description=(__doc__ or "Synthetic dermoscopy data.").splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the CSVs and images")
    parser.add_argument("--n-train", type=int, metavar="N", default=400, help="train images (400)")
    parser.add_argument("--n-test", type=int, metavar="N", default=100, help="test images (100)")
    parser.add_argument("--image-size", type=int, metavar="PX", default=256, help="image side (256)")
    parser.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (0)")
    args = parser.parse_args(argv)
    if args.n_train < 0 or args.n_test < 0:
        parser.error("--n-train and --n-test must be >= 0")
    if args.image_size < 16:
        parser.error("--image-size must be at least 16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: generates the data set and prints a one-line summary."""
    args = parse_args(argv)
    start = time.perf_counter()
    out = make_synthetic_dataset(
        args.out_dir, n_train=args.n_train, n_test=args.n_test, image_size=args.image_size, seed=args.seed
    )
    print(
        f"wrote {args.n_train} train + {args.n_test} test images ({args.image_size} px) to {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
