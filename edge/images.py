"""Reading image files: every format OpenCV decodes, in RGB(A) order, 16-bit and grayscale kept.

Offline datasets and the runtime's folder source both read frames through here.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class ImageError(ValueError):
    """An image file that cannot be read; the message names the file and what was wrong."""


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted by path (deterministic order on every OS)."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path) -> np.ndarray:
    """Read an image unchanged (keeps 16-bit and grayscale), as RGB(A) order; ImageError if unreadable."""
    data = np.fromfile(str(path), dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise ImageError(f"{path}: file does not exist")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None or image.size == 0:
        raise ImageError(f"{path}: cannot be decoded as an image (corrupt, truncated or not an image file)")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return image
