"""device_data, device_augment and device_ops: bytes in the workers, decode + augment + normalise in batches on the
device (here the CPU, which runs the same code). Small synthetic JPEGs (32-80 px), written with cv2.imencode."""

import math
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.blur import functional as blur_f
from albumentations.augmentations.geometric import functional as geometric_f
from albumentations.augmentations.pixel import functional as pixel_f
from image_helpers import CPU, MEAN, STD, byte_batch, to_pixels, write_image

from dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAINING_AUGMENTATIONS,
    EpochSampler,
    ImageDataset,
    train_transforms,
    valid_transforms,
)
from melanoma_audit import device_augment as da
from melanoma_audit import device_data as dd
from melanoma_audit import device_ops as ops
from melanoma_audit.image_files import read_image
from utils import UserError


def _lesion(size: int, variant: int = 0, width: int | None = None) -> np.ndarray:
    """RGB uint8: skin with a vertical shading gradient and a dark lesion in the top-left quadrant, so that a
    horizontal flip moves the dark mass to the right half and a vertical flip to the lower half."""
    rng = np.random.default_rng(variant)
    width = width or size
    yy, xx = np.mgrid[0:size, 0:width] / np.array([size, width]).reshape(2, 1, 1)
    skin = np.array([205, 150, 130]) * (0.9 + 0.2 * yy[..., None]) + rng.normal(0, 4, (size, width, 3))
    lesion = (yy - 0.3 - 0.03 * variant) ** 2 + (xx - 0.25) ** 2 < (0.14 + 0.02 * variant) ** 2
    image = np.where(lesion[..., None], np.array([95, 60, 50]) + rng.normal(0, 6, (size, width, 3)), skin)
    return cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (0, 0), 1.0)


@pytest.fixture()
def lesion_files(tmp_path) -> list[str]:
    return [write_image(tmp_path / f"lesion{i}.jpg", _lesion(64, i)) for i in range(4)]


def _pipeline(strength: str, size: int = 64, seed: int = 0, rank: int = 0) -> dd.DevicePipeline:
    return dd.DevicePipeline(size, strength, IMAGENET_MEAN, IMAGENET_STD, CPU, seed=seed, rank=rank)


# --------------------------------------------------------------------------- reading and collating


def test_workers_read_bytes_and_the_collate_keeps_them_a_list(lesion_files):
    meta = np.arange(8, dtype=np.float32).reshape(4, 2)
    dataset = dd.ByteDataset(lesion_files, meta, np.array([0, 1, 0, 1]))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, sampler=EpochSampler(4, False, 0), collate_fn=dd.collate_bytes
    )
    batch = next(iter(loader))  # keys are EpochSampler's (epoch, index)
    assert [len(data) for data in batch["data"]] == [len(Path(path).read_bytes()) for path in lesion_files[:3]]
    assert all(data.dtype == torch.uint8 and data.dim() == 1 for data in batch["data"])
    assert batch["path"] == lesion_files[:3]
    assert torch.equal(batch["side"], torch.from_numpy(meta[:3]))
    assert batch["target"].tolist() == [0.0, 1.0, 0.0]
    assert dataset[2]["data"].tolist() == list(Path(lesion_files[2]).read_bytes())


@pytest.mark.parametrize("strength", TRAINING_AUGMENTATIONS)
def test_shapes_dtype_and_range(tmp_path, strength):
    files = [
        write_image(tmp_path / "square.jpg", _lesion(64)),
        write_image(tmp_path / "wide.jpg", _lesion(48, 1, width=80)),
        write_image(tmp_path / "grey.jpg", cv2.cvtColor(_lesion(40, 2), cv2.COLOR_RGB2GRAY)),
    ]
    batch = byte_batch(files)
    batch["target"] = torch.tensor([0.0, 1.0, 0.0])
    out = _pipeline(strength, size=48)(batch, epoch=1, batch_index=2)
    image = out["image"]
    assert image.shape == (3, 3, 48, 48) and image.dtype == torch.float32 and torch.isfinite(image).all()
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert (image >= low - 1e-5).all() and (image <= high + 1e-5).all()
    assert out["target"] is batch["target"] and "data" not in out and "path" not in out
    raw = da.augment(dd.resize_batch(dd.decode_images(batch["data"], CPU), 48), strength, _gen(3))
    assert raw.min() >= 0 and raw.max() <= 255


