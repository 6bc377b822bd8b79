"""The training augmentations of the device data path: dataset.py's albumentations pipelines (`train_transforms`
for each strength of TRAINING_AUGMENTATIONS, "artifact" being the detector's) on a batch of float
images on the training device, with the same parameter ranges, probabilities and borders, every image drawing its
own parameters. Parameters are drawn on the CPU from a torch.Generator seeded from (seed, epoch, batch index,
rank), per-pixel noise on the device from a second one: a batch's augmentation is reproducible and touches no global
random state. Pixel values stay in 0..255 (clipped after each step, as uint8 arithmetic clips)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dataset import (
    ROBUST_DOWNSCALE,
    ROBUST_GAINS,
    ROBUST_JPEG_QUALITY,
    ROBUST_P,
    ROBUST_SCALE,
    TRAINING_AUGMENTATIONS,
    VIGNETTE_STRENGTH,
)
from melanoma_audit.device_ops import (
    clahe_rgb,
    downscale,
    filter2d,
    gaussian_kernels,
    grid_distortion,
    hsv_shift,
    jpeg_recompress,
    median_blur,
    motion_kernels,
    optical_distortion,
    pixel_grid,
    remap,
    vignette,
)
from utils import UserError

# --------------------------------------------------------------------------- seeding


class Generators(NamedTuple):
    """`params`: a CPU generator for the per-image parameters (so a seed gives the same parameters on every
    device, and choosing which images a step touches needs no device synchronisation); `noise`: a generator on
    the images' device for per-pixel noise, which would be too large to draw on the CPU and copy."""

    params: torch.Generator
    noise: torch.Generator


def batch_generators(seed: int, epoch: int, batch_index: int, rank: int, device: torch.device) -> Generators:
    """Generators seeded from (seed, epoch, batch index, rank) alone: the augmentation of a batch does not depend
    on the global random state, on what ran before, or on other ranks (whose batches hold other images)."""
    params_seed, noise_seed = np.random.SeedSequence([seed, epoch, batch_index, rank]).generate_state(2)
    params = torch.Generator().manual_seed(int(params_seed))
    noise = torch.Generator(device=device).manual_seed(int(noise_seed))
    return Generators(params, noise)


def _uniform(gen: Generators, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen.params)


def _chance(gen: Generators, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=gen.params) < p


def _apply_to(
    images: torch.Tensor, chosen: torch.Tensor, step: Callable[..., torch.Tensor], *params: torch.Tensor
) -> torch.Tensor:
    """images with `step(images[chosen], *params[chosen])` in the chosen rows. `chosen` and `params` are CPU
    tensors over the whole batch; only the chosen rows are computed (a blur or CLAHE on every image, to keep a
    third of them, would waste most of the work)."""
    rows = chosen.nonzero().squeeze(1)
    if len(rows) == 0:
        return images
    on_device = rows.to(images.device)
    changed = step(images[on_device], *(param[rows].to(images.device) for param in params))
    return images.index_copy(0, on_device, changed)


# --------------------------------------------------------------------------- geometry


def _dihedral(images: torch.Tensor, gen: Generators) -> torch.Tensor:
    """Transpose, VerticalFlip, HorizontalFlip, each with p=0.5 (square images, as after A.Resize)."""
    n = len(images)
    transpose, vflip, hflip = (_chance(gen, n, 0.5).to(images.device).view(-1, 1, 1, 1) for _ in range(3))
    images = torch.where(transpose, images.transpose(-1, -2), images)
    images = torch.where(vflip, images.flip(-2), images)
    return torch.where(hflip, images.flip(-1), images)


def _affine(
    images: torch.Tensor,
    gen: Generators,
    translate: float,
    rotate: float,
    border: str,
    p: float,
    scale: tuple[float, float] = (0.9, 1.1),
    keep_ratio: bool = False,
) -> torch.Tensor:
    """A.Affine(translate_percent=±translate, scale=scale per axis or one for both (keep_ratio), rotate=±rotate):
    rotation and scale about the image centre, then the shift (truncated to whole pixels, as albumentations
    does)."""
    n, height, width = len(images), *images.shape[-2:]
    shift_x = (_uniform(gen, n, -translate, translate) * width).trunc()
    shift_y = (_uniform(gen, n, -translate, translate) * height).trunc()
    scale_x, scale_y = _uniform(gen, n, *scale), _uniform(gen, n, *scale)
    if keep_ratio:
        scale_y = scale_x
    angle = torch.deg2rad(_uniform(gen, n, -rotate, rotate))

    def warp(chosen, shift_x, shift_y, scale_x, scale_y, angle):
        x, y = pixel_grid(chosen)
        centre_x, centre_y = width / 2 - 0.5, height / 2 - 0.5
        view = (-1, 1, 1)
        dx = x - centre_x - shift_x.view(view)
        dy = y - centre_y - shift_y.view(view)
        cos, sin = angle.cos().view(view), angle.sin().view(view)
        # the inverse of albumentations' forward matrix [[cos, sin], [-sin, cos]] @ diag(scale_x, scale_y)
        src_x = (cos * dx - sin * dy) / scale_x.view(view) + centre_x
        src_y = (sin * dx + cos * dy) / scale_y.view(view) + centre_y
        return remap(chosen, src_x, src_y, border)

    return _apply_to(images, _chance(gen, n, p), warp, shift_x, shift_y, scale_x, scale_y, angle)


