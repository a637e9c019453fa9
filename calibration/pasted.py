"""A second defect generator, designed apart from `calibration.synthetic`: defects made of foreign material.

Where `synthetic` draws strokes and blotches of flat tone, this one brings in what a line really sees:
    patch     an irregular piece of *another* photograph pasted in (CutPaste with foreign material)
    recolour  a soft-edged region whose colour or brightness is shifted
    blur      a soft-edged region out of focus (smear, film, condensation)
    object    a foreign body with a hard outline and a cast shadow
    hairline  a thin, low-contrast crack that wanders across the surface
Every defect returns its exact pixel mask. Shapes are random star-shaped polygons smoothed by a Fourier
series, not the ellipses and polylines of `synthetic`, so a detector tuned to one generator's shapes does
not score well on the other by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from calibration.synthetic import Defect, blend

PASTED_KINDS = ("patch", "recolour", "blur", "object", "hairline")


def _like(donor: np.ndarray, image: np.ndarray) -> np.ndarray:
    """`donor` in `image`'s channel layout (grey or RGB)."""
    if image.ndim == 2 and donor.ndim == 3:
        return cv2.cvtColor(donor, cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and donor.ndim == 2:
        return cv2.cvtColor(donor, cv2.COLOR_GRAY2RGB)
    return donor


def _region(size: int, rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """A random star-shaped region (H, W) float32 in 0..1: radius(angle) is a smooth random Fourier series."""
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    base = rng.uniform(*radius) * size
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(angles)
    for k in range(1, 5):  # low harmonics: lobes, not spikes
        r += rng.normal(0, 0.22 / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    r = base * np.clip(r, 0.35, 1.8)
    poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
    region = np.zeros((size, size), np.uint8)
    cv2.fillPoly(region, [np.round(poly * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    return region.astype(np.float32) / 255.0


def _soft(region: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(region, (0, 0), sigmaX=sigma)


def _donor_tile(donors: Sequence[np.ndarray], image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random, randomly scaled and rotated crop of a random donor photograph, the size of `image`."""
    donor = _like(donors[int(rng.integers(len(donors)))], image)
    size = image.shape[0]
    h, w = donor.shape[:2]
    side = int(min(h, w) * rng.uniform(0.15, 0.5))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = cv2.resize(donor[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_LINEAR)
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(0, 360)), 1.0)
    return cv2.warpAffine(crop, turn, (size, size), borderMode=cv2.BORDER_REFLECT)


class PastedDefects:
    """The five defect kinds over a set of donor photographs (never the one the tiles come from)."""

    def __init__(self, donors: Sequence[np.ndarray]) -> None:
        if not donors:
            raise ValueError("pasted defects need at least one donor photograph")
        self.donors = list(donors)

    def kinds(self) -> dict[str, Defect]:
        return {kind: getattr(self, kind) for kind in PASTED_KINDS}

    def patch(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        region = _region(image.shape[0], rng, (0.06, 0.14))
        alpha = _soft(region, 1.0)
        return blend(image, alpha, _donor_tile(self.donors, image, rng)), alpha > 0.5

    def recolour(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        region = _region(image.shape[0], rng, (0.08, 0.16))
        alpha = _soft(region, image.shape[0] * 0.015)
        shifted = image.astype(np.float32)
        if image.ndim == 3:  # a hue-ish shift: each channel its own gain and offset
            shifted = shifted * rng.uniform(0.6, 1.4, 3) + rng.uniform(-40, 40, 3)
        else:
            shifted = 255.0 * (shifted / 255.0) ** rng.choice([rng.uniform(0.45, 0.65), rng.uniform(1.6, 2.4)])
        return blend(image, alpha, np.clip(shifted, 0, 255)), alpha > 0.5

    def blur(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        region = _region(image.shape[0], rng, (0.1, 0.18))
        alpha = _soft(region, image.shape[0] * 0.01)
        smeared = cv2.GaussianBlur(image, (0, 0), sigmaX=float(rng.uniform(3.0, 6.0)))
        return blend(image, alpha, smeared), alpha > 0.5

    def object(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = image.shape[0]
        body = _region(size, rng, (0.05, 0.1))
        dx, dy = rng.uniform(0.01, 0.03, 2) * size * rng.choice([-1, 1], 2)
        shadow = cv2.warpAffine(_soft(body, size * 0.01), np.float32([[1, 0, dx], [0, 1, dy]]), (size, size))
        darker = blend(image, shadow * rng.uniform(0.4, 0.7), np.zeros_like(image))
        out = blend(darker, body, _donor_tile(self.donors, image, rng))
        return out, (body > 0.5) | (shadow > 0.5)

    def hairline(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = image.shape[0]
        n = int(rng.integers(40, 80))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, n))
        step = size * rng.uniform(0.006, 0.01)
        start = rng.uniform(0.25, 0.75, 2) * size
        pts = start + np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
        line = np.zeros((size, size), np.uint8)
        cv2.polylines(line, [np.round(pts * 16).astype(np.int32)], False, 255, 1, cv2.LINE_AA, shift=4)
        alpha = line.astype(np.float32) / 255.0 * rng.uniform(0.45, 0.8)
        tone = rng.choice([rng.uniform(0, 40), rng.uniform(215, 255)])
        out = blend(image, alpha, np.full_like(image, int(tone)))
        # The mask covers the crack and the pixel either side, as an annotator's brush would.
        return out, cv2.dilate((line > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