def test_none_is_valid_transforms(tmp_path):
    """ "none" gives what valid_transforms gives, for files at, below and far above the training size (the last
    decoded at reduced scale on the CPU path). Both paths use libjpeg-turbo's decoder, and plain bilinear equals
    INTER_LINEAR up to OpenCV's rounding to uint8 (0.5 levels); averaging stands in for the DCT-scaled decode
    (within 2 levels). Tolerance: 2.5 levels per pixel, 0.5 on average."""
    rng = np.random.default_rng(0)
    files = [
        write_image(tmp_path / "same.jpg", _lesion(64)),
        write_image(tmp_path / "wide.jpg", _lesion(64, 1, width=80)),
        write_image(tmp_path / "grey.jpg", cv2.cvtColor(_lesion(64, 2), cv2.COLOR_RGB2GRAY)),
        write_image(tmp_path / "large.jpg", cv2.resize(_lesion(64, 3), (512, 512), interpolation=cv2.INTER_CUBIC)),
        write_image(
            tmp_path / "noise.jpg", cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (3, 3), 0)
        ),
    ]
    for size in (64, 48, 40):
        expected = torch.stack([ImageDataset(files, valid_transforms(size))[i]["image"] for i in range(len(files))])
        difference = (to_pixels(_pipeline("none", size)(byte_batch(files))["image"]) - to_pixels(expected)).abs()
        assert difference.max() <= 2.5, size
        assert difference.mean() <= 0.5, size


# --------------------------------------------------------------------------- seeding


def _gen(seed: int) -> da.Generators:
    return da.batch_generators(seed, 0, 0, 0, CPU)


def test_seed_epoch_batch_and_rank_fix_the_augmentation(lesion_files):
    batch = byte_batch(lesion_files * 2)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = _pipeline("full", seed=7)(batch, epoch=3, batch_index=5)["image"]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is neither used nor moved
    torch.manual_seed(12345)  # nor does it matter
    assert torch.equal(_pipeline("full", seed=7)(batch, epoch=3, batch_index=5)["image"], first)
    others = [
        _pipeline("full", seed=8)(batch, epoch=3, batch_index=5),
        _pipeline("full", seed=7)(batch, epoch=4, batch_index=5),
        _pipeline("full", seed=7)(batch, epoch=3, batch_index=6),
        _pipeline("full", seed=7, rank=1)(batch, epoch=3, batch_index=5),
    ]
    for other in others:
        assert not torch.equal(other["image"], first)
    light = [_pipeline("light", seed=seed)(batch)["image"] for seed in (0, 0, 1)]
    assert torch.equal(light[0], light[1]) and not torch.equal(light[0], light[2])


def test_device_batches_is_a_drop_in_loader(lesion_files):
    """What the loops use of a DataLoader: iteration, len, .dataset, .sampler.set_epoch; the epoch and the batch
    index reach the pipeline, so a batch's augmentation is the same whenever it is drawn again."""
    dataset = dd.ByteDataset(lesion_files * 3, targets=np.arange(12) % 2)
    sampler = EpochSampler(12, True, 0)
    loader = dd.DeviceBatches(
        torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=dd.collate_bytes),
        _pipeline("full", seed=5),
    )
    assert len(loader) == 3 and loader.dataset is dataset
    loader.sampler.set_epoch(2)
    first = [batch["image"] for batch in loader]
    assert [image.shape for image in first] == [(4, 3, 64, 64)] * 3
    assert all(torch.equal(a, b["image"]) for a, b in zip(first, loader, strict=True))
    manual = _pipeline("full", seed=5)(next(iter(loader.loader)), epoch=2, batch_index=0)["image"]
    assert torch.equal(manual, first[0])
    loader.sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))["image"], first[0])


@pytest.mark.parametrize("strength", ["full", "light", "artifact"])
def test_each_image_draws_its_own_parameters(lesion_files, strength):
    images = _pipeline(strength)(byte_batch(lesion_files[:1] * 8))["image"]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(images[i], images[j]), (i, j)


# --------------------------------------------------------------------------- each operation against OpenCV


def _rgb(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).numpy()


