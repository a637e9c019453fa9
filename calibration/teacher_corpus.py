"""Images to distil EfficientAD's teacher on, offline and without end: procedural images and every
photograph that ships in an installed package, each heavily augmented.

The paper distils its teachers on ImageNet, which a line box cannot download. A teacher has to reproduce
the backbone's local features on whatever it is shown, so variety counts for more than realism:
occluding shapes (dead leaves), noise with natural image spectra, fractals, drawn shapes and gratings
cover edges, corners, blobs, textures and colour statistics at every scale, and the photographs add
natural content. Image i of the corpus seeded s depends on (s, i) alone, so a distillation resumed from a
checkpoint sees the images an uninterrupted one would, and a held-out set is the corpus under another seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from calibration.photos import PHOTOS, load_photo

log = logging.getLogger(__name__)

ImageMaker = Callable[[np.random.Generator, int], np.ndarray]  # (rng, side) -> (side, side, 3) float32 in 0..1


def random_palette(rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth random colour map t (any shape, 0..1) -> RGB: a + b cos(2 pi (c t + d)) per channel."""
    a, b = rng.uniform(0.2, 0.8, 3), rng.uniform(0.1, 0.5, 3)
    c, d = rng.uniform(0.3, 2.0, 3), rng.uniform(0.0, 1.0, 3)

    def colour(t: np.ndarray) -> np.ndarray:
        return np.clip(a + b * np.cos(2 * np.pi * (c * t[..., None] + d)), 0.0, 1.0).astype(np.float32)

    return colour


