"""The device data path: DataLoader workers only read JPEG bytes; decoding, resizing, the training augmentation
and normalisation run in batches on the training device (nvJPEG and CUDA kernels on a GPU, the same code on the
CPU), so that the CPU workers stop being the limit of the training loop.

The augmentations reproduce dataset.py's albumentations pipelines (`train_transforms` for each `--augment`
strength, and `bias_train_transforms` as strength "bias") with the same parameter ranges, probabilities and
borders, every image drawing its own parameters. Parameters are drawn on the CPU from a torch.Generator seeded
from (seed, epoch, batch index, rank), per-pixel noise on the device from a second one: a batch's augmentation is
reproducible and touches no global random state. Pixel values stay in 0..255 (clipped after each step, as uint8
arithmetic clips) until the final normalisation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from image_files import MIN_IMAGE_SIZE, REDUCE_MARGIN
from utils import UserError

DATA_PATHS = ("auto", "cpu", "gpu")
DEVICE_AUGMENTATIONS = ("full", "light", "none", "bias")

# --------------------------------------------------------------------------- reading, collating, decoding


class ByteDataset(torch.utils.data.Dataset):
    """ImageDataset's items with the file's raw bytes instead of the decoded image: {"data" (1-D uint8),
    "path", "meta"?, "target"?}. Keys are indices or EpochSampler's (epoch, index); the epoch is not needed here,
    because the augmentation happens after collation, seeded per batch."""

    def __init__(
        self, filepaths: Sequence[str], meta: np.ndarray | None = None, targets: np.ndarray | None = None
    ) -> None:
        self.filepaths = list(filepaths)
        self.meta = None if meta is None else torch.as_tensor(meta, dtype=torch.float32)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index = key[1] if isinstance(key, tuple) else key
        path = self.filepaths[index]
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise UserError(f"image {path} cannot be read ({error.strerror}): restore it or remove its row.") from None
        item = {"data": torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), "path": path}
        if self.meta is not None:
            item["meta"] = self.meta[index]
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def collate_bytes(items: list[dict]) -> dict:
    """default_collate, except that the variable-length byte tensors (and the paths) stay lists."""
    rest = [{key: value for key, value in item.items() if key not in ("data", "path")} for item in items]
    batch = torch.utils.data.default_collate(rest) if rest[0] else {}
    batch["data"] = [item["data"] for item in items]
    batch["path"] = [item["path"] for item in items]
    return batch


def decode_images(data: list[torch.Tensor], device: torch.device, paths: Sequence[str] | None = None) -> list:
    """Decodes a batch of encoded images to RGB uint8 (3, H, W) tensors on `device`: one batched nvJPEG call on a
    GPU. A file that is not a JPEG (or that nvJPEG refuses) fails the whole batched call, so the batch is then
    decoded file by file on the CPU (PNG, GIF and WebP too), which names an undecodable file in a UserError."""
    paths = list(paths) if paths is not None else [f"#{i} of the batch" for i in range(len(data))]
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which needs FFmpeg installed
            warnings.simplefilter("ignore", DeprecationWarning)
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_one(encoded, path).to(device) for encoded, path in zip(data, paths, strict=True)]
    for image, path in zip(images, paths, strict=True):
        if min(image.shape[1:]) < MIN_IMAGE_SIZE:
            raise UserError(
                f"image {path} is {image.shape[2]}x{image.shape[1]} px, below the {MIN_IMAGE_SIZE} px minimum: "
                "remove it or use the full-size file."
            )
    return images


def _decode_one(encoded: torch.Tensor, path: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(encoded, mode=ImageReadMode.RGB)
    except RuntimeError:
        raise UserError(f"image {path} cannot be decoded: replace the file or remove its row.") from None


def resize_batch(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Stacks decoded uint8 images into one float32 (B, 3, size, size) batch in 0..255, the pixels the CPU path's
    A.Resize gives (so that a model trained here meets at inference, through valid_transforms, what it trained on):
    bilinear without antialiasing equals OpenCV's INTER_LINEAR to rounding. A file of 8 times the size or more
    read_image decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling); nvJPEG cannot, so it is decoded in full
    and averaged down by the same factor first. Images of one shape (usually all) are resized together."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    groups = []
    for shape, indices in by_shape.items():
        group = torch.stack([images[i] for i in indices]).float()
        factor = next((f for f in (8, 4, 2) if min(shape[1:]) >= REDUCE_MARGIN * f * size), 1)
        if factor > 1:
            group = F.avg_pool2d(group, factor, ceil_mode=True)
        if group.shape[-2:] != (size, size):
            group = F.interpolate(group, size=(size, size), mode="bilinear", antialias=False, align_corners=False)
        groups.append(group)
    if len(groups) == 1:
        return groups[0]
    order = torch.tensor([i for indices in by_shape.values() for i in indices])
    return torch.cat(groups)[order.argsort().to(groups[0].device)]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A.Normalize: (x / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images / 255 - mean_t) / std_t


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


def _remap(images: torch.Tensor, src_x: torch.Tensor, src_y: torch.Tensor, border: str) -> torch.Tensor:
    """cv2.remap with bilinear interpolation: output pixel (y, x) samples the input at (src_y, src_x), in pixel
    coordinates (n, H, W). border "zeros" is BORDER_CONSTANT with black; "reflection" with align_corners=True
    mirrors about the edge pixels' centres, which is BORDER_REFLECT_101."""
    height, width = images.shape[-2:]
    grid = torch.stack([2 * src_x / (width - 1) - 1, 2 * src_y / (height - 1) - 1], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=border, align_corners=True)


