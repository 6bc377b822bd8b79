"""What the networks are fed: the augmentations of both trainers (melanoma and artifact detector), and one Dataset
that reads images, augments them reproducibly and pairs them with metadata and targets. The preprocessing before
the augmentations (colour constancy, the square rule) is preprocessing.py's; its names are importable from here too."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from melanoma_audit.color import shades_of_gray  # noqa: E402
from melanoma_audit.image_files import read_image  # noqa: E402
from melanoma_audit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, Preprocessing, square_image  # noqa: E402
from utils import UserError  # noqa: E402

__all__ = [  # the preprocessing's names as well, for the modules that take them from here
    "AUGMENTATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "TRAINING_AUGMENTATIONS",
    "EpochSampler",
    "ImageDataset",
    "Preprocessing",
    "exported_input_transforms",
    "resize_side",
    "square_image",
    "train_transforms",
    "valid_transforms",
]

AUGMENTATIONS = ("full", "light", "robust", "none")  # --augment's
TRAINING_AUGMENTATIONS = (*AUGMENTATIONS, "artifact")  # and the artifact detector's own

# --------------------------------------------------------------------------- pipeline steps


class FixedStep(A.ImageOnlyTransform):
    """`function(image, **options)` as a pipeline step: no random parameters, always applied (the pipelines carry
    images only, no masks or boxes). The preprocessing's colour constancy and square rule."""

    def __init__(self, function: Callable[..., np.ndarray], **options) -> None:
        super().__init__(p=1.0)
        self.function, self.options = function, options

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return self.function(img, **self.options)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("function", "options")


def preprocessing_steps(preprocessing: Preprocessing) -> list[A.BasicTransform]:
    """The albumentations steps of `preprocessing`, before the resize to the network's side."""
    steps = []
    if preprocessing.color_constancy != "none":
        steps.append(FixedStep(shades_of_gray, p=preprocessing.minkowski_p))
    if preprocessing.resize_mode != "stretch":
        steps.append(FixedStep(square_image, mode=preprocessing.resize_mode))
    return steps


# radial darkening of "robust": at most this much at the corners (albumentations has no vignetting)
VIGNETTE_STRENGTH = (0.0, 0.5)