class _Fixed:
    """A random.Random stand-in that returns given values, for albumentations' kernel helpers."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def uniform(self, low: float, high: float) -> float:
        return self.values.pop(0)


def _affine_reference(image, shift, scale, angle, border):
    matrix = geometric_f.create_affine_transformation_matrix(
        {"x": shift[0], "y": shift[1]}, {"x": 0, "y": 0}, {"x": scale[0], "y": scale[1]}, angle, (31.5, 31.5)
    )
    return geometric_f.warp_affine(image, matrix, cv2.INTER_LINEAR, 0, border, (64, 64))


def _affine_ours(tensor, shift, scale, angle, border):
    x, y = ops.pixel_grid(tensor)
    dx, dy = x - 31.5 - shift[0], y - 31.5 - shift[1]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    src_x, src_y = (cos * dx - sin * dy) / scale[0] + 31.5, (sin * dx + cos * dy) / scale[1] + 31.5
    return ops.remap(tensor, src_x, src_y, border)


def _grid_reference(image, steps_x, steps_y):
    normalized = geometric_f.normalize_grid_distortion_steps((64, 64), 5, list(steps_x), list(steps_y))
    map_x, map_y = geometric_f.generate_grid((64, 64), normalized["steps_x"], normalized["steps_y"], 5)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def _motion_reference(image, size, angle, direction, shift):
    kernel = blur_f.create_motion_kernel(size, angle, direction, True, _Fixed(*shift))
    return pixel_f.convolve(image, kernel / kernel.sum())


def _motion_ours(tensor, size, angle, direction, shift):
    kernels = ops.motion_kernels(
        torch.tensor([size]), torch.tensor([math.radians(angle)]), torch.tensor([direction]), torch.tensor([shift])
    )
    return ops.filter2d(tensor, kernels)


STEPS_X, STEPS_Y = (1.3, 0.6, 1.45, 0.9, 0.55, 1.2), (0.7, 1.4, 1.0, 0.5, 1.25, 0.8)
# (name, ours on a float (1, 3, 64, 64) tensor, OpenCV / albumentations on the uint8 image, tolerance in levels):
# the blurs agree to OpenCV's rounding to uint8 (0.5 levels), the warps to that plus OpenCV's interpolation at
# 1/32 pixel (1 level), the median exactly, HSV to OpenCV's 8-bit HSV (hue in 2-degree steps, all rounded)
OPERATIONS = [
    ("affine black border", lambda t: _affine_ours(t, (6, -3), (0.93, 1.08), 12, "zeros"),
     lambda i: _affine_reference(i, (6, -3), (0.93, 1.08), 12, cv2.BORDER_CONSTANT), 1.0),
    ("affine reflect-101", lambda t: _affine_ours(t, (-3, 3), (1.1, 0.9), -170, "reflection"),
     lambda i: _affine_reference(i, (-3, 3), (1.1, 0.9), -170, cv2.BORDER_REFLECT_101), 1.0),
    ("optical distortion", lambda t: ops.optical_distortion(t, torch.tensor([0.4])),
     lambda i: cv2.remap(i, *geometric_f.get_camera_matrix_distortion_maps((64, 64), 0.4), cv2.INTER_LINEAR), 1.0),
    ("grid distortion", lambda t: ops.grid_distortion(t, torch.tensor([STEPS_X]), torch.tensor([STEPS_Y])),
     lambda i: _grid_reference(i, STEPS_X, STEPS_Y), 1.0),
    ("motion blur", lambda t: _motion_ours(t, 5, 70.0, -0.4, (0.3, -0.8)),
     lambda i: _motion_reference(i, 5, 70.0, -0.4, (0.3, -0.8)), 0.5),
    ("gaussian blur", lambda t: ops.filter2d(t, ops.gaussian_kernels(torch.tensor([3]), torch.tensor([0.8]))),
     lambda i: pixel_f.separable_convolve(i, blur_f.create_gaussian_kernel_1d(0.8, 3)), 0.5),
    ("median 3", lambda t: ops.median_blur(t, 3), lambda i: cv2.medianBlur(i, 3), 0.0),
    ("median 5", lambda t: ops.median_blur(t, 5), lambda i: cv2.medianBlur(i, 5), 0.0),
    ("hsv", lambda t: ops.hsv_shift(t, torch.tensor([7.3]), torch.tensor([15.0]), torch.tensor([-8.0])),
     lambda i: pixel_f.shift_hsv(i, 7.3, 15, -8), 4.0),
]  # fmt: skip


@pytest.mark.parametrize(
    "ours, reference, tolerance", [case[1:] for case in OPERATIONS], ids=[c[0] for c in OPERATIONS]
)
def test_each_step_matches_opencv(ours, reference, tolerance):
    image = _lesion(64, 1)
    image[40:52, 36:60] = (250, 245, 240)  # a bright patch: corners and edges that blurs and warps must move
    expected = reference(image).astype(np.float64)
    got = _rgb(ours(torch.from_numpy(image).permute(2, 0, 1)[None].float()))
    assert np.abs(got - expected).max() <= tolerance


def test_clahe_matches_opencv():
    """The equalisation of the lightness channel is OpenCV's exactly, also for sides that are not a multiple of
    the 8 tiles. On RGB images the results differ more: OpenCV converts to Lab in 8-bit fixed point, which moves
    some lightness values by one level, and on a low-contrast image CLAHE's steep mapping turns one level into tens
    at those pixels; on average the two stay within 3 levels."""
    image = _lesion(64, 2)
    lightness = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[:, :, 0]
    for clip, crop in ((1.0, 64), (2.5, 60), (4.0, 37)):
        part = np.ascontiguousarray(lightness[:crop, : crop + 3])
        ours = ops.equalize(torch.from_numpy(part)[None].long(), torch.tensor([clip]))[0].numpy()
        assert np.array_equal(ours, cv2.createCLAHE(clip, (8, 8)).apply(part)), clip
        rgb = _rgb(ops.clahe_rgb(torch.from_numpy(image).permute(2, 0, 1)[None].float(), torch.tensor([clip])))
        assert np.abs(rgb - pixel_f.clahe(image, clip, (8, 8))).mean() <= 3.0, clip


def test_motion_kernels_are_albumentations_kernels():
    rng = random.Random(0)
    for _ in range(200):
        size, angle, direction = rng.choice([3, 5]), rng.uniform(0, 360), rng.uniform(-1, 1)
        shift = (rng.uniform(-1, 1), rng.uniform(-1, 1))
        kernel = blur_f.create_motion_kernel(size, angle, direction, True, _Fixed(*shift))
        expected = np.zeros((5, 5))
        border = (5 - size) // 2
        expected[border : border + size, border : border + size] = kernel / kernel.sum()
        ours = ops.motion_kernels(
            torch.tensor([size]), torch.tensor([math.radians(angle)]), torch.tensor([direction]), torch.tensor([shift])
        )
        assert np.allclose(ours[0].numpy(), expected)


# --------------------------------------------------------------------------- distributions against albumentations


def _summary(images: torch.Tensor, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: brightness and contrast change (mean and spread of grey levels), whether the lesion ended up in
    the right (flipped left-right) or lower half, and the share of black pixels (cutout, black borders)."""
    grey, before = images.mean(1), inputs.mean(1)
    visible = (grey > 20).float()  # leaves black holes and borders out of the half-by-half comparison
    half = grey.shape[-1] // 2

    def darker(first: torch.Tensor, second: torch.Tensor, mask_first, mask_second) -> torch.Tensor:
        mean_first = (first * mask_first).sum((1, 2)) / mask_first.sum((1, 2)).clamp(min=1)
        mean_second = (second * mask_second).sum((1, 2)) / mask_second.sum((1, 2)).clamp(min=1)
        return (mean_second < mean_first).float()

    return {
        "brightness": grey.mean((1, 2)) - before.mean((1, 2)),
        "contrast": grey.std((1, 2)) - before.std((1, 2)),
        "right": darker(grey[..., :half], grey[..., half:], visible[..., :half], visible[..., half:]),
        "lower": darker(grey[:, :half], grey[:, half:], visible[:, :half], visible[:, half:]),
        "black": (grey < 5).float().mean((1, 2)),
    }