def _elastic(images: torch.Tensor, gen: Generators) -> torch.Tensor:
    """A.ElasticTransform(alpha=3, sigma=50, approximate=True): Gaussian noise scaled to a maximum of 1, blurred
    with a 17 x 17 Gaussian of sigma 50 (replicated borders), times alpha. At these settings the shift is a
    fraction of a pixel: the step mostly resamples the image, as it does in albumentations."""
    n, height, width = len(images), *images.shape[-2:]
    fields = torch.randn(n, 2, height, width, generator=gen.noise, device=images.device)
    fields = fields / fields.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    taps = torch.arange(-8, 9, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / 50) ** 2)
    kernel = (kernel / kernel.sum()).repeat(2, 1)
    fields = F.pad(fields, (8, 8, 8, 8), mode="replicate")
    fields = F.conv2d(fields, kernel.view(2, 1, 17, 1), groups=2)
    fields = F.conv2d(fields, kernel.view(2, 1, 1, 17), groups=2) * 3.0
    x, y = pixel_grid(images)
    return remap(images, x + fields[:, 0], y + fields[:, 1], "zeros")


def _distort(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """OneOf(OpticalDistortion(0.5), GridDistortion(5 steps, 0.5), ElasticTransform(alpha=3)) with p, black
    borders (their default BORDER_CONSTANT); each chosen image gets one of the three with equal chance."""
    n = len(images)
    kind = torch.randint(3, (n,), generator=gen.params)
    applied = _chance(gen, n, p)
    k = _uniform(gen, n, -0.5, 0.5)
    steps_x, steps_y = (1 + _uniform(gen, n * 6, -0.5, 0.5).view(n, 6) for _ in range(2))
    images = _apply_to(images, applied & (kind == 0), optical_distortion, k)
    images = _apply_to(images, applied & (kind == 1), grid_distortion, steps_x, steps_y)
    return _apply_to(images, applied & (kind == 2), lambda chosen: _elastic(chosen, gen))


def _cutout(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.CoarseDropout: one black square of 0.375 of the side (truncated to whole pixels), anywhere inside."""
    n, height, width = len(images), *images.shape[-2:]
    hole_h, hole_w = int(height * 0.375), int(width * 0.375)
    top = torch.randint(height - hole_h + 1, (n,), generator=gen.params)
    left = torch.randint(width - hole_w + 1, (n,), generator=gen.params)
    applied = _chance(gen, n, p)
    x, y = pixel_grid(images)
    top, left, applied = (value.to(images.device).view(-1, 1, 1) for value in (top, left, applied))
    hole = applied & (y >= top) & (y < top + hole_h) & (x >= left) & (x < left + hole_w)
    return images.masked_fill(hole.unsqueeze(1), 0.0)


# --------------------------------------------------------------------------- blur and noise


def _odd_size(gen: Generators, n: int, p_five: float) -> torch.Tensor:
    return torch.where(_chance(gen, n, p_five), 5, 3)


def _blur_or_noise(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """OneOf(MotionBlur(5), MedianBlur(5), GaussianBlur((3, 5)), GaussNoise(std sqrt(5..30)/255)) with p. Kernel
    sizes: MotionBlur and MedianBlur pick 3 or 5 evenly; GaussianBlur draws 3, 4 or 5 and makes a 4 a 5."""
    n = len(images)
    kind = torch.randint(4, (n,), generator=gen.params)
    applied = _chance(gen, n, p)
    motion = motion_kernels(
        _odd_size(gen, n, 0.5),
        torch.deg2rad(_uniform(gen, n, 0, 360)),
        _uniform(gen, n, -1, 1),
        _uniform(gen, 2 * n, -1, 1).view(n, 2),
    )
    gaussian = gaussian_kernels(_odd_size(gen, n, 2 / 3), _uniform(gen, n, 0.5, 3.0))
    median_size = _odd_size(gen, n, 0.5)
    noise_std = _uniform(gen, n, math.sqrt(5), math.sqrt(30))  # std_range times 255
    images = _apply_to(images, applied & (kind == 0), filter2d, motion)
    for window in (3, 5):
        chosen = applied & (kind == 1) & (median_size == window)
        images = _apply_to(images, chosen, lambda x, w=window: median_blur(x, w))
    images = _apply_to(images, applied & (kind == 2), filter2d, gaussian)
    images = _apply_to(images, applied & (kind == 3), lambda chosen, std: _add_noise(chosen, std, gen), noise_std)
    return images.clamp(0, 255)


def _add_noise(images: torch.Tensor, std: torch.Tensor, gen: Generators) -> torch.Tensor:
    """A.GaussNoise: zero-mean noise, independent per pixel and channel (per_channel=True)."""
    noise = torch.randn(images.shape, generator=gen.noise, device=images.device)
    return (images + noise * std.view(-1, 1, 1, 1)).clamp(0, 255)


def _gauss_noise(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    std = _uniform(gen, len(images), math.sqrt(5), math.sqrt(30))
    return _apply_to(images, _chance(gen, len(images), p), lambda chosen, std: _add_noise(chosen, std, gen), std)


# --------------------------------------------------------------------------- colour


def _brightness_contrast(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.RandomBrightnessContrast(0.2, 0.2): x * (1 + contrast) + brightness * 255; identity where not applied."""
    n = len(images)
    alpha, beta = 1 + _uniform(gen, n, -0.2, 0.2), _uniform(gen, n, -0.2, 0.2) * 255
    applied = _chance(gen, n, p)
    alpha, beta = torch.where(applied, alpha, 1.0), torch.where(applied, beta, 0.0)
    view = (-1, 1, 1, 1)
    return (images * alpha.to(images.device).view(view) + beta.to(images.device).view(view)).clamp(0, 255)


def _hue_saturation_value(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.HueSaturationValue(10, 20, 10)."""
    n = len(images)
    hue, sat, val = _uniform(gen, n, -10, 10), _uniform(gen, n, -20, 20), _uniform(gen, n, -10, 10)
    return _apply_to(images, _chance(gen, n, p), hsv_shift, hue, sat, val)


def _clahe(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.CLAHE(clip_limit=4.0): clip limit uniform in 1..4, 8 x 8 tiles."""
    n = len(images)
    clip = _uniform(gen, n, 1.0, 4.0)
    return _apply_to(images, _chance(gen, n, p), clahe_rgb, clip)


# --------------------------------------------------------------------------- acquisition ("robust")


def _channel_gains(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.MultiplicativeNoise(ROBUST_GAINS, per_channel=True): a uniform gain per channel and image."""
    n = len(images)
    gains = _uniform(gen, 3 * n, *ROBUST_GAINS).view(n, 3)
    gains = torch.where(_chance(gen, n, p).view(n, 1), gains, 1.0)
    return (images * gains.to(images.device).view(n, 3, 1, 1)).clamp(0, 255)


def _vignette(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    n = len(images)
    return _apply_to(images, _chance(gen, n, p), vignette, _uniform(gen, n, *VIGNETTE_STRENGTH))


def _downscale(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    n = len(images)
    return _apply_to(images, _chance(gen, n, p), downscale, _uniform(gen, n, *ROBUST_DOWNSCALE))


def _jpeg(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.ImageCompression(quality_range=ROBUST_JPEG_QUALITY): a quality per image, both ends included."""
    n = len(images)
    low, high = ROBUST_JPEG_QUALITY
    quality = torch.randint(low, high + 1, (n,), generator=gen.params)
    return _apply_to(images, _chance(gen, n, p), jpeg_recompress, quality)


# --------------------------------------------------------------------------- the pipelines


def augmentation_steps(strength: str) -> list[Callable[[torch.Tensor, Generators], torch.Tensor]]:
    """dataset.py's pipeline of `strength` after the resize and before the normalisation, in its order."""

    def step(function, **options):
        return lambda images, gen: function(images, gen, **options)

    jitter, hsv = step(_brightness_contrast, p=0.75), step(_hue_saturation_value, p=0.5)
    if strength == "none":
        return []
    if strength == "light":
        return [_dihedral, step(_affine, translate=0.05, rotate=180, border="reflection", p=0.85)]
    if strength == "robust":
        return [
            _dihedral,
            step(_affine, translate=0.05, rotate=180, border="reflection", p=0.85, scale=ROBUST_SCALE, keep_ratio=True),
            step(_channel_gains, p=ROBUST_P["gains"]),
            step(_vignette, p=ROBUST_P["vignette"]),
            step(_downscale, p=ROBUST_P["downscale"]),
            step(_jpeg, p=ROBUST_P["jpeg"]),
        ]
    if strength == "artifact":
        return [_dihedral, jitter, hsv, step(_gauss_noise, p=0.3)]
    if strength == "full":
        return [
            _dihedral,
            jitter,
            step(_blur_or_noise, p=0.7),
            step(_distort, p=0.7),
            step(_clahe, p=0.7),
            hsv,
            # the 1st-place pipeline's black borders, unlike "light", whose any-angle rotation would paint large
            # black corners
            step(_affine, translate=0.1, rotate=15, border="zeros", p=0.85),
            step(_cutout, p=0.7),
        ]
    raise UserError(f"unknown augmentation strength {strength!r}: choose one of {', '.join(TRAINING_AUGMENTATIONS)}.")


def augment(images: torch.Tensor, strength: str, gen: Generators) -> torch.Tensor:
    """The `strength` pipeline on float images (B, 3, S, S) in 0..255, each image with its own parameters;
    returns the same layout, still 0..255."""
    for step in augmentation_steps(strength):
        images = step(images, gen)
    return images
