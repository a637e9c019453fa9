"""Photographs that ship inside installed packages: the raw material of generated datasets, offline.

Each family is one photograph; tiles cut from it at jittered poses stand in for the parts of one product.
Textures (brick, grass, gravel, moon, cells, tissue) are the closest to surface inspection; the scenes
(coffee, china, flower, ...) are kept because a detector tuned on textures alone can be tuned to them.
The Hubble deep field is left out: on its black sky most defects of either generator are invisible.
scikit-image is needed for most (the `demo`/`dev` extras); scikit-learn and matplotlib ship the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            from skimage import data
        except ImportError as exc:
            raise RuntimeError("generated datasets need scikit-image: pip install 'linewatch[demo]'") from exc
        return getattr(data, name)()

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(filename) as f:
            encoded = np.frombuffer(f.read(), dtype=np.uint8)
        return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    return load


@dataclass(frozen=True)
class Photo:
    name: str
    load: Callable[[], np.ndarray]  # uint8, (H, W) grey or (H, W, 3) RGB
    texture: bool  # a surface (any crop looks alike) rather than a scene


PHOTOS: dict[str, Photo] = {
    p.name: p
    for p in (
        Photo("brick", _skimage("brick"), True),
        Photo("grass", _skimage("grass"), True),
        Photo("gravel", _skimage("gravel"), True),
        Photo("moon", _skimage("moon"), True),
        Photo("cell", _skimage("cell"), True),
        Photo("ihc", _skimage("immunohistochemistry"), True),
        Photo("coins", _skimage("coins"), False),
        Photo("coffee", _skimage("coffee"), False),
        Photo("rocket", _skimage("rocket"), False),
        Photo("astronaut", _skimage("astronaut"), False),
        Photo("china", _sklearn("china.jpg"), False),
        Photo("flower", _sklearn("flower.jpg"), False),
        Photo("hopper", _matplotlib("grace_hopper.jpg"), False),
    )
}


def load_photo(name: str, grey: bool = False) -> np.ndarray:
    """Photograph `name` as uint8 RGB (H, W, 3), or grey (H, W) when it is grey or `grey` is asked for."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photograph {name!r}: expected one of {', '.join(PHOTOS)}")
    image = np.ascontiguousarray(PHOTOS[name].load())
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if grey and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image
