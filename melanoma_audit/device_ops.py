"""OpenCV's image operations on batches of float tensors (N, 3, H, W) in 0..255, on any device, each with its
parameters given per image: the building blocks of device_augment's augmentations, written to match cv2 (and
albumentations' use of it) pixel for pixel or to rounding. Nothing here draws random numbers."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

# --------------------------------------------------------------------------- geometry


def remap(images: torch.Tensor, src_x: torch.Tensor, src_y: torch.Tensor, border: str) -> torch.Tensor:
    """cv2.remap with bilinear interpolation: output pixel (y, x) samples the input at (src_y, src_x), in pixel
    coordinates (n, H, W). border "zeros" is BORDER_CONSTANT with black; "reflection" with align_corners=True
    mirrors about the edge pixels' centres, which is BORDER_REFLECT_101."""
    height, width = images.shape[-2:]
    grid = torch.stack([2 * src_x / (width - 1) - 1, 2 * src_y / (height - 1) - 1], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=border, align_corners=True)


def pixel_grid(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y pixel coordinates of images (n, C, H, W), shaped (1, 1, W) and (1, H, 1) to broadcast."""
    height, width = images.shape[-2:]
    y = torch.arange(height, device=images.device, dtype=torch.float32).view(1, -1, 1)
    x = torch.arange(width, device=images.device, dtype=torch.float32).view(1, 1, -1)
    return x, y


def optical_distortion(images: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A.OpticalDistortion, mode "camera": cv2.initUndistortRectifyMap with focal lengths (width, height), radial
    coefficients k1 = k2 = k, the camera's centre at (width/2, height/2) and, OpenCV's default for the output, the
    output's centre at the middle pixel ((width-1)/2, (height-1)/2): a half-pixel shift, reproduced."""
    height, width = images.shape[-2:]
    x, y = pixel_grid(images)
    nx, ny = (x - (width - 1) / 2) / width, (y - (height - 1) / 2) / height
    r2 = nx**2 + ny**2
    factor = 1 + k.view(-1, 1, 1) * (r2 + r2**2)
    return remap(images, nx * factor * width + width / 2, ny * factor * height + height / 2, "zeros")


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


def grid_distortion(images: torch.Tensor, steps_x: torch.Tensor, steps_y: torch.Tensor) -> torch.Tensor:
    """A.GridDistortion(num_steps=5): one stretch per axis."""
    n, height, width = len(images), *images.shape[-2:]
    src_x = _grid_axis(steps_x, width, 5).view(n, 1, width).expand(n, height, width)
    src_y = _grid_axis(steps_y, height, 5).view(n, height, 1).expand(n, height, width)
    return remap(images, src_x, src_y, "zeros")


def reflect_index(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Where positions outside 0..length-1 read from under BORDER_REFLECT_101 (numpy's "reflect"), for offsets of
    any size: the mirror images repeat with a period of 2 (length - 1)."""
    if length == 1:
        return torch.zeros_like(positions)
    period = 2 * (length - 1)
    folded = positions.abs() % period
    return torch.where(folded >= length, period - folded, folded)


def square(images: torch.Tensor, mode: str) -> torch.Tensor:
    """preprocessing.square_image on a batch of one shape: "crop" the centre square, "pad" with reflected borders to
    the longer side, "stretch" unchanged (the resize stretches)."""
    height, width = images.shape[-2:]
    if mode == "stretch" or height == width:
        return images
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return images[..., top : top + side, left : left + side]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    positions = torch.arange(side, device=images.device)
    rows, cols = reflect_index(positions - top, height), reflect_index(positions - left, width)
    return images.index_select(-2, rows).index_select(-1, cols)


def downscale(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A.Downscale with INTER_AREA down and INTER_LINEAR up: each image to round(side * scale) by averaging,
    then bilinearly back to its size (one image at a time: each has its own intermediate size)."""
    height, width = images.shape[-2:]
    out = []
    for image, factor in zip(images, scale.tolist(), strict=True):
        small = (max(1, round(height * factor)), max(1, round(width * factor)))
        reduced = F.interpolate(image[None], size=small, mode="area")
        out.append(F.interpolate(reduced, size=(height, width), mode="bilinear", align_corners=False))
    return torch.cat(out)


def jpeg_recompress(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """A.ImageCompression: each image encoded as a JPEG of its quality and decoded again (libjpeg on the CPU,
    nvJPEG on CUDA); 8-bit, as a saved file is."""
    out = []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its codecs in favour of TorchCodec, which needs FFmpeg installed
        warnings.simplefilter("ignore", DeprecationWarning)
        for image, level in zip(images, quality.tolist(), strict=True):
            encoded = encode_jpeg(image.round().clamp(0, 255).to(torch.uint8), quality=int(level))
            out.append(decode_jpeg(encoded.cpu(), device=images.device).float())
    return torch.stack(out)


def vignette(images: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """dataset.Vignette: each pixel times 1 - strength * r^2, r its distance from the centre over the corner's."""
    height, width = images.shape[-2:]
    x, y = pixel_grid(images)
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    squared = ((y - centre_y) ** 2 + (x - centre_x) ** 2) / max(centre_y**2 + centre_x**2, 1e-6)
    mask = 1 - strength.view(-1, 1, 1) * squared
    return (images * mask.unsqueeze(1)).clamp(0, 255)


# --------------------------------------------------------------------------- filters


def filter2d(images: torch.Tensor, kernels: torch.Tensor, border: str = "reflect") -> torch.Tensor:
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


def motion_kernels(
    size: torch.Tensor, angle: torch.Tensor, direction: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
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


def gaussian_kernels(size: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
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


def median_blur(images: torch.Tensor, window: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------- colour


def hsv_shift(images: torch.Tensor, hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
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


def equalize(lightness: torch.Tensor, clip: torch.Tensor, tiles: int = 8) -> torch.Tensor:
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


def clahe_rgb(images: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """A.CLAHE on an RGB image: equalizes the L channel of Lab (as 8-bit, 0..255) and keeps a and b."""
    lab = _rgb_to_lab(images)
    lightness = torch.round(lab[:, 0] * 255 / 100).clamp(0, 255).long()
    lab = torch.cat([(equalize(lightness, clip) * 100 / 255).unsqueeze(1), lab[:, 1:]], 1)
    return _lab_to_rgb(lab)
