"""What the networks are fed: the augmentations of both trainers (melanoma and artifact detector), and one Dataset
that reads images, augments them reproducibly and pairs them with metadata and targets."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from color import COLOR_CONSTANCY, DEFAULT_MINKOWSKI_P, check_minkowski_p, shades_of_gray  # noqa: E402
from image_files import read_image  # noqa: E402
from utils import UserError  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUGMENTATIONS = ("full", "light", "robust", "none")  # --augment's
TRAINING_AUGMENTATIONS = (*AUGMENTATIONS, "artifact")  # and the artifact detector's own
RESIZE_MODES = ("stretch", "crop", "pad")  # --resize-mode's

# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """What every image goes through before any augmentation, in training, validation and prediction alike: its
    illuminant divided out (`color_constancy` "shades-of-gray" with Minkowski norm `minkowski_p`, on the whole
    image as read), then made square (`resize_mode`: "stretch" leaves that to the resize, "crop" keeps the centre
    square of the shorter side, "pad" extends the shorter side to the longer one with reflected borders, never
    black ones, which would paint a fake dark frame). Stored in every checkpoint (`record`); a checkpoint written
    before these settings reads as none / stretch, what it was trained with (`from_checkpoint`)."""

    color_constancy: str = "none"
    minkowski_p: float = DEFAULT_MINKOWSKI_P
    resize_mode: str = "stretch"

    def __post_init__(self) -> None:
        if self.color_constancy not in COLOR_CONSTANCY:
            raise UserError(
                f"unknown --color-constancy {self.color_constancy!r}: choose one of {', '.join(COLOR_CONSTANCY)}."
            )
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"unknown --resize-mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}.")
        check_minkowski_p(self.minkowski_p)

    def record(self) -> dict:
        """The checkpoint's fields, beside image_size, mean and std."""
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, path: object = "the checkpoint") -> Preprocessing:
        """The checkpoint's own settings, checked as data: a value no run of this project writes names the file
        (`path`), not a flag the user never gave."""
        values = {
            "color_constancy": checkpoint.get("color_constancy", "none"),
            "minkowski_p": checkpoint.get("minkowski_p", DEFAULT_MINKOWSKI_P),
            "resize_mode": checkpoint.get("resize_mode", "stretch"),
        }
        valid = {
            "color_constancy": lambda value: isinstance(value, str) and value in COLOR_CONSTANCY,
            "minkowski_p": lambda value: (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 1.0 <= value < math.inf
            ),
            "resize_mode": lambda value: isinstance(value, str) and value in RESIZE_MODES,
        }
        for key, value in values.items():
            if not valid[key](value):
                raise UserError(
                    f"{path} holds the preprocessing setting {key} = {repr(value)[:60]}, which is not a valid value: "
                    "the file is damaged or was not written by this project."
                )
        return cls(values["color_constancy"], float(values["minkowski_p"]), values["resize_mode"])

    def steps(self) -> list[A.BasicTransform]:
        """The albumentations steps before the resize to the network's side."""
        steps = [] if self.color_constancy == "none" else [ShadesOfGray(self.minkowski_p)]
        return steps + ([] if self.resize_mode == "stretch" else [SquareImage(self.resize_mode)])

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The same on one RGB uint8 image: the picture the network is shown before its resize (for Grad-CAM)."""
        return square_image(self.correct_colour(image), self.resize_mode)

    def correct_colour(self, image: np.ndarray) -> np.ndarray:
        """The colour constancy alone, on one RGB uint8 image (what the lesion features see)."""
        return shades_of_gray(image, self.minkowski_p) if self.color_constancy == "shades-of-gray" else image


def square_image(image: np.ndarray, mode: str) -> np.ndarray:
    """An image (H, W, C) made square by `mode` (RESIZE_MODES); "stretch" returns it as it is, for the resize to
    stretch. Centred; an odd difference puts the extra row or column at the bottom or right."""
    height, width = image.shape[:2]
    if mode == "stretch" or height == width:
        return image
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return np.ascontiguousarray(image[top : top + side, left : left + side])
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    # numpy's "reflect" mirrors about the edge pixels (OpenCV's BORDER_REFLECT_101), repeatedly where a side
    # is padded by more than its length
    return np.pad(image, ((top, side - height - top), (left, side - width - left), (0, 0)), mode="reflect")


class ShadesOfGray(A.ImageOnlyTransform):
    """color.shades_of_gray as a pipeline step: no random parameters, always applied."""

    def __init__(self, minkowski_p: float = DEFAULT_MINKOWSKI_P) -> None:
        super().__init__(p=1.0)
        self.minkowski_p = minkowski_p

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return shades_of_gray(img, self.minkowski_p)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("minkowski_p",)


class SquareImage(A.ImageOnlyTransform):
    """square_image as a pipeline step (the pipelines carry images only, no masks or boxes)."""

    def __init__(self, mode: str) -> None:
        super().__init__(p=1.0)
        self.mode = mode

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return square_image(img, self.mode)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mode",)


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


def _input_steps(image_size: int, preprocessing: Preprocessing) -> list[A.BasicTransform]:
    """Preprocessing on the image as read, then the resize to image_size x image_size."""
    return [*preprocessing.steps(), A.Resize(image_size, image_size)]


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
    normalises (valid_transforms); "artifact" is the detector's (artifact_train_transforms).

    Colour constancy (in `preprocessing`) comes before every augmentation: it divides out per-channel gains
    almost exactly, so gains drawn before it would be undone, while gains after it stand for what it leaves
    (its estimate's error). The resize comes first rather than last: every later step then works on image_size
    pixels instead of the file's, which is several times cheaper when training below the stored resolution, and
    equivalent in distribution. ElasticTransform uses its approximate form (about 5x faster, same look).
    """
    if strength == "artifact":
        return artifact_train_transforms(image_size, mean, std, preprocessing)
    first, normalize = _input_steps(image_size, preprocessing), A.Normalize(mean=tuple(mean), std=tuple(std))
    dihedral = [A.Transpose(p=0.5), A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)]
    jitter = A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75)
    hsv = A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5)
    affine = A.Affine(
        translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), border_mode=cv2.BORDER_CONSTANT, p=0.85
    )
    # reflected borders: a black constant border paints fake dark corners, a melanoma confound in real data
    rotate = A.Affine(
        translate_percent=(-0.05, 0.05),
        scale=(0.9, 1.1),
        rotate=(-180, 180),
        border_mode=cv2.BORDER_REFLECT_101,
        p=0.85,
    )
    if strength == "none":
        return A.Compose([*first, normalize])
    if strength == "light":
        return A.Compose([*first, *dihedral, rotate, normalize])
    if strength == "robust":
        zoom = A.Affine(
            translate_percent=(-0.05, 0.05),
            scale=ROBUST_SCALE,
            keep_ratio=True,
            rotate=(-180, 180),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.85,
        )
        return A.Compose(
            [
                *first,
                *dihedral,
                zoom,
                A.MultiplicativeNoise(multiplier=ROBUST_GAINS, per_channel=True, p=ROBUST_P["gains"]),
                Vignette(p=ROBUST_P["vignette"]),
                A.Downscale(
                    scale_range=ROBUST_DOWNSCALE,
                    interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
                    p=ROBUST_P["downscale"],
                ),
                A.ImageCompression(quality_range=ROBUST_JPEG_QUALITY, p=ROBUST_P["jpeg"]),
                normalize,
            ]
        )
    if strength != "full":
        raise UserError(
            f"unknown augmentation strength {strength!r}: choose one of {', '.join(TRAINING_AUGMENTATIONS)}."
        )
    return A.Compose(
        [
            *first,
            *dihedral,
            jitter,
            A.OneOf(
                [
                    A.MotionBlur(blur_limit=5),
                    A.MedianBlur(blur_limit=5),
                    A.GaussianBlur(blur_limit=(3, 5)),
                    A.GaussNoise(std_range=(math.sqrt(5) / 255, math.sqrt(30) / 255)),
                ],
                p=0.7,
            ),
            A.OneOf(
                [
                    A.OpticalDistortion(distort_limit=0.5),
                    A.GridDistortion(num_steps=5, distort_limit=0.5),
                    A.ElasticTransform(alpha=3, approximate=True),
                ],
                p=0.7,
            ),
            A.CLAHE(clip_limit=4.0, p=0.7),
            hsv,
            affine,
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=(0.375, 0.375), hole_width_range=(0.375, 0.375), p=0.7
            ),
            normalize,
        ]
    )