@pytest.mark.parametrize("strength", TRAINING_AUGMENTATIONS)
def test_distributions_match_albumentations(lesion_files, strength):
    """256 augmented images from each pipeline (4 batches of 64 here, ImageDataset's per-image seeds there).
    Each statistic's mean must agree within 3.5 standard errors of the difference of two independent means (a
    chance of about 1 in 2000 per statistic for equal distributions) plus a floor of 0.5 grey levels for the
    rounding differences of the individual steps (see test_each_step_matches_opencv) and 0.01 for shares; the
    spreads of the brightness and contrast changes within 25 % (the standard error of a standard deviation of
    256 draws is about 4.4 %, of a ratio of two about 6 %). The seeds are fixed, so the test cannot flake."""
    n = 256
    files = [lesion_files[i % 4] for i in range(n)]
    inputs = to_pixels(torch.stack([ImageDataset(files, valid_transforms(64))[i]["image"] for i in range(4)]))
    inputs = inputs.repeat(n // 4, 1, 1, 1)
    transform = train_transforms(64, strength=strength)
    cpu_set = ImageDataset(files, transform, augment_seed=1)
    cpu = _summary(to_pixels(torch.stack([cpu_set[(0, i)]["image"] for i in range(n)])), inputs)
    pipeline, dataset = _pipeline(strength, seed=1), dd.ByteDataset(files)
    batches = [dd.collate_bytes([dataset[i] for i in range(start, start + 64)]) for start in range(0, n, 64)]
    device = torch.cat([pipeline(batch, 0, index)["image"] for index, batch in enumerate(batches)])
    ours = _summary(to_pixels(device), inputs)
    for name in cpu:
        standard_error = math.sqrt((cpu[name].var() + ours[name].var()).item() / n)
        floor = 0.01 if name in ("right", "lower", "black") else 0.5
        difference = abs(cpu[name].mean() - ours[name].mean()).item()
        assert difference <= 3.5 * standard_error + floor, (name, cpu[name].mean().item(), ours[name].mean().item())
    for name in ("brightness", "contrast"):
        spread_cpu, spread_ours = cpu[name].std().item(), ours[name].std().item()
        if max(spread_cpu, spread_ours) > 1:
            assert abs(spread_ours / spread_cpu - 1) <= 0.25, (name, spread_cpu, spread_ours)
    if strength == "none":
        assert ours["right"].sum() == 0 and ours["brightness"].abs().max() < 0.5
    else:  # the dihedral flips act: about half the lesions end up on the right
        assert abs(ours["right"].mean().item() - 0.5) <= 0.12


# --------------------------------------------------------------------------- errors and the flag


def test_bad_files_are_named(tmp_path):
    good = write_image(tmp_path / "good.jpg", _lesion(64))
    png = tmp_path / "png.jpg"  # a PNG under a .jpg name: decoded on the CPU instead
    png.write_bytes(cv2.imencode(".png", cv2.cvtColor(_lesion(64), cv2.COLOR_RGB2BGR))[1].tobytes())
    images = dd.decode_images(byte_batch([good, str(png)])["data"], CPU)
    assert np.array_equal(images[1].permute(1, 2, 0).numpy(), _lesion(64))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(UserError, match="broken.jpg cannot be decoded"):
        _pipeline("none")(byte_batch([good, str(broken)]))
    small = write_image(tmp_path / "small.jpg", _lesion(16))
    with pytest.raises(UserError, match="small.jpg is 16x16 px, below the 32 px minimum"):
        _pipeline("none")(byte_batch([small]))
    with pytest.raises(UserError, match="missing.jpg cannot be read"):
        dd.ByteDataset([str(tmp_path / "missing.jpg")])[0]
    with pytest.raises(UserError, match="unknown augmentation strength 'strong'"):
        _pipeline("strong")(byte_batch([good]))


def test_a_16_bit_png_reads_as_on_the_cpu_path_also_in_a_mixed_batch(tmp_path):
    """torchvision decodes a 16-bit PNG to 0..65535, OpenCV (the CPU path) to its high byte: the device path used to
    give other pixels (other predictions), and a batch mixing it with 8-bit files could not be stacked."""
    deep = (_lesion(64).astype(np.uint16) * 257 + np.random.default_rng(0).integers(0, 257, (64, 64, 3))).astype(
        np.uint16
    )
    png = write_image(tmp_path / "deep.png", deep)
    good = write_image(tmp_path / "good.jpg", _lesion(64, 1))
    images = dd.decode_images(byte_batch([png, good])["data"], CPU)
    assert images[0].dtype == torch.uint8
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), read_image(png))
    batch = _pipeline("none")(byte_batch([png, good]))["image"]
    expected = torch.from_numpy(valid_transforms(64)(image=read_image(png))["image"]).permute(2, 0, 1)
    torch.testing.assert_close(batch[0], expected, atol=1e-5, rtol=0)


def test_data_path_flag():
    assert dd.resolve_data_path("auto", torch.device("cpu")) == "cpu"
    assert dd.resolve_data_path("auto", torch.device("cuda", 0)) == "cpu"  # until timed on a GPU
    assert dd.resolve_data_path("gpu", torch.device("cpu")) == "gpu"
    assert dd.resolve_data_path("cpu", torch.device("cuda", 0)) == "cpu"
    with pytest.raises(UserError, match="unknown --data-path 'fast'"):
        dd.resolve_data_path("fast", torch.device("cpu"))