class Vignette(A.ImageOnlyTransform):
    """Lens vignetting: every pixel times 1 - strength * r^2, r its distance from the centre over the corner's,
    the strength drawn uniformly from `strength_range` per image. Applied to every label alike, so that dark
    corners, a melanoma confound in real data, tell the network nothing."""

    def __init__(self, strength_range: tuple[float, float] = VIGNETTE_STRENGTH, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.strength_range = strength_range

    def get_params(self) -> dict[str, float]:
        return {"strength": self.py_random.uniform(*self.strength_range)}

    def apply(self, img: np.ndarray, strength: float, **params) -> np.ndarray:
        return np.clip(img * vignette_mask(*img.shape[:2], strength)[..., None] + 0.5, 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength_range",)


def vignette_mask(height: int, width: int, strength: float) -> np.ndarray:
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    y, x = np.mgrid[0:height, 0:width]
    squared = ((y - centre_y) ** 2 + (x - centre_x) ** 2) / max(centre_y**2 + centre_x**2, 1e-6)
    return (1 - strength * squared).astype(np.float32)


# --------------------------------------------------------------------------- augmentations


# "robust": the acquisition changes between clinics, each drawn per image (device_augment draws the same)
ROBUST_SCALE = (0.7, 1.3)  # zoom out and in: another field of view; the same factor on both axes
ROBUST_GAINS = (0.85, 1.15)  # a gain per channel: another illuminant or white balance, and exposure
ROBUST_DOWNSCALE = (0.5, 0.9)  # down then up again: a lower source resolution (HAM10000's 200x150)
ROBUST_JPEG_QUALITY = (40, 95)  # re-compression
ROBUST_P = {"gains": 0.75, "vignette": 0.5, "downscale": 0.3, "jpeg": 0.5}
NOISE_STD = (math.sqrt(5) / 255, math.sqrt(30) / 255)  # GaussNoise's, on the 0-1 scale


def _input_steps(image_size: int, preprocessing: Preprocessing) -> list[A.BasicTransform]:
    """Preprocessing on the image as read, then the resize to image_size x image_size."""
    return [*preprocessing_steps(preprocessing), A.Resize(image_size, image_size)]


def _dihedral() -> list[A.BasicTransform]:
    """The eight flips and transposes of a square, each equally likely."""
    return [A.Transpose(p=0.5), A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)]


def _colour_jitter() -> list[A.BasicTransform]:
    return [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
    ]


def _any_rotation(scale: tuple[float, float], keep_ratio: bool = False) -> A.Affine:
    """Any rotation with a small shift and the scale drawn from `scale`. Reflected borders: a black constant
    border paints fake dark corners, a melanoma confound in real data."""
    return A.Affine(
        translate_percent=(-0.05, 0.05),
        scale=scale,
        keep_ratio=keep_ratio,
        rotate=(-180, 180),
        border_mode=cv2.BORDER_REFLECT_101,
        p=0.85,
    )


def _light_augmentations() -> list[A.BasicTransform]:
    return [*_dihedral(), _any_rotation((0.9, 1.1))]


def _robust_augmentations() -> list[A.BasicTransform]:
    return [
        *_dihedral(),
        _any_rotation(ROBUST_SCALE, keep_ratio=True),
        A.MultiplicativeNoise(multiplier=ROBUST_GAINS, per_channel=True, p=ROBUST_P["gains"]),
        Vignette(p=ROBUST_P["vignette"]),
        A.Downscale(
            scale_range=ROBUST_DOWNSCALE,
            interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
            p=ROBUST_P["downscale"],
        ),
        A.ImageCompression(quality_range=ROBUST_JPEG_QUALITY, p=ROBUST_P["jpeg"]),
    ]


def _full_augmentations() -> list[A.BasicTransform]:
    brightness_contrast, hue_saturation = _colour_jitter()
    blur_or_noise = A.OneOf(
        [
            A.MotionBlur(blur_limit=5),
            A.MedianBlur(blur_limit=5),
            A.GaussianBlur(blur_limit=(3, 5)),
            A.GaussNoise(std_range=NOISE_STD),
        ],
        p=0.7,
    )
    distortion = A.OneOf(
        [
            A.OpticalDistortion(distort_limit=0.5),
            A.GridDistortion(num_steps=5, distort_limit=0.5),
            A.ElasticTransform(alpha=3, approximate=True),
        ],
        p=0.7,
    )
    affine = A.Affine(
        translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), border_mode=cv2.BORDER_CONSTANT, p=0.85
    )
    cutout = A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(0.375, 0.375), hole_width_range=(0.375, 0.375), p=0.7
    )
    return [
        *_dihedral(),
        brightness_contrast,
        blur_or_noise,
        distortion,
        A.CLAHE(clip_limit=4.0, p=0.7),
        hue_saturation,
        affine,
        cutout,
    ]


def _artifact_augmentations() -> list[A.BasicTransform]:
    """The artifact detector's: flips, transposes, colour and mild noise, nothing that adds or erases an artifact.
    The melanoma pipeline's constant-border Affine paints black wedges (a fake black frame), its cutout hole can
    erase a ruler or paint a patch, and its blurs wipe out marks a few pixels wide at small image sizes: each would
    teach the detector wrong labels."""
    return [*_dihedral(), *_colour_jitter(), A.GaussNoise(std_range=NOISE_STD, p=0.3)]


AUGMENTATION_STEPS = {
    "none": list,
    "light": _light_augmentations,
    "robust": _robust_augmentations,
    "full": _full_augmentations,
    "artifact": _artifact_augmentations,
}


