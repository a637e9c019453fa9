"""Image -> tensor preprocessing, defined once and shared by fit, evaluate and the pipeline.

A `Preprocessing` is plain data (stored in every model file), so the exact transform used at fit time
is the one used on the line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class Preprocessing:
    """Resize to `resize` (h, w), centre-crop to `crop` (h, w), then (x - mean) / std on 0..255 values."""

    resize: tuple[int, int]
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")

    @property
    def input_size(self) -> tuple[int, int]:
        """(h, w) of the tensor the model sees."""
        return self.crop

    def geometry(self, image: np.ndarray) -> np.ndarray:
        """Resize + crop an RGB uint8 image (H, W, 3); also used for ground-truth masks."""
        h, w = self.resize
        if image.shape[:2] == (h, w):
            out = image  # already at size (a camera set to the model's resolution): no resampling pass
        else:
            interp = cv2.INTER_AREA if image.shape[0] >= h and image.shape[1] >= w else cv2.INTER_LINEAR
            out = cv2.resize(image, (w, h), interpolation=interp)
        top = (h - self.crop[0]) // 2
        left = (w - self.crop[1]) // 2
        return out[top : top + self.crop[0], left : left + self.crop[1]]

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground-truth mask (H, W) -> bool (crop_h, crop_w), nearest-neighbour so labels stay binary."""
        h, w = self.resize
        out = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        top = (h - self.crop[0]) // 2
        left = (w - self.crop[1]) // 2
        return out[top : top + self.crop[0], left : left + self.crop[1]] > 0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Any supported image -> float32 (3, crop_h, crop_w), normalised."""
        return self.normalize(self.geometry(to_rgb8(image)))

    def normalize(self, rgb8: np.ndarray) -> np.ndarray:
        """RGB uint8 (crop_h, crop_w, 3) already through `geometry` -> float32 (3, crop_h, crop_w)."""
        rgb = rgb8.astype(np.float32)
        rgb -= np.asarray(self.mean, dtype=np.float32)
        rgb /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def normalize_batch(self, rgb8: torch.Tensor) -> torch.Tensor:
        """Batched `normalize` on the inference device: uint8 (N, h, w, 3) -> float32 (N, 3, h, w).

        The streaming pipeline moves uint8 frames (4x less memory traffic than float) and normalises
        a whole batch where the model runs; the arithmetic is the same as `normalize`.
        """
        n, h, w, c = rgb8.shape
        x = rgb8.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # changed in place below
        # The channel constants tiled along a whole row: broadcast per channel, the innermost loop runs over
        # 3 values and does not vectorise (2-3x slower on the dev CPU: bench/normalise_bench.py). The
        # operations, and so every value, are those of `normalize`.
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).repeat(w)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).repeat(w)
        x.view(n * h, w * c).sub_(mean).div_(std)
        return x.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels-last, no copy

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            resize=(int(d["resize"][0]), int(d["resize"][1])),
            crop=(int(d["crop"][0]), int(d["crop"][1])),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
        )


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Convert grayscale, RGBA, 16-bit or float images to RGB uint8 (H, W, 3); anything else is an error.

    Line cameras often deliver mono8/mono16; they are converted rather than rejected.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) * 255 + 32767) // 65535
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(image, 0.0, 1.0) * 255.0 + 0.5
    elif image.dtype != np.uint8:
        raise ValueError(f"expected uint8, uint16 or float pixels, got {image.dtype}")
    image = image.astype(np.uint8, copy=False)
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])