def spectral_field(rng: np.random.Generator, side: int, exponent: float, anisotropy: float = 1.0) -> np.ndarray:
    """(side, side) noise whose power falls as 1 / f**exponent (natural images: about 2), scaled to 0..1."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    angle = rng.uniform(0, np.pi)
    u = fx * np.cos(angle) + fy * np.sin(angle)
    v = -fx * np.sin(angle) + fy * np.cos(angle)
    f = np.sqrt((u * anisotropy) ** 2 + v**2)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** (exponent / 2)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(side, side))
    low, high = np.percentile(field, [1, 99])
    return np.clip((field - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)


def spectral_noise(rng: np.random.Generator, side: int) -> np.ndarray:
    """Three spectral fields mixed into correlated colour channels, sometimes stretched along one direction."""
    exponent = rng.uniform(1.0, 3.0)
    anisotropy = 1.0 if rng.random() < 0.6 else rng.uniform(1.5, 6.0)
    fields = np.stack([spectral_field(rng, side, exponent, anisotropy) for _ in range(3)], axis=-1)
    mix = np.eye(3) * rng.uniform(0.2, 1.0) + rng.uniform(0.0, 1.0, (3, 3))
    out = fields @ (mix / mix.sum(axis=0, keepdims=True))
    return random_palette(rng)(out[..., 0]) if rng.random() < 0.3 else out.astype(np.float32)


def dead_leaves(rng: np.random.Generator, side: int) -> np.ndarray:
    """Occluding discs, ellipses and squares with a power-law size distribution (scale-invariant, like
    natural scenes), each flat or textured."""
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = rng.uniform(0, 1, 3)
    palette = random_palette(rng) if rng.random() < 0.5 else None
    r_min, r_max = max(1.0, side / 128), side / 3
    for _ in range(int(rng.integers(150, 600))):
        u = rng.random()  # inverse CDF of p(r) ~ r**-3 on [r_min, r_max]
        r = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
        rgb = palette(np.array(rng.random())) if palette is not None else rng.uniform(0, 1, 3)
        colour = tuple(float(v) for v in rgb)
        centre = (int(rng.integers(0, side)), int(rng.integers(0, side)))
        shape = rng.random()
        if shape < 0.5:
            cv2.circle(canvas, centre, max(1, int(r)), colour, -1, lineType=cv2.LINE_AA)
        elif shape < 0.8:
            axes = (max(1, int(r)), max(1, int(r * rng.uniform(0.2, 1.0))))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA)
        else:
            box = cv2.boxPoints((centre, (2 * r, 2 * r * rng.uniform(0.3, 1.0)), float(rng.uniform(0, 90))))
            cv2.fillPoly(canvas, [box.astype(np.int32)], colour, lineType=cv2.LINE_AA)
    return canvas


def julia(rng: np.random.Generator, side: int) -> np.ndarray:
    """A Julia set z -> z**2 + c near the Mandelbrot set's edge, coloured by smoothed escape time."""
    c = 0.7885 * np.exp(1j * rng.uniform(0, 2 * np.pi)) * rng.uniform(0.95, 1.02)
    zoom = 10 ** rng.uniform(-0.3, 0.8)
    centre = complex(rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
    axis = (np.arange(side) - side / 2) / (side / 2) * 1.6 / zoom
    z = centre + axis[None, :] + 1j * axis[:, None]
    escape = np.full(z.shape, 64.0, np.float64)
    alive = np.ones(z.shape, bool)
    for i in range(64):
        z[alive] = z[alive] ** 2 + c
        out = alive & (np.abs(z) > 4.0)
        escape[out] = i + 1 - np.log2(np.log(np.abs(z[out])) + 1e-12)
        alive &= ~out
    t = escape / 64.0
    return random_palette(rng)(t * rng.uniform(1.0, 6.0) % 1.0)


def shapes(rng: np.random.Generator, side: int) -> np.ndarray:
    """Lines, polygons, circles and rectangles, solid or translucent, over a smooth background."""
    canvas = (spectral_field(rng, side, 3.0)[..., None] * rng.uniform(0, 1, 3)).astype(np.float32)
    for _ in range(int(rng.integers(5, 40))):
        layer = canvas.copy()
        colour = tuple(float(v) for v in rng.uniform(0, 1, 3))
        kind = rng.random()
        points = rng.integers(-side // 4, side + side // 4, (int(rng.integers(3, 8)), 2)).astype(np.int32)
        if kind < 0.3:
            thickness = int(rng.integers(1, max(2, side // 32)))
            cv2.line(layer, tuple(map(int, points[0])), tuple(map(int, points[1])), colour, thickness, cv2.LINE_AA)
        elif kind < 0.6:
            cv2.fillPoly(layer, [points], colour, lineType=cv2.LINE_AA)
        elif kind < 0.8:
            radius = int(rng.integers(2, side // 4))
            cv2.circle(layer, tuple(map(int, points[0])), radius, colour, -1 if rng.random() < 0.7 else 2, cv2.LINE_AA)
        else:
            cv2.rectangle(layer, tuple(map(int, points[0])), tuple(map(int, points[1])), colour, -1)
        alpha = 1.0 if rng.random() < 0.6 else rng.uniform(0.3, 0.8)
        canvas = canvas * (1 - alpha) + layer * alpha
    return canvas


def gratings(rng: np.random.Generator, side: int) -> np.ndarray:
    """Sums of oriented sine or square waves and checkerboards, sometimes warped by a smooth field."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if rng.random() < 0.4:
        warp = rng.uniform(0.0, 0.08)
        x = x + warp * (spectral_field(rng, side, 4.0) - 0.5)
        y = y + warp * (spectral_field(rng, side, 4.0) - 0.5)
    total = np.zeros((side, side), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(2, 48)
        wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        kind = rng.random()
        if kind < 0.3:
            wave = np.sign(wave)
        elif kind < 0.45:
            other = np.sin(2 * np.pi * cycles * (-x * np.sin(angle) + y * np.cos(angle)))
            wave = np.sign(wave * other)  # a checkerboard
        total += wave.astype(np.float32) * rng.uniform(0.3, 1.0)
    t = (total - total.min()) / max(float(total.max() - total.min()), 1e-6)
    return random_palette(rng)(t)


def photo_view(photos: Sequence[np.ndarray]) -> ImageMaker:
    """A random view of a random photograph: any angle, 10-100 % of its short side, flipped or not."""

    def view(rng: np.random.Generator, side: int) -> np.ndarray:
        photo = photos[int(rng.integers(0, len(photos)))]
        h, w = photo.shape[:2]
        crop = int(min(h, w) * rng.uniform(0.1, 1.0))
        centre = (float(rng.uniform(crop / 2, w - crop / 2)), float(rng.uniform(crop / 2, h - crop / 2)))
        turn = cv2.getRotationMatrix2D(centre, float(rng.uniform(0, 360)), side / crop)
        turn[:, 2] += (side / 2 - centre[0], side / 2 - centre[1])
        out = cv2.warpAffine(photo, turn, (side, side), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return out.astype(np.float32) / 255.0

    return view


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour, contrast, gamma, blur or sharpening, noise and grey: each drawn independently."""
    out = image
    if rng.random() < 0.8:
        grey = out.mean(axis=-1, keepdims=True)
        out = grey + (out - grey) * rng.uniform(0.0, 1.8)  # saturation
        out = (out - out.mean()) * rng.uniform(0.5, 1.5) + out.mean() + rng.uniform(-0.2, 0.2)
    if rng.random() < 0.3:
        out = out[..., rng.permutation(3)]
    if rng.random() < 0.4:
        out = np.clip(out, 0.0, 1.0) ** rng.uniform(0.5, 2.0)
    blur = rng.random()
    if blur < 0.25:
        out = cv2.GaussianBlur(np.ascontiguousarray(out), (0, 0), float(rng.uniform(0.5, 2.5)))
    elif blur < 0.4:
        soft = cv2.GaussianBlur(np.ascontiguousarray(out), (0, 0), 1.0)
        out = out + (out - soft) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.3:
        out = out + rng.normal(0.0, rng.uniform(0.005, 0.05), out.shape)
    if rng.random() < 0.1:
        out = np.repeat(out.mean(axis=-1, keepdims=True), 3, axis=-1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


PROCEDURAL: dict[str, ImageMaker] = {
    "dead_leaves": dead_leaves,
    "spectral_noise": spectral_noise,
    "julia": julia,
    "shapes": shapes,
    "gratings": gratings,
}
PHOTO_SHARE = 0.35  # of the images, when photographs are available
MIN_STD, MAX_DRAWS = 0.03, 8  # an image flatter than this (0..1 scale) is drawn again, up to MAX_DRAWS times


def packaged_photos() -> dict[str, np.ndarray]:
    """Every photograph of calibration.photos that the installed packages provide, by name, as RGB uint8."""
    out = {}
    for name in PHOTOS:
        try:
            photo = load_photo(name)
        except (RuntimeError, ImportError, OSError) as exc:
            log.info("teacher corpus: photograph %s not available (%s)", name, exc)
            continue
        out[name] = photo if photo.ndim == 3 else np.repeat(photo[..., None], 3, axis=-1)
    return out


@dataclass(frozen=True)
class TeacherCorpus:
    """An unbounded, seeded stream of (side, side, 3) uint8 RGB images."""

    seed: int
    side: int
    photos: tuple[np.ndarray, ...] = ()
    stream: int = 0  # independent streams of one seed: training, statistics, held-out

    @property
    def kinds(self) -> tuple[str, ...]:
        return (*PROCEDURAL, "photo") if self.photos else tuple(PROCEDURAL)

    def kind(self, index: int) -> str:
        return self.kinds[self._pick(np.random.default_rng([self.seed, self.stream, index]))]

    def image(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, index])
        kind = self.kinds[self._pick(rng)]
        make = photo_view(self.photos) if kind == "photo" else PROCEDURAL[kind]
        for _ in range(MAX_DRAWS):  # a flat image (inside a Julia set, a pale palette, clipped) teaches nothing
            out = augment(make(rng, self.side), rng)
            if float(out.std()) >= MIN_STD:
                break
        return (out * 255.0 + 0.5).astype(np.uint8)

    def batch(self, start: int, n: int) -> np.ndarray:
        """Images start .. start + n - 1, as (n, side, side, 3)."""
        return np.stack([self.image(i) for i in range(start, start + n)])

    def _pick(self, rng: np.random.Generator) -> int:
        if self.photos and rng.random() < PHOTO_SHARE:
            return len(PROCEDURAL)
        return int(rng.integers(0, len(PROCEDURAL)))