def _pixel_grid(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = images.shape[-2:]
    y = torch.arange(height, device=images.device, dtype=torch.float32).view(1, -1, 1)
    x = torch.arange(width, device=images.device, dtype=torch.float32).view(1, 1, -1)
    return x, y


def _dihedral(images: torch.Tensor, gen: Generators) -> torch.Tensor:
    """Transpose, VerticalFlip, HorizontalFlip, each with p=0.5 (square images, as after A.Resize)."""
    n = len(images)
    transpose, vflip, hflip = (_chance(gen, n, 0.5).to(images.device).view(-1, 1, 1, 1) for _ in range(3))
    images = torch.where(transpose, images.transpose(-1, -2), images)
    images = torch.where(vflip, images.flip(-2), images)
    return torch.where(hflip, images.flip(-1), images)


def _affine(
    images: torch.Tensor, gen: Generators, translate: float, rotate: float, border: str, p: float
) -> torch.Tensor:
    """A.Affine(translate_percent=±translate, scale=(0.9, 1.1) per axis, rotate=±rotate): rotation and scale
    about the image centre, then the shift (truncated to whole pixels, as albumentations does)."""
    n, height, width = len(images), *images.shape[-2:]
    shift_x = (_uniform(gen, n, -translate, translate) * width).trunc()
    shift_y = (_uniform(gen, n, -translate, translate) * height).trunc()
    scale_x, scale_y = _uniform(gen, n, 0.9, 1.1), _uniform(gen, n, 0.9, 1.1)
    angle = torch.deg2rad(_uniform(gen, n, -rotate, rotate))

    def warp(chosen, shift_x, shift_y, scale_x, scale_y, angle):
        x, y = _pixel_grid(chosen)
        centre_x, centre_y = width / 2 - 0.5, height / 2 - 0.5
        view = (-1, 1, 1)
        dx = x - centre_x - shift_x.view(view)
        dy = y - centre_y - shift_y.view(view)
        cos, sin = angle.cos().view(view), angle.sin().view(view)
        # the inverse of albumentations' forward matrix [[cos, sin], [-sin, cos]] @ diag(scale_x, scale_y)
        src_x = (cos * dx - sin * dy) / scale_x.view(view) + centre_x
        src_y = (sin * dx + cos * dy) / scale_y.view(view) + centre_y
        return _remap(chosen, src_x, src_y, border)

    return _apply_to(images, _chance(gen, n, p), warp, shift_x, shift_y, scale_x, scale_y, angle)


def _optical(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A.OpticalDistortion, mode "camera": cv2.initUndistortRectifyMap with focal lengths (width, height), radial
    coefficients k1 = k2 = k, the camera's centre at (width/2, height/2) and, OpenCV's default for the output, the
    output's centre at the middle pixel ((width-1)/2, (height-1)/2): a half-pixel shift, reproduced."""
    height, width = images.shape[-2:]
    x, y = _pixel_grid(images)
    nx, ny = (x - (width - 1) / 2) / width, (y - (height - 1) / 2) / height
    r2 = nx**2 + ny**2
    factor = 1 + k.view(-1, 1, 1) * (r2 + r2**2)
    return _remap(images, nx * factor * width + width / 2, ny * factor * height + height / 2, "zeros")


def _grid_axis(steps: torch.Tensor, length: int, num_steps: int) -> torch.Tensor:
    """A.GridDistortion along one axis (normalized=True): the source coordinate of each output coordinate, piecewise
    linear between knots every length // num_steps pixels, each stretch scaled by its step, rescaled so that the
    stretches add up to the image. steps: (n, num_steps + 1); returns (n, length)."""
    step = length // num_steps
    last = min(length, (num_steps + 1) * step) - num_steps * step
    steps = torch.cat([steps[:, :-1], steps[:, -1:] * (last / step)], 1)
    steps = steps * (length / math.floor(length / num_steps)) / steps.sum(1, keepdim=True)
    knots = F.pad(torch.cumsum(step * steps, 1), (1, 0))
    position = torch.arange(length, device=steps.device)
    segment = (position // step).clamp(max=num_steps)
    # np.linspace(start, end, segment length) in each segment: both ends included
    segment_length = (torch.clamp(segment * step + step, max=length) - segment * step).clamp(min=2)
    fraction = (position - segment * step) / (segment_length - 1)
    start, end = knots[:, segment], knots[:, segment + 1]
    return start + (end - start) * fraction


def _grid(images: torch.Tensor, steps_x: torch.Tensor, steps_y: torch.Tensor) -> torch.Tensor:
    """A.GridDistortion(num_steps=5): one stretch per axis."""
    n, height, width = len(images), *images.shape[-2:]
    src_x = _grid_axis(steps_x, width, 5).view(n, 1, width).expand(n, height, width)
    src_y = _grid_axis(steps_y, height, 5).view(n, height, 1).expand(n, height, width)
    return _remap(images, src_x, src_y, "zeros")


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
    x, y = _pixel_grid(images)
    return _remap(images, x + fields[:, 0], y + fields[:, 1], "zeros")


def _distort(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """OneOf(OpticalDistortion(0.5), GridDistortion(5 steps, 0.5), ElasticTransform(alpha=3)) with p, black
    borders (their default BORDER_CONSTANT); each chosen image gets one of the three with equal chance."""
    n = len(images)
    kind = torch.randint(3, (n,), generator=gen.params)
    applied = _chance(gen, n, p)
    k = _uniform(gen, n, -0.5, 0.5)
    steps_x, steps_y = (1 + _uniform(gen, n * 6, -0.5, 0.5).view(n, 6) for _ in range(2))
    images = _apply_to(images, applied & (kind == 0), _optical, k)
    images = _apply_to(images, applied & (kind == 1), _grid, steps_x, steps_y)
    return _apply_to(images, applied & (kind == 2), lambda chosen: _elastic(chosen, gen))


def _cutout(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.CoarseDropout: one black square of 0.375 of the side (truncated to whole pixels), anywhere inside."""
    n, height, width = len(images), *images.shape[-2:]
    hole_h, hole_w = int(height * 0.375), int(width * 0.375)
    top = torch.randint(height - hole_h + 1, (n,), generator=gen.params)
    left = torch.randint(width - hole_w + 1, (n,), generator=gen.params)
    applied = _chance(gen, n, p)
    x, y = _pixel_grid(images)
    top, left, applied = (value.to(images.device).view(-1, 1, 1) for value in (top, left, applied))
    hole = applied & (y >= top) & (y < top + hole_h) & (x >= left) & (x < left + hole_w)
    return images.masked_fill(hole.unsqueeze(1), 0.0)


# --------------------------------------------------------------------------- blur and noise


def _filter(images: torch.Tensor, kernels: torch.Tensor, border: str = "reflect") -> torch.Tensor:
    """cv2.filter2D per image: kernels (n, kh, kw), one per image for all its channels; "reflect" padding is
    OpenCV's default BORDER_REFLECT_101."""
    n, channels, height, width = images.shape
    kh, kw = kernels.shape[-2:]
    padded = F.pad(images, (kw // 2, kw // 2, kh // 2, kh // 2), mode=border)
    weight = kernels.repeat_interleave(channels, 0).unsqueeze(1)
    # one grouped convolution for the whole batch, a group per (image, channel)
    return F.conv2d(padded.reshape(1, n * channels, *padded.shape[-2:]), weight, groups=n * channels).view(
        n, channels, height, width
    )


def _motion_kernels(size: torch.Tensor, angle: torch.Tensor, direction: torch.Tensor, shift: torch.Tensor):
    """A.MotionBlur's kernels (create_motion_kernel, allow_shifted=True) of size 3 or 5, drawn centred in 5 x 5:
    a line through the centre at `angle`, biased forwards or backwards by `direction`, moved by `shift`."""
    n = len(size)
    half = (size // 2).float()
    backward, forward = direction.clamp(max=0).abs(), direction.clamp(min=0)
    t_start = torch.where(direction < 0, -half, -half * (1 - forward))
    t_end = torch.where(direction < 0, half * (1 - backward), half)
    j = torch.minimum(torch.arange(5).view(1, 5), (size - 1).view(-1, 1)).float()  # points past size repeat
    t = t_start.view(-1, 1) + (t_end - t_start).view(-1, 1) * j / (size - 1).view(-1, 1)
    centre = half.view(-1, 1)
    limit = (size - 1).view(-1, 1).float()
    x = torch.clamp(torch.round(centre + torch.cos(angle).view(-1, 1) * t + shift[:, :1] * centre / 2), min=0)
    y = torch.clamp(torch.round(centre + torch.sin(angle).view(-1, 1) * t + shift[:, 1:] * centre / 2), min=0)
    x, y = torch.minimum(x, limit), torch.minimum(y, limit)
    offset = 2 - centre  # a 3 x 3 kernel sits in the middle of the 5 x 5 frame
    flat = ((y + offset) * 5 + (x + offset)).long()
    kernels = torch.zeros(n, 25).scatter_(1, flat, 1.0).view(n, 5, 5)
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def _gaussian_kernels(size: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A.GaussianBlur's separable kernels of size 3 or 5 as 5 x 5 ones (zeros around a 3 x 3)."""
    taps = torch.arange(-2, 3, dtype=torch.float32).view(1, 5)
    inside = taps.abs() <= (size // 2).view(-1, 1)
    line = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2) * inside
    line = line / line.sum(1, keepdim=True)
    return line.unsqueeze(2) * line.unsqueeze(1)


def _median_network(n: int) -> list[tuple[int, int, bool, bool]]:
    """The compare-exchanges that bring the median of n values to position n // 2: Batcher's odd-even merge sort
    for the next power of two (positions past n would hold +inf and never move, so their comparators are
    dropped), pruned back from the median to the comparators it depends on, each with whether its minimum and
    its maximum are needed. 3 x 3: 24 comparators, 5 x 5: 113."""
    size = 1 << (n - 1).bit_length()
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    needed, kept = {n // 2}, []
    for low, high in reversed([(a, b) for a, b in pairs if b < n]):
        if low in needed or high in needed:
            kept.append((low, high, low in needed, high in needed))
            needed |= {low, high}
    return kept[::-1]


def _median(images: torch.Tensor, window: int) -> torch.Tensor:
    """cv2.medianBlur (replicated borders) with a window x window square, exact. A sorting network of elementwise
    minima and maxima over the window's shifted copies, rather than torch.median over unfolded windows: that
    is a selection per pixel (millions of tiny slices), slow on the CPU and on CUDA alike."""
    r = window // 2
    padded = F.pad(images, (r, r, r, r), mode="replicate")
    height, width = images.shape[-2:]
    values = [padded[..., i : i + height, j : j + width] for i in range(window) for j in range(window)]
    for low, high, keep_low, keep_high in _median_network(window * window):
        a, b = values[low], values[high]
        values[low] = torch.minimum(a, b) if keep_low else None
        values[high] = torch.maximum(a, b) if keep_high else None
    return values[window * window // 2]


def _odd_size(gen: Generators, n: int, p_five: float) -> torch.Tensor:
    return torch.where(_chance(gen, n, p_five), 5, 3)


def _blur_or_noise(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """OneOf(MotionBlur(5), MedianBlur(5), GaussianBlur((3, 5)), GaussNoise(std sqrt(5..30)/255)) with p. Kernel
    sizes: MotionBlur and MedianBlur pick 3 or 5 evenly; GaussianBlur draws 3, 4 or 5 and makes a 4 a 5."""
    n = len(images)
    kind = torch.randint(4, (n,), generator=gen.params)
    applied = _chance(gen, n, p)
    motion = _motion_kernels(
        _odd_size(gen, n, 0.5),
        torch.deg2rad(_uniform(gen, n, 0, 360)),
        _uniform(gen, n, -1, 1),
        _uniform(gen, 2 * n, -1, 1).view(n, 2),
    )
    gaussian = _gaussian_kernels(_odd_size(gen, n, 2 / 3), _uniform(gen, n, 0.5, 3.0))
    median_size = _odd_size(gen, n, 0.5)
    noise_std = _uniform(gen, n, math.sqrt(5), math.sqrt(30))  # std_range times 255
    images = _apply_to(images, applied & (kind == 0), _filter, motion)
    for window in (3, 5):
        images = _apply_to(images, applied & (kind == 1) & (median_size == window), lambda x, w=window: _median(x, w))
    images = _apply_to(images, applied & (kind == 2), _filter, gaussian)
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


def _hsv_shift(images: torch.Tensor, hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit HSV arithmetic in floats: hue (OpenCV units, 2 degrees) wraps around, saturation and value
    (0..255) are shifted and clipped, and grey pixels (saturation 0) stay grey."""
    view = (-1, 1, 1)
    red, green, blue = images.unbind(1)
    high, low = images.amax(1), images.amin(1)
    delta = high - low
    safe = delta.clamp(min=1e-6)
    from_green_blue = torch.where(high == green, (blue - red) / safe + 2, (red - green) / safe + 4)
    degrees = torch.where(high == red, ((green - blue) / safe) % 6, from_green_blue)
    degrees = (torch.where(delta > 0, degrees * 60, 0.0) + 2 * hue.view(view)) % 360
    saturation = torch.where(high > 0, delta / high.clamp(min=1e-6), 0.0) * 255
    saturation = torch.where(saturation > 0, (saturation + sat.view(view)).clamp(0, 255), 0.0) / 255
    value = (high + val.view(view)).clamp(0, 255)
    # HSV to RGB: channel n is v - v s max(0, min(k, 4 - k, 1)) with k = (n + h / 60) mod 6
    channels = [(order + degrees / 60) % 6 for order in (5, 3, 1)]
    return torch.stack([value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1) for k in channels], 1)


def _hue_saturation_value(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.HueSaturationValue(10, 20, 10)."""
    n = len(images)
    hue, sat, val = _uniform(gen, n, -10, 10), _uniform(gen, n, -20, 20), _uniform(gen, n, -10, 10)
    return _apply_to(images, _chance(gen, n, p), _hsv_shift, hue, sat, val)


# OpenCV's RGB2Lab constants: linear sRGB to XYZ, and the D65 white point that Lab measures against
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)


def _rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    rgb = images / 255
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_RGB_TO_XYZ, device=images.device)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / torch.tensor(_WHITE, device=images.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def _lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    white = torch.tensor(_WHITE, device=lab.device).view(1, 3, 1, 1)
    xyz = torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787) * white
    matrix = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).float().to(lab.device)
    linear = torch.einsum("ij,njhw->nihw", matrix, xyz).clamp(0, 1)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return (rgb * 255).clamp(0, 255)


def _equalize(lightness: torch.Tensor, clip: torch.Tensor, tiles: int = 8) -> torch.Tensor:
    """cv2.createCLAHE(clip, (8, 8)).apply on integer images (n, H, W) in 0..255, batched: a histogram per tile,
    clipped at clip * tile area / 256 with the excess spread evenly (the remainder one count per bin from bin 0 at
    even steps), its cumulative sum as the tile's mapping, and each pixel mapped by the bilinear mix of its four
    nearest tiles' mappings. Sides that are not a multiple of 8 are padded by reflection for the histograms."""
    n, height, width = lightness.shape
    device = lightness.device
    source = lightness
    if height % tiles or width % tiles:
        # as OpenCV: then both sides get tiles - side % tiles rows or columns, a whole tile where it divides
        pad_h, pad_w = tiles - height % tiles, tiles - width % tiles
        source = F.pad(lightness.unsqueeze(1).float(), (0, pad_w, 0, pad_h), mode="reflect").squeeze(1).long()
    tile_h, tile_w = source.shape[1] // tiles, source.shape[2] // tiles
    area = tile_h * tile_w
    rows = torch.arange(source.shape[1], device=device) // tile_h
    cols = torch.arange(source.shape[2], device=device) // tile_w
    tile = rows.view(-1, 1) * tiles + cols.view(1, -1)
    index = (torch.arange(n, device=device).view(-1, 1, 1) * tiles**2 + tile) * 256 + source
    # scatter_add into a histogram of known size: bincount would read the largest index back from the device
    hist = torch.zeros(n * tiles**2 * 256, dtype=torch.long, device=device)
    hist = hist.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten())).view(n, tiles**2, 256)

    limit = torch.clamp((clip * area / 256).floor().long(), min=1).view(-1, 1, 1)
    excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
    hist = torch.minimum(hist, limit) + excess // 256
    residual = excess % 256
    step = (256 // residual.clamp(min=1)).clamp(min=1)
    bins = torch.arange(256, device=device)
    hist = hist + ((bins % step == 0) & (bins // step < residual)).long()
    lut = torch.round(hist.cumsum(-1) * (255 / area)).clamp(0, 255).view(n, -1)

    def neighbours(length: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x * (1 / size) in float32 as OpenCV computes it: x / size rounds differently at some .5 results
        position = torch.arange(length, device=device, dtype=torch.float32) * torch.tensor(1 / size) - 0.5
        first = position.floor()
        weight = position - first
        return first.clamp(min=0).long(), (first + 1).clamp(max=tiles - 1).long(), weight

    top, bottom, wy = neighbours(height, tile_h)
    left, right, wx = neighbours(width, tile_w)
    flat = lightness.reshape(n, -1)

    def mapped(ty: torch.Tensor, tx: torch.Tensor) -> torch.Tensor:
        offset = ((ty.view(-1, 1) * tiles + tx.view(1, -1)) * 256).view(1, -1)
        return lut.gather(1, offset + flat).view(n, height, width)

    wy, wx = wy.view(1, -1, 1), wx.view(1, 1, -1)
    upper = mapped(top, left) * (1 - wx) + mapped(top, right) * wx
    lower = mapped(bottom, left) * (1 - wx) + mapped(bottom, right) * wx
    return torch.round(upper * (1 - wy) + lower * wy)


def _clahe_rgb(images: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """A.CLAHE on an RGB image: equalizes the L channel of Lab (as 8-bit, 0..255) and keeps a and b."""
    lab = _rgb_to_lab(images)
    lightness = torch.round(lab[:, 0] * 255 / 100).clamp(0, 255).long()
    lab = torch.cat([(_equalize(lightness, clip) * 100 / 255).unsqueeze(1), lab[:, 1:]], 1)
    return _lab_to_rgb(lab)


def _clahe(images: torch.Tensor, gen: Generators, p: float) -> torch.Tensor:
    """A.CLAHE(clip_limit=4.0): clip limit uniform in 1..4, 8 x 8 tiles."""
    n = len(images)
    clip = _uniform(gen, n, 1.0, 4.0)
    return _apply_to(images, _chance(gen, n, p), _clahe_rgb, clip)


# --------------------------------------------------------------------------- the pipelines


def _steps(strength: str) -> list[Callable[[torch.Tensor, Generators], torch.Tensor]]:
    """dataset.py's pipelines after the resize and before the normalisation, in their order."""

    def step(function, **options):
        return lambda images, gen: function(images, gen, **options)

    if strength == "none":
        return []
    if strength == "light":
        return [_dihedral, step(_affine, translate=0.05, rotate=180, border="reflection", p=0.85)]
    if strength == "bias":
        return [
            _dihedral,
            step(_brightness_contrast, p=0.75),
            step(_hue_saturation_value, p=0.5),
            step(_gauss_noise, p=0.3),
        ]
    if strength == "full":
        return [
            _dihedral,
            step(_brightness_contrast, p=0.75),
            step(_blur_or_noise, p=0.7),
            step(_distort, p=0.7),
            step(_clahe, p=0.7),
            step(_hue_saturation_value, p=0.5),
            # the 1st-place pipeline's black borders, unlike "light", whose any-angle rotation would paint large
            # black corners
            step(_affine, translate=0.1, rotate=15, border="zeros", p=0.85),
            step(_cutout, p=0.7),
        ]
    raise UserError(f"unknown augmentation strength {strength!r}: choose one of {', '.join(DEVICE_AUGMENTATIONS)}.")


def augment(images: torch.Tensor, strength: str, gen: Generators) -> torch.Tensor:
    """The `strength` pipeline on float images (B, 3, S, S) in 0..255, each image with its own parameters;
    returns the same layout, still 0..255."""
    for step in _steps(strength):
        images = step(images, gen)
    return images


@dataclass(frozen=True)
class DevicePipeline:
    """What the training loop calls on each collated ByteDataset batch: decode, resize, augment and normalise
    on `device`. Returns the batch with "image" (float32, B x 3 x S x S, on the device) in place of "data" and
    "path"; "meta" and "target" stay as collated (pinned CPU tensors), for the loop to move as it always has.

    `seed` is the run's augmentation seed (train.py: --seed + fold), `rank` the process's rank under DDP; each
    call passes the epoch and the batch's index within it, which with these fix the batch's augmentation.
    Validation uses strength "none"."""

    image_size: int
    strength: str
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    seed: int = 0
    rank: int = 0

    def __post_init__(self) -> None:
        _steps(self.strength)  # an unknown strength stops the run before the first batch

    @torch.no_grad()
    def __call__(self, batch: dict, epoch: int = 0, batch_index: int = 0) -> dict:
        # float32 throughout, also when called inside the training step's autocast region
        with torch.autocast(self.device.type, enabled=False):
            images = resize_batch(decode_images(batch["data"], self.device, batch.get("path")), self.image_size)
            if self.strength != "none":
                gen = batch_generators(self.seed, epoch, batch_index, self.rank, self.device)
                images = augment(images, self.strength, gen)
            images = normalize(images, self.mean, self.std)
        return {**{key: value for key, value in batch.items() if key not in ("data", "path")}, "image": images}


class DeviceBatches:
    """A DataLoader over a ByteDataset (collate_fn=collate_bytes) that yields its batches through `pipeline`, as
    the loops expect batches: the drop-in for the CPU path's loader. The epoch comes from the sampler
    (EpochSampler.set_epoch), the batch index from the position in the epoch."""

    def __init__(self, loader: torch.utils.data.DataLoader, pipeline: DevicePipeline) -> None:
        self.loader, self.pipeline = loader, pipeline
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        epoch = getattr(self.sampler, "epoch", 0)
        for index, batch in enumerate(self.loader):
            yield self.pipeline(batch, epoch, index)


def resolve_data_path(choice: str, device: torch.device) -> str:
    """--data-path: "auto" is "gpu" (decode and augment on the device) when training on CUDA, else "cpu" (the
    albumentations workers); "gpu" means the device path on whatever device trains, so the CPU can test it."""
    if choice not in DATA_PATHS:
        raise UserError(f"unknown --data-path {choice!r}: choose one of {', '.join(DATA_PATHS)}.")
    if choice == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return choice
