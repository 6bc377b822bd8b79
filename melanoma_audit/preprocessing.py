"""What every image goes through before any augmentation, and the input scaling of ImageNet-trained backbones:
the colour constancy and the square rule (Preprocessing, stored in every checkpoint), and ImageNet's per-channel
mean and std. Free of the augmentation library, so that building a network (models.py) does not load it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from melanoma_audit.color import COLOR_CONSTANCY, DEFAULT_MINKOWSKI_P, check_minkowski_p, shades_of_gray
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

RESIZE_MODES = ("stretch", "crop", "pad")  # --resize-mode's


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

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Both steps on one RGB uint8 image: the picture the network is shown before its resize (for Grad-CAM)."""
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
