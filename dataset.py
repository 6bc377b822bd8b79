"""What the networks are fed: the augmentations of both trainers (melanoma and artifact detector), and one Dataset
that reads images, augments them reproducibly and pairs them with metadata and targets."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations otherwise asks PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from image_files import read_image  # noqa: E402
from utils import UserError  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------- augmentations


AUGMENTATIONS = ("full", "light", "none")  # --augment's
TRAINING_AUGMENTATIONS = (*AUGMENTATIONS, "artifact")  # and the artifact detector's own


def train_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    strength: str = "full",
) -> A.Compose:
    """Training augmentation. "full" is the 1st-place SIIM-ISIC pipeline in the albumentations 2.x API; "light"
    keeps only geometric changes (flips, transposes, any rotation, small shift and scale, reflected borders):
    colour is much of the signal, and a network learning from random weights on a small set does not get past
    colour jitter, blur and cutout; "none" only resizes and normalises (valid_transforms); "artifact" is the
    detector's (artifact_train_transforms).

    The resize comes first rather than last: every later step then works on image_size pixels instead of the
    file's, which is several times cheaper when training below the stored resolution, and equivalent in
    distribution. ElasticTransform uses its approximate form (about 5x faster, same look).
    """
    if strength == "artifact":
        return artifact_train_transforms(image_size, mean, std)
    resize, normalize = A.Resize(image_size, image_size), A.Normalize(mean=tuple(mean), std=tuple(std))
    dihedral = [A.Transpose(p=0.5), A.VerticalFlip(p=0.5), A.HorizontalFlip(p=0.5)]
    jitter = A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.75)
    hsv = A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.5)
    affine = A.Affine(
        translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), border_mode=cv2.BORDER_CONSTANT, p=0.85
    )
    if strength == "none":
        return A.Compose([resize, normalize])
    if strength == "light":
        # reflected borders: a black constant border paints fake dark corners, a melanoma confound in real data
        rotate = A.Affine(
            translate_percent=(-0.05, 0.05),
            scale=(0.9, 1.1),
            rotate=(-180, 180),
            border_mode=cv2.BORDER_REFLECT_101,
            p=0.85,
        )
        return A.Compose([resize, *dihedral, rotate, normalize])
    if strength != "full":
        raise UserError(
            f"unknown augmentation strength {strength!r}: choose one of {', '.join(TRAINING_AUGMENTATIONS)}."
        )
    return A.Compose(
        [
            resize,
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
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> A.Compose:
    return A.Compose([A.Resize(image_size, image_size), A.Normalize(mean=tuple(mean), std=tuple(std))])


def exported_input_transforms(image_size: int) -> A.Compose:
    """valid_transforms without the normalisation (the same resize): the uint8 image an exported model (export.py)
    takes, which normalises inside its graph."""
    return A.Compose([A.Resize(image_size, image_size)])


def artifact_train_transforms(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> A.Compose:
    """Augmentations for the artifact detector: flips, transposes, colour and mild noise, nothing that adds or
    erases an artifact. The melanoma pipeline's constant-border Affine paints black wedges (a fake black frame),
    its cutout hole can erase a ruler or paint a patch, and its blurs wipe out marks a few pixels wide at small
    image sizes: each would teach the detector wrong labels."""
    return A.Compose(
        [
            A.Resize(image_size, image_size),
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
