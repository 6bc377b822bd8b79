"""Dermoscopy artifacts drawn in place onto a float32 RGB image (values 0-255): hair of three kinds, the dark
circular frame of a contact dermoscope, a ruler strip, and "other" marks (ink rings, marker dots, stickers). One
place for both users: synthetic.py draws them into the synthetic data set, audit.py pastes them onto real images.

Every mark is drawn to stay visible when a 256 px image is trained at 64 px (tests/test_synthetic.py checks it).
All randomness comes from the numpy Generator passed in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

HAIR_KINDS = ("hair_dense", "hair_short", "hair_medium")  # the first three of annotations.DEFAULT_ARTIFACT_HEADS


def blend(image: np.ndarray, alpha: np.ndarray, color: np.ndarray | Sequence[float]) -> None:
    """In place: image = image * (1 - alpha) + color * alpha, alpha of shape (H, W) in [0, 1]."""
    a = alpha[..., None]
    image *= 1.0 - a
    image += a * np.asarray(color, dtype=np.float32)


def fill_polygon(points: np.ndarray, size: int) -> np.ndarray:
    """Filled polygon mask (uint8 0/255), sub-pixel precise."""
    mask = np.zeros((size, size), dtype=np.uint8)
    pts = np.round(points * 16.0).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_AA, shift=4)
    return mask


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


def draw_hair(rng: np.random.Generator, image: np.ndarray, kind: str) -> None:
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
    blend(image, mask.astype(np.float32) * (opacity / 255.0), np.clip(colour, 5.0, 90.0))


def draw_black_frame(rng: np.random.Generator, image: np.ndarray) -> None:
    """Dark circular vignette of a contact dermoscope: black corners (and sometimes edges)."""
    size = image.shape[0]
    yy, xx = np.ogrid[:size, :size]
    cx, cy = size / 2.0 + rng.uniform(-0.04, 0.04, 2) * size
    radius = rng.uniform(0.46, 0.62) * size
    dist = np.sqrt(((xx - cx) ** 2 + (yy - cy) ** 2).astype(np.float32))
    width = max(1.0, float(rng.uniform(0.01, 0.04)) * size)
    alpha = np.clip((dist - radius) / width, 0.0, 1.0).astype(np.float32) * float(rng.uniform(0.93, 1.0))
    blend(image, alpha, rng.uniform(2.0, 14.0, 3))


def draw_ruler(rng: np.random.Generator, image: np.ndarray) -> None:
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


def draw_other(rng: np.random.Generator, image: np.ndarray) -> None:
    """An ink ring, a marker dot or a coloured rectangular sticker, inside the dermoscope field; large enough to stay
    visible (several pixels) when the image is trained at 64 px. Every mark is much darker than skin: paler marks
    are learnt poorly from random weights at that size (docs/results.md, "Demo")."""
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
        mask = fill_polygon(cv2.boxPoints(box), size)
        colour = stickers[rng.integers(0, len(stickers))]
    opacity = float(rng.uniform(0.8, 0.95))
    blend(image, mask.astype(np.float32) * (opacity / 255.0), colour + rng.normal(0.0, 6.0, 3))
