"""Image files for every task: one list of extensions, one reader, one dataset of a folder to predict on."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "list_images", "read_image", "PredictFolder", "collate_lists"]

#: the image files every dataset reads (any case): what PIL decodes of the common formats
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: how :func:`read_image` decodes (the benchmark reports it)
DECODER = "cv2.imdecode (libjpeg-turbo) for complete 8-bit colour and grey JPEGs, PIL for every other file"
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def is_image_file(path: str | os.PathLike) -> bool:
    """A file whose extension is one of :data:`IMAGE_EXTENSIONS`, in any case (.JPEG, .jpg, .PNG ...)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder``, recursively, sorted; other files and hidden folders are ignored."""
    folder = Path(folder)
    return sorted(
        p for p in folder.rglob("*") if is_image_file(p) and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )


def jpeg_components(data: bytes) -> int | None:
    """The colour components of an 8-bit JPEG's frame (1 grey, 3 colour, 4 CMYK), from its SOF marker; None when
    ``data`` is no JPEG, not 8-bit or has no frame header."""
    if not data.startswith(JPEG_START):
        return None
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame (not DHT, JPG, DAC)
            return data[i + 9] if data[i + 4] == 8 else None
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """OpenCV's decode of a complete (ends with the EOI marker) 8-bit colour or grey JPEG into H×W×3 uint8 RGB,
    ignoring the EXIF orientation as PIL does; None for any other file. About 0.5 ms less than PIL's decode,
    ``convert`` and copy into numpy at 500×375 (both are libjpeg-turbo: the pixels agree)."""
    if not data.endswith(JPEG_END) or jpeg_components(data) not in (1, 3):
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)


def read_image(path: str | os.PathLike, expected_hw: Sequence[int] | None = None) -> np.ndarray:
    """Decode an image file into an H×W×3 uint8 RGB array (grey, palette and RGBA files are converted).

    JPEGs that :func:`decode_jpeg` takes are decoded by OpenCV, every other file (CMYK or truncated JPEGs, PNG, ...)
    by PIL. An unreadable or truncated file raises ``RuntimeError("cannot read image <path>: ...")``; with
    ``expected_hw``, a file of another size raises ``ValueError`` naming the file and both sizes. Errors surface where
    the image is decoded, also inside DataLoader workers; no image is ever skipped.
    """
    try:
        data = Path(path).read_bytes()
        array = decode_jpeg(data)
        if array is None:
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's errors for bad files
        raise RuntimeError(f"cannot read image {path}: {error}") from error
    if expected_hw is not None and array.shape[:2] != tuple(expected_hw):
        raise ValueError(
            f"image {path} is {array.shape[1]}x{array.shape[0]} pixels, its annotation file says "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    return array


class PredictFolder(Dataset):
    """The images under a folder (recursive, sorted by path) for ``predict``, the same for every task.

    Samples are ``{"image": transform(image=...)["image"], "path": str, "size": (H, W) tensor of the file}``, the
    transform being an albumentations pipeline (the task's evaluation transform).
    """

    def __init__(self, folder: str | os.PathLike, transform: Callable[..., dict[str, Any]]):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"predict folder {folder} is not a folder")
        self.paths = list_images(folder)
        if not self.paths:
            raise FileNotFoundError(f"no images ({' '.join(IMAGE_EXTENSIONS)}, any case) under predict folder {folder}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = read_image(path)
        size = torch.tensor(image.shape[:2])
        return {"image": self.transform(image=image)["image"], "path": str(path), "size": size}


def collate_lists(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """A batch of samples of different sizes: one list per key (images stay separate tensors)."""
    return {key: [s[key] for s in samples] for key in samples[0]}
