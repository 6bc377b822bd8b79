"""Image files: their size from the header, a cheap integrity check, decoding (reduced for much larger files),
safe file names and listing a folder's images. Every problem is a UserError naming the file."""

from __future__ import annotations

import io
import os
from pathlib import Path, PureWindowsPath
from typing import BinaryIO

import cv2
import numpy as np

from utils import UserError

MIN_IMAGE_SIZE = 32
MAX_MEGAPIXELS = 100  # far beyond any dermoscope; a larger file is a mistake or a decompression bomb
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its fixed CRC


def image_dimensions(handle: BinaryIO) -> tuple[int, int] | None:
    """(width, height) from a JPEG, PNG or BMP header, nothing decoded; None when the header does not say."""
    handle.seek(0)
    head = handle.read(26)
    if head.startswith(b"\x89PNG") and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head.startswith(b"BM") and len(head) >= 26 and int.from_bytes(head[14:18], "little") >= 40:
        width, height = (int.from_bytes(head[i : i + 4], "little", signed=True) for i in (18, 22))
        return abs(width), abs(height)  # a negative height means rows stored top-down
    if not head.startswith(b"\xff\xd8"):
        return None
    handle.seek(2)
    while len(segment := handle.read(4)) == 4 and segment[0] == 0xFF:
        marker, length = segment[1], int.from_bytes(segment[2:], "big")
        if marker in _JPEG_FRAMES:
            frame = handle.read(5)  # precision, height, width
            return (int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")) if len(frame) == 5 else None
        if marker == 0xDA or length < 2:  # pixel data before any frame header: not a JPEG we can size
            return None
        handle.seek(length - 2, os.SEEK_CUR)
    return None


def _jpeg_reaches_end(data: bytes) -> bool:
    """True when the JPEG in `data` reaches its end-of-image marker. Follows the segment structure, so that bytes
    appended after the end do not matter and the end marker of a thumbnail inside the metadata does not count."""
    position = 2
    while position + 2 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF or 0xD0 <= marker <= 0xD7:  # a fill byte, or a restart marker: no length field
            position += 1 if marker == 0xFF else 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next marker; FF 00 (a stuffed FF) and restarts are data
            while (position := data.find(b"\xff", position)) != -1 and position + 1 < len(data):
                if data[position + 1] != 0 and not 0xD0 <= data[position + 1] <= 0xD7:
                    break
                position += 2
            if position == -1:
                return False
    return False


def _too_large(width: int, height: int) -> bool:
    return width * height > MAX_MEGAPIXELS * 1_000_000


def _too_large_error(path: str, width: int, height: int) -> UserError:
    return UserError(
        f"image {path} is {width}x{height} px, beyond the {MAX_MEGAPIXELS}-megapixel limit: downscale it or remove "
        "its row."
    )


def image_file_problem(path: str) -> str | None:
    """A cheap integrity check: what is wrong with the file, or None.

    Catches unreadable and empty files, files that are not JPEG or PNG, images beyond MAX_MEGAPIXELS (from the
    header), and files cut short by an interrupted copy (OpenCV would decode a truncated JPEG with a grey lower part
    and only a warning). Reads the header and the last 64 bytes; the whole file only when those lack the end
    marker, as in a truncated file or in a whole one with bytes appended after its end (which is fine).
    Undecodable content beyond that is caught when the image is loaded."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = image_dimensions(handle)
            handle.seek(max(0, os.path.getsize(path) - 64))
            tail = handle.read()
        if not head:
            return "empty file"
        if size and _too_large(*size):
            return f"{size[0]}x{size[1]} px, beyond the {MAX_MEGAPIXELS}-megapixel limit"
        if head.startswith(b"\xff\xd8"):
            whole = b"\xff\xd9" in tail or _jpeg_reaches_end(Path(path).read_bytes())
            return None if whole else "truncated JPEG: no end-of-image marker"
        if head.startswith(b"\x89PNG"):
            return None if b"IEND" in tail or _PNG_END in Path(path).read_bytes() else "truncated PNG"
        return "not a JPEG or PNG file"
    except OSError as error:
        return f"unreadable ({error.strerror})"


def is_plain_name(name: str) -> bool:
    """True for a bare file name: no folder part (/ or \\), not . or .., no drive (C:) and no NUL byte, so that
    a path built from it stays inside its image folder."""
    return (
        bool(name)
        and not any(character in name for character in "/\\\0")
        and name not in (".", "..")
        and not PureWindowsPath(name).drive
    )


# decoded at 1/8, 1/4 or 1/2 scale (libjpeg scales in the DCT, a fraction of the work) when the reduced image still
# has REDUCE_MARGIN times the side the caller needs, so the final resize looks the same; the usual 256 px files
# at 64-256 px are decoded in full
_REDUCED_READS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
REDUCE_MARGIN = 4


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """Reads an image as RGB uint8; a file that cannot be read or decoded, or is below MIN_IMAGE_SIZE or beyond
    MAX_MEGAPIXELS, is a UserError naming it. `size`: the side the caller resizes to, for a reduced decode of a
    much larger file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"image {path} cannot be read ({error.strerror}): restore it or remove its row.") from None
    dimensions = image_dimensions(io.BytesIO(data))
    if dimensions and _too_large(*dimensions):
        raise _too_large_error(path, *dimensions)
    flag = cv2.IMREAD_COLOR
    if dimensions and size:
        factors = (read for factor, read in _REDUCED_READS if min(dimensions) >= REDUCE_MARGIN * factor * size)
        flag = next(factors, cv2.IMREAD_COLOR)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag) if data else None
    except cv2.error:
        image = None
    if image is None:
        raise UserError(f"image {path} cannot be decoded: replace the file or remove its row.")
    if _too_large(image.shape[1], image.shape[0]):  # a format whose header image_dimensions does not read
        raise _too_large_error(path, image.shape[1], image.shape[0])
    if min(image.shape[:2]) < MIN_IMAGE_SIZE:
        raise UserError(
            f"image {path} is {image.shape[1]}x{image.shape[0]} px, below the {MIN_IMAGE_SIZE} px minimum: "
            "remove it or use the full-size file."
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def list_images(img_dir: str | Path) -> list[Path]:
    """Every image file (jpg, jpeg, png, bmp, either case) directly in `img_dir`, sorted by name."""
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise UserError(f"image folder {img_dir} does not exist: check --img_path.")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(
            f"image folder {img_dir} holds no .jpg, .jpeg, .png or .bmp files: point --img_path at the images."
        )
    return files
