"""What the image tests share: small images written as files, the bytes batches of the device data path, and the
network input turned back into 0-255 pixels."""

import cv2
import numpy as np
import torch

from melanoma_audit import device_data as dd
from melanoma_audit.preprocessing import IMAGENET_MEAN, IMAGENET_STD

CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def write_image(path, image: np.ndarray) -> str:
    """An RGB (or grey) image written in the format of `path`'s suffix (JPEG at quality 95); returns the path."""
    pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    options = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else []
    ok, encoded = cv2.imencode(path.suffix, pixels, options)
    assert ok
    path.write_bytes(encoded.tobytes())
    return str(path)


def byte_batch(files: list[str]) -> dict:
    """The files as the device data path's workers hand them over: raw bytes, collated."""
    dataset = dd.ByteDataset(files)
    return dd.collate_bytes([dataset[i] for i in range(len(files))])


def to_pixels(normalized: torch.Tensor) -> torch.Tensor:
    """A batch normalised with ImageNet's mean and std back on the 0-255 scale."""
    return (normalized * STD + MEAN) * 255