def train_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    strength: str = "full",
    preprocessing: Preprocessing = Preprocessing(),
) -> A.Compose:
    """Training augmentation, after the preprocessing and the resize. "full" is the 1st-place SIIM-ISIC pipeline
    in the albumentations 2.x API; "light" keeps only geometric changes (flips, transposes, any rotation, small
    shift and scale, reflected borders): colour is much of the signal, and a network learning from random weights
    on a small set does not get past colour jitter, blur and cutout; "robust" is "light" with what differs between
    clinics and dermatoscopes: zoom in and out (ROBUST_SCALE, reflected borders), per-channel gains (illuminant,
    white balance), vignetting, a lower source resolution and JPEG re-compression; "none" only resizes and
    normalises (valid_transforms); "artifact" is the detector's (_artifact_augmentations).

    Colour constancy (in `preprocessing`) comes before every augmentation: it divides out per-channel gains
    almost exactly, so gains drawn before it would be undone, while gains after it stand for what it leaves
    (its estimate's error). The resize comes first rather than last: every later step then works on image_size
    pixels instead of the file's, which is several times cheaper when training below the stored resolution, and
    equivalent in distribution. ElasticTransform uses its approximate form (about 5x faster, same look).
    """
    if strength not in AUGMENTATION_STEPS:
        raise UserError(
            f"unknown augmentation strength {strength!r}: choose one of {', '.join(TRAINING_AUGMENTATIONS)}."
        )
    augmentations = AUGMENTATION_STEPS[strength]()
    return A.Compose(
        [*_input_steps(image_size, preprocessing), *augmentations, A.Normalize(mean=tuple(mean), std=tuple(std))]
    )


def valid_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    preprocessing: Preprocessing = Preprocessing(),
) -> A.Compose:
    return train_transforms(image_size, mean, std, "none", preprocessing)


def exported_input_transforms(image_size: int) -> A.Compose:
    """valid_transforms without the normalisation (the same resize): the uint8 image an exported model (export.py)
    takes, which normalises inside its graph."""
    return A.Compose([A.Resize(image_size, image_size)])


# --------------------------------------------------------------------------- the Dataset


def resize_side(transform: A.Compose) -> int | None:
    """The side an albumentations pipeline's first Resize makes (what read_image may decode down to), or None."""
    resize = next((step for step in getattr(transform, "transforms", []) if isinstance(step, A.Resize)), None)
    return None if resize is None else max(resize.height, resize.width)


class ImageDataset(torch.utils.data.Dataset):
    """Images with optional side inputs and targets, as dicts {"image", "side"?, "target"?}. The side inputs are what
    the network reads beside the image: the encoded metadata and, where the model uses them, the lesion features.

    targets may be 1-D (melanoma 0/1) or 2-D (one column per artifact head, NaN where not annotated).

    With `augment_seed` set, the augmentation of an item depends only on (seed, epoch, index), never on which
    worker draws it or how many there are: runs are reproducible and a resumed run sees the same images as an
    uninterrupted one. The epoch reaches the workers inside the key, as (epoch, index) from EpochSampler.
    """

    def __init__(
        self,
        filepaths: Sequence[str],
        transform,
        side: np.ndarray | None = None,
        targets: np.ndarray | None = None,
        augment_seed: int | None = None,
    ) -> None:
        self.filepaths = list(filepaths)
        self.transform = transform
        self.side = None if side is None else torch.as_tensor(side, dtype=torch.float32)
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.augment_seed = augment_seed
        self.read_size = resize_side(transform)

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.augment_seed is not None:
            state = np.random.SeedSequence([self.augment_seed, epoch, index]).generate_state(2)
            self.transform.set_random_state(np.random.default_rng(state[0]), random.Random(int(state[1])))
        image = self.transform(image=read_image(self.filepaths[index], self.read_size))["image"]
        item = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy())}
        if self.side is not None:
            item["side"] = self.side[index]
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys: a shuffle that depends only on (seed, epoch), split across `world_size`
    ranks (padded by repetition so every rank gets the same number of items)."""

    def __init__(self, n_items: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n_items, self.shuffle, self.seed = n_items, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n_items / self.world_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n_items, generator=generator).tolist()
        else:
            order = list(range(self.n_items))
        total = len(self) * self.world_size
        order += order[: total - len(order)]
        for index in order[self.rank : total : self.world_size]:
            yield (self.epoch, index)
