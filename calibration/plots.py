"""Small PNG charts drawn with OpenCV (already a dependency), so reports need no plotting library.

Each function draws one figure into an RGB uint8 array; `save_png` writes it. Axes are linear with
"nice" tick steps; series are lines or step histograms; colours come from one fixed palette.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 760, 420
MARGIN = {"left": 70, "right": 20, "top": 40, "bottom": 55}
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, LIGHT = (30, 30, 30), (120, 120, 120), (225, 225, 225)
PALETTE = [(31, 119, 180), (214, 39, 40), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75)]
THRESHOLD_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class Axes:
    """Maps data coordinates to pixels inside the plot area."""

    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        left, top = MARGIN["left"], MARGIN["top"]
        w = WIDTH - MARGIN["left"] - MARGIN["right"]
        h = HEIGHT - MARGIN["top"] - MARGIN["bottom"]
        xs = left + (np.asarray(x, dtype=np.float64) - self.x0) / (self.x1 - self.x0 or 1.0) * w
        ys = top + h - (np.asarray(y, dtype=np.float64) - self.y0) / (self.y1 - self.y0 or 1.0) * h
        return xs, ys


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def new_figure(title: str, axes: Axes, xlabel: str, ylabel: str) -> np.ndarray:
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    left, top = MARGIN["left"], MARGIN["top"]
    right, bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]
    for t in nice_ticks(axes.x0, axes.x1):
        x = int(axes.px(t, axes.y0)[0])
        cv2.line(img, (x, top), (x, bottom), LIGHT, 1)
        cv2.putText(img, _label(t), (x - 14, bottom + 18), FONT, 0.42, GREY, 1, cv2.LINE_AA)
    for t in nice_ticks(axes.y0, axes.y1):
        y = int(axes.px(axes.x0, t)[1])
        cv2.line(img, (left, y), (right, y), LIGHT, 1)
        cv2.putText(img, _label(t), (6, y + 4), FONT, 0.42, GREY, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (right, bottom), GREY, 1)
    cv2.putText(img, title, (left, 26), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
    cv2.putText(
        img, xlabel, (left + (right - left) // 2 - 4 * len(xlabel), HEIGHT - 14), FONT, 0.48, BLACK, 1, cv2.LINE_AA
    )
    cv2.putText(img, ylabel, (left + 6, top + 16), FONT, 0.45, GREY, 1, cv2.LINE_AA)
    return img


def draw_polyline(img: np.ndarray, axes: Axes, x: np.ndarray, y: np.ndarray, colour: tuple, thickness: int = 2) -> None:
    xs, ys = axes.px(x, y)
    pts = np.stack([xs, ys], axis=1).round().astype(np.int32)
    cv2.polylines(img, [pts], False, colour, thickness, cv2.LINE_AA)


def draw_vline(img: np.ndarray, axes: Axes, x: float, colour: tuple, label: str) -> None:
    px = int(axes.px(x, axes.y0)[0])
    y_top, y_bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    for y in range(y_top, y_bottom, 12):  # dashed
        cv2.line(img, (px, y), (px, min(y + 7, y_bottom)), colour, 2)
    width = cv2.getTextSize(label, FONT, 0.45, 1)[0][0]
    x = px + 5 if px + 5 + width < WIDTH - MARGIN["right"] else px - 5 - width  # keep it inside the figure
    cv2.putText(img, label, (x, HEIGHT - MARGIN["bottom"] - 10), FONT, 0.45, colour, 1, cv2.LINE_AA)


def draw_legend(img: np.ndarray, entries: list[tuple[str, tuple]]) -> None:
    x, y = WIDTH - MARGIN["right"] - 260, MARGIN["top"] + 14
    for i, (name, colour) in enumerate(entries):
        yy = y + 18 * i
        cv2.line(img, (x, yy - 4), (x + 22, yy - 4), colour, 3)
        cv2.putText(img, name, (x + 28, yy), FONT, 0.45, BLACK, 1, cv2.LINE_AA)


def histogram_figure(
    title: str, groups: dict[str, np.ndarray], threshold: float | None, xlabel: str = "anomaly score"
) -> np.ndarray:
    """Step histograms (share of each group per bin) on shared bins, with the threshold as a dashed line."""
    values = [v for v in groups.values() if v.size]
    allv = np.concatenate(values) if values else np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, 41)
    shares = {k: np.histogram(v, edges)[0] / max(v.size, 1) for k, v in groups.items()}
    ymax = max((float(s.max()) for s in shares.values() if s.size), default=1.0) * 1.1 or 1.0
    axes = Axes(lo, hi, 0.0, ymax)
    img = new_figure(title, axes, xlabel, "share of frames")
    legend = []
    for i, (name, share) in enumerate(shares.items()):
        colour = PALETTE[i % len(PALETTE)]
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(share, 2)
        draw_polyline(img, axes, xs, ys, colour)
        legend.append((f"{name} (n={groups[name].size})", colour))
    if threshold is not None:
        draw_vline(img, axes, threshold, THRESHOLD_COLOUR, f"threshold {threshold:.3g}")
    draw_legend(img, legend)
    return img


def curve_figure(
    title: str,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    vline: tuple[float, str] | None = None,
    hline: tuple[float, str] | None = None,
    limits: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Line series; optional shaded band (x, low, high), vertical marker and horizontal reference."""
    if limits is None:
        xs = np.concatenate([x for x, _ in series.values()])
        ys = np.concatenate([y for _, y in series.values()] + ([band[2]] if band is not None else []))
        limits = (float(xs.min()), float(xs.max()), 0.0, float(ys.max()) * 1.05 or 1.0)
    axes = Axes(*limits)
    img = new_figure(title, axes, xlabel, ylabel)
    if band is not None:
        bx, low, high = band
        top = np.stack(axes.px(bx, high), axis=1)
        bottom = np.stack(axes.px(bx[::-1], low[::-1]), axis=1)
        poly = np.concatenate([top, bottom]).round().astype(np.int32)
        shade = img.copy()
        cv2.fillPoly(shade, [poly], (198, 219, 239))
        cv2.addWeighted(shade, 0.7, img, 0.3, 0, dst=img)
    legend = []
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        draw_polyline(img, axes, x, y, colour)
        legend.append((name, colour))
    if hline is not None:
        y = int(axes.px(axes.x0, hline[0])[1])
        cv2.line(img, (MARGIN["left"], y), (WIDTH - MARGIN["right"], y), PALETTE[2], 1, cv2.LINE_AA)
        legend.append((hline[1], PALETTE[2]))
    if vline is not None:
        draw_vline(img, axes, vline[0], THRESHOLD_COLOUR, vline[1])
    draw_legend(img, legend)
    return img


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGB image with the anomaly map as a JET heat overlay; the colour scale is shared via vmin/vmax."""
    norm = np.clip((anomaly_map - vmin) / (vmax - vmin or 1.0), 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    return cv2.addWeighted(image, 0.55, heat, 0.45, 0)


def tile_grid(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], tile: int = 200) -> np.ndarray:
    """Rows of captioned tiles, each row with a heading: [(heading, [(rgb, caption), ...]), ...]."""
    cols = max((len(items) for _, items in rows), default=1)
    head, cap = 26, 22
    out = np.full((len(rows) * (head + tile + cap), max(cols, 1) * (tile + 6), 3), 255, np.uint8)
    for r, (heading, items) in enumerate(rows):
        y = r * (head + tile + cap)
        cv2.putText(out, heading, (4, y + 18), FONT, 0.55, BLACK, 1, cv2.LINE_AA)
        for c, (rgb, caption) in enumerate(items):
            x = c * (tile + 6)
            out[y + head : y + head + tile, x : x + tile] = cv2.resize(rgb, (tile, tile), interpolation=cv2.INTER_AREA)
            cv2.putText(out, caption[:34], (x + 2, y + head + tile + 15), FONT, 0.38, BLACK, 1, cv2.LINE_AA)
    return out


def save_png(path: Path, rgb: np.ndarray) -> Path:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
