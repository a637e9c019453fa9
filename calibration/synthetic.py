"""Synthetic defect generation and a generator of MVTec-AD-layout datasets.

Normal tiles are random crops of real texture photographs that ship with scikit-image (brick, grass,
gravel), jittered in position, rotation, brightness and sensor noise like parts passing a camera.
Defects are drawn onto normal tiles with an exact pixel mask:
    scratch  thin bright or dark stroke          stain    soft-edged blotch of another tone
    crack    dark branching random walk          missing  flat hole where material is absent
    twist    swirl of the texture (a locally rotated/twisted patch)
The same `add_defect` is used to estimate recall from normal frames alone during calibration.
scikit-image is imported only when textures are needed (it belongs to the `demo` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

TEXTURES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("scratch", "stain", "crack", "missing", "twist")

Defect = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def texture_photo(name: str) -> np.ndarray:
    """A grayscale texture photograph from scikit-image's sample data (uint8, H x W)."""
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}: expected one of {', '.join(TEXTURES)}")
    try:
        from skimage import data
    except ImportError as exc:
        raise RuntimeError("synthetic data needs scikit-image: pip install 'linewatch[demo]'") from exc
    image = getattr(data, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image


def normal_tile(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size uint8 crop of `photo` with small pose, gain and noise variation."""
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.46, 0.49) * min(h, w))
    # Crop with a margin, rotate, then keep the centre: no mirrored or empty corners from the rotation.
    pad = int(np.ceil(side * 0.04)) + 1
    outer = side + 2 * pad
    y = int(rng.integers(0, h - outer + 1))
    x = int(rng.integers(0, w - outer + 1))
    angle = float(rng.uniform(-2.0, 2.0))
    rot = cv2.getRotationMatrix2D((outer / 2.0, outer / 2.0), angle, 1.0)
    crop = cv2.warpAffine(photo[y : y + outer, x : x + outer], rot, (outer, outer))[pad : pad + side, pad : pad + side]
    tile = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    tile = tile * rng.uniform(0.93, 1.07) + rng.uniform(-8.0, 8.0) + rng.normal(0.0, 2.0, tile.shape)
    return np.clip(tile, 0, 255).astype(np.uint8)


def blend(image: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> np.ndarray:
    """image * (1 - alpha) + value * alpha; alpha (H, W) broadcasts over colour channels."""
    if image.ndim == 3:
        alpha = alpha[:, :, None]
    out = image.astype(np.float32) * (1.0 - alpha) + np.asarray(value, dtype=np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def _point(rng: np.random.Generator, size: int, margin: float = 0.15) -> tuple[int, int]:
    lo, hi = int(size * margin), int(size * (1 - margin))
    return int(rng.integers(lo, hi)), int(rng.integers(lo, hi))


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    x0, y0 = _point(rng, size)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.5) * size
    bend = rng.normal(0, 0.06 * size, 2)
    pts = np.array(
        [
            [x0, y0],
            [x0 + np.cos(angle) * length / 2 + bend[0], y0 + np.sin(angle) * length / 2 + bend[1]],
            [x0 + np.cos(angle) * length, y0 + np.sin(angle) * length],
        ],
        dtype=np.int32,
    )
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.polylines(mask, [pts], False, 255, thickness=int(rng.integers(3, 7)), lineType=cv2.LINE_AA)
    alpha = mask.astype(np.float32) / 255.0 * rng.uniform(0.85, 1.0)
    value = rng.choice([rng.uniform(0, 25), rng.uniform(230, 255)])
    return blend(image, alpha, value), mask > 64


def stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    center = _point(rng, size, 0.2)
    axes = (int(rng.uniform(0.07, 0.14) * size), int(rng.uniform(0.05, 0.10) * size))
    blob = np.zeros(image.shape[:2], np.float32)
    cv2.ellipse(blob, center, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    soft = cv2.GaussianBlur(blob, (0, 0), sigmaX=max(axes) / 6.0)
    tone = rng.choice([rng.uniform(10, 50), rng.uniform(200, 240)])
    return blend(image, soft * rng.uniform(0.75, 0.95), tone), soft > 0.3


def _random_walk(start: tuple[float, float], size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = start
    direction = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(int(rng.integers(12, 22))):
        direction += rng.normal(0, 0.45)
        step = rng.uniform(0.015, 0.03) * size
        x = float(np.clip(x + np.cos(direction) * step, 0, size - 1))
        y = float(np.clip(y + np.sin(direction) * step, 0, size - 1))
        pts.append((x, y))
    return np.array(pts, dtype=np.int32)


def crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    trunk = _random_walk(_point(rng, size, 0.25), size, rng)
    walks = [trunk]
    if rng.random() < 0.6:  # a branch from the middle of the trunk
        mid = trunk[len(trunk) // 2]
        walks.append(_random_walk((float(mid[0]), float(mid[1])), size, rng))
    cv2.polylines(mask, walks, False, 255, thickness=int(rng.integers(3, 6)))
    alpha = mask.astype(np.float32) / 255.0 * rng.uniform(0.9, 1.0)
    return blend(image, alpha, rng.uniform(0, 15)), mask > 0


def missing(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cx, cy = _point(rng, size, 0.2)
    n = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.05, 0.11, n) * size
    poly = np.stack([cx + np.cos(angles) * radii, cy + np.sin(angles) * radii], axis=1).astype(np.int32)
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [poly], 255)
    fill = rng.choice([rng.uniform(0, 30), rng.uniform(225, 255)]) + rng.normal(0, 3, image.shape)
    return blend(image, (mask > 0).astype(np.float32), fill), mask > 0


def twist(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Swirl the texture around a point: rotation angle decays with distance from the centre."""
    size = image.shape[0]
    cx, cy = _point(rng, size, 0.22)
    radius = rng.uniform(0.12, 0.2) * size
    strength = rng.uniform(3.5, 6.0) * rng.choice([-1.0, 1.0])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = strength * np.exp(-r / (radius / 2.0)) * (r < radius)
    cos, sin = np.cos(theta), np.sin(theta)
    map_x = (cx + dx * cos - dy * sin).astype(np.float32)
    map_y = (cy + dx * sin + dy * cos).astype(np.float32)
    out = cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    displacement = np.abs(theta) * r
    return out, displacement > 1.5


DEFECTS: dict[str, Defect] = {
    "scratch": scratch,
    "stain": stain,
    "crack": crack,
    "missing": missing,
    "twist": twist,
}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw defect `kind` on a copy of a uint8 image (H, W) or (H, W, 3); returns (image, bool mask)."""
    if kind not in DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}: expected one of {', '.join(DEFECT_KINDS)}")
    return DEFECTS[kind](image, rng)


def generate_mvtec_dataset(
    root: str | Path,
    categories: tuple[str, ...] = TEXTURES,
    n_train: int = 100,
    n_test_good: int = 20,
    n_test_per_defect: int = 6,
    size: int = 256,
    seed: int = 0,
) -> list[Path]:
    """Write an MVTec AD layout dataset per texture category under `root`; returns the category folders."""
    root = Path(root)
    folders = []
    for ci, category in enumerate(categories):
        photo = texture_photo(category)
        rng = np.random.default_rng([seed, ci])
        base = root / category
        good_train = base / "train" / "good"
        good_test = base / "test" / "good"
        for folder in (good_train, good_test):
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            cv2.imwrite(str(good_train / f"{i:03d}.png"), normal_tile(photo, size, rng))
        for i in range(n_test_good):
            cv2.imwrite(str(good_test / f"{i:03d}.png"), normal_tile(photo, size, rng))
        for kind in DEFECT_KINDS:
            test_dir = base / "test" / kind
            gt_dir = base / "ground_truth" / kind
            test_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n_test_per_defect):
                image, mask = add_defect(normal_tile(photo, size, rng), kind, rng)
                cv2.imwrite(str(test_dir / f"{i:03d}.png"), image)
                cv2.imwrite(str(gt_dir / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
        folders.append(base)
    return folders