def valid_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    preprocessing: Preprocessing = Preprocessing(),
) -> A.Compose:
    return A.Compose([*_input_steps(image_size, preprocessing), A.Normalize(mean=tuple(mean), std=tuple(std))])


def exported_input_transforms(image_size: int) -> A.Compose:
    """valid_transforms without the normalisation (the same resize): the uint8 image an exported model (export.py)
    takes, which normalises inside its graph."""
    return A.Compose([A.Resize(image_size, image_size)])


def artifact_train_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    preprocessing: Preprocessing = Preprocessing(),
) -> A.Compose:
    """Augmentations for the artifact detector: flips, transposes, colour and mild noise, nothing that adds or
    erases an artifact. The melanoma pipeline's constant-border Affine paints black wedges (a fake black frame),
    its cutout hole can erase a ruler or paint a patch, and its blurs wipe out marks a few pixels wide at small
    image sizes: each would teach the detector wrong labels."""
    return A.Compose(
        [
            *_input_steps(image_size, preprocessing),
            A.Transpose(p=0.5),
            A.VerticalFlip(p=0.5),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5),
            A.GaussNoise(std_range=(math.sqrt(5) / 255, math.sqrt(30) / 255), p=0.3),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
        ]
    )


# --------------------------------------------------------------------------- the Dataset


def resize_side(transform: A.Compose) -> int | None:
    """The side an albumentations pipeline's first Resize makes (what read_image may decode down to), or None."""
    resize = next((step for step in getattr(transform, "transforms", []) if isinstance(step, A.Resize)), None)
    return None if resize is None else max(resize.height, resize.width)


class ImageDataset(torch.utils.data.Dataset):
    """Images with optional metadata and targets, as dicts {"image", "meta"?, "target"?}.

    targets may be 1-D (melanoma 0/1) or 2-D (one column per artifact head, NaN where not annotated).

    With `augment_seed` set, the augmentation of an item depends only on (seed, epoch, index), never on which
    worker draws it or how many there are: runs are reproducible and a resumed run sees the same images as an
    uninterrupted one. The epoch reaches the workers inside the key, as (epoch, index) from EpochSampler.
    """

    def __init__(
        self,
        filepaths: Sequence[str],
        transform,
        meta: np.ndarray | None = None,
        targets: np.ndarray | None = None,
        augment_seed: int | None = None,
    ) -> None:
        self.filepaths = list(filepaths)
        self.transform = transform
        self.meta = None if meta is None else torch.as_tensor(meta, dtype=torch.float32)
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
        if self.meta is not None:
            item["meta"] = self.meta[index]
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
