"""The device data path's bytes and batches: DataLoader workers only read the image files' bytes; decoding,
resizing, the training augmentation (device_augment) and normalisation run in batches on the training device
(nvJPEG and CUDA kernels on a GPU, the same code on the CPU), so that the CPU workers stop being the limit of the
training loop. DeviceBatches is the drop-in for the DataLoader that the training and validation loops read."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import to_dtype

from dataset import Preprocessing
from melanoma_audit.cli import DATA_PATHS
from melanoma_audit.color import shades_of_gray_batch
from melanoma_audit.device_augment import augment, augmentation_steps, batch_generators
from melanoma_audit.device_ops import square
from melanoma_audit.image_files import MIN_IMAGE_SIZE, REDUCE_MARGIN
from utils import UserError

# --------------------------------------------------------------------------- reading, collating, decoding


class ByteDataset(torch.utils.data.Dataset):
    """ImageDataset's items with the file's raw bytes instead of the decoded image: {"data" (1-D uint8),
    "path", "side"?, "target"?}. Keys are indices or EpochSampler's (epoch, index); the epoch is not needed here,
    because the augmentation happens after collation, seeded per batch."""

    def __init__(
        self, filepaths: Sequence[str], side: np.ndarray | None = None, targets: np.ndarray | None = None
    ) -> None:
        self.filepaths = list(filepaths)
        self.side = None if side is None else torch.as_tensor(side, dtype=torch.float32)
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
        if self.side is not None:
            item["side"] = self.side[index]
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
            image = decode_image(encoded, mode=ImageReadMode.RGB)
    except RuntimeError:
        raise UserError(f"image {path} cannot be decoded: replace the file or remove its row.") from None
    # a 16-bit PNG decodes to uint16 (0..65535); the CPU path (OpenCV's IMREAD_COLOR) keeps its high byte, and so
    # does torchvision's scaling conversion: the same 0..255 pixels either way, and batches of one dtype
    return to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image


def resize_batch(images: list[torch.Tensor], size: int, preprocessing: Preprocessing = Preprocessing()) -> torch.Tensor:
    """Stacks decoded uint8 images into one float32 (B, 3, size, size) batch in 0..255, the pixels the CPU path's
    preprocessing and A.Resize give (so that a model trained here meets at inference, through valid_transforms,
    what it trained on): colour constancy on the image as decoded, the square rule, then bilinear without
    antialiasing, which equals OpenCV's INTER_LINEAR to rounding. A file of 8 times the size or more read_image
    decodes at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling); nvJPEG cannot, so it is decoded in full and averaged
    down by the same factor first. Images of one shape (usually all) are prepared together."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    groups = []
    for shape, indices in by_shape.items():
        group = torch.stack([images[i] for i in indices]).float()
        factor = next((f for f in (8, 4, 2) if min(shape[1:]) >= REDUCE_MARGIN * f * size), 1)
        if factor > 1:
            group = F.avg_pool2d(group, factor, ceil_mode=True)
        if preprocessing.color_constancy == "shades-of-gray":
            group = shades_of_gray_batch(group, preprocessing.minkowski_p)
        group = square(group, preprocessing.resize_mode)
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


@dataclass(frozen=True)
class DevicePipeline:
    """What the training loop calls on each collated ByteDataset batch: decode, resize, augment and normalise
    on `device`. Returns the batch with "image" (float32, B x 3 x S x S, on the device) in place of "data" and
    "path"; "side" and "target" stay as collated (pinned CPU tensors), for the loop to move as it always has.

    `seed` is the run's augmentation seed (train.py: --seed + fold), `rank` the process's rank under DDP; each
    call passes the epoch and the batch's index within it, which with these fix the batch's augmentation.
    Validation uses strength "none". `preprocessing` (colour constancy, the square rule) comes before any
    augmentation, as on the CPU path."""

    image_size: int
    strength: str
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    seed: int = 0
    rank: int = 0
    preprocessing: Preprocessing = Preprocessing()

    def __post_init__(self) -> None:
        augmentation_steps(self.strength)  # an unknown strength stops the run before the first batch

    @torch.no_grad()
    def __call__(self, batch: dict, epoch: int = 0, batch_index: int = 0) -> dict:
        # float32 throughout, also when called inside the training step's autocast region
        with torch.autocast(self.device.type, enabled=False):
            decoded = decode_images(batch["data"], self.device, batch.get("path"))
            images = resize_batch(decoded, self.image_size, self.preprocessing)
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
    """--data-path: "auto" picks the path measured fastest on the device. The device path has not been timed on a
    GPU yet, so "auto" keeps the measured albumentations workers ("cpu") everywhere; "gpu" means the device path
    on whatever device trains, so the CPU can test it."""
    if choice not in DATA_PATHS:
        raise UserError(f"unknown --data-path {choice!r}: choose one of {', '.join(DATA_PATHS)}.")
    if choice == "auto":
        return "cpu"
    return choice
