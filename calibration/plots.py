"""The report's figures: charts drawn with matplotlib (Agg, no display), image montages with OpenCV.

Charts are built on a bare `matplotlib.figure.Figure` with its own Agg canvas, never through pyplot,
so nothing here touches matplotlib's global figure manager or needs a display, and it is safe to call
from any thread or a headless server. `save_figure` writes a chart; `save_png` writes an RGB image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

FIGSIZE = (8.0, 4.5)  # inches; at DPI this is 800 x 450 pixels
DPI = 100
# Series colours in order: the report's text calls the first series "blue".
PALETTE = ["tab:blue", "tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
THRESHOLD_COLOUR = "black"
REFERENCE_COLOUR = "tab:orange"  # horizontal reference line (the FPR target)
BAND_COLOUR = "#c6dbef"
FONT = cv2.FONT_HERSHEY_SIMPLEX  # captions of the example montage
BLACK = (30, 30, 30)


def new_figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    """A white figure with one titled, labelled and gridded axes, attached to an Agg canvas."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=13)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    return fig, ax


def _span(lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) widened when empty, so an axis never has zero length."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.05 or 0.5
    return lo - pad, hi + pad


def _clear_of(lo: float, hi: float, x: float | None, margin: float = 0.02) -> tuple[float, float]:
    """(lo, hi) widened by `margin` of the span on a side where a marker at x would sit on the frame, unseen."""
    if x is None:
        return lo, hi
    pad = (hi - lo) * margin
    return (lo - pad if x - lo < pad else lo), (hi + pad if hi - x < pad else hi)


def histogram_figure(
    title: str, groups: dict[str, np.ndarray], threshold: float | None, xlabel: str = "anomaly score"
) -> Figure:
    """Step histograms (share of each group per bin) on shared bins, with the threshold as a dashed line."""
    values = [np.asarray(v, dtype=np.float64).ravel() for v in groups.values()]
    present = [v for v in values if v.size]
    allv = np.concatenate(present) if present else np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    lo, hi = _span(lo, hi)
    edges = np.linspace(lo, hi, 41)
    x0, x1 = _clear_of(lo, hi, threshold)
    fig, ax = new_figure(title, xlabel, "share of frames")
    top = 0.0
    for i, (name, v) in enumerate(zip(groups, values, strict=True)):
        share = np.histogram(v, edges)[0] / max(v.size, 1)
        top = max(top, float(share.max()))
        ax.stairs(share, edges, color=PALETTE[i % len(PALETTE)], linewidth=2, label=f"{name} (n={v.size})")
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.5, label=f"threshold {threshold:.3g}")
    ax.set_xlim(x0, x1)
    ax.set_ylim(0.0, top * 1.1 or 1.0)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    return fig


def curve_figure(
    title: str,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    xlabel: str,
    ylabel: str,
    band: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    vline: tuple[float, str] | None = None,
    hline: tuple[float, str] | None = None,
    limits: tuple[float, float, float, float] | None = None,
    band_label: str | None = None,
    x_percent: bool = False,
    y_percent: bool = False,
    diagonal: str | None = None,
) -> Figure:
    """Line series; optional shaded band (x, low, high), vertical marker and horizontal reference.

    `x_percent` / `y_percent` label an axis holding rates (0..1) in percent; `diagonal`, when given, is
    the legend label of a dotted y = x reference (chance level on a ROC).
    """
    if limits is None:
        xs = np.concatenate([np.asarray(x, dtype=np.float64) for x, _ in series.values()])
        ys = np.concatenate(
            [np.asarray(y, dtype=np.float64) for _, y in series.values()] + ([band[2]] if band is not None else [])
        )
        limits = (float(xs.min()), float(xs.max()), 0.0, float(ys.max()) * 1.05 or 1.0)
    x0, x1 = _clear_of(*_span(*limits[:2]), None if vline is None else vline[0])
    y0, y1 = _span(*limits[2:])
    fig, ax = new_figure(title, xlabel, ylabel)
    if band is not None:
        bx, low, high = band
        ax.fill_between(bx, low, high, color=BAND_COLOUR, alpha=0.8, linewidth=0, label=band_label)
    if diagonal is not None:
        ax.plot([0.0, 1.0], [0.0, 1.0], color="0.6", linestyle=":", linewidth=1.2, label=diagonal)
    for i, (name, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, color=PALETTE[i % len(PALETTE)], linewidth=2, label=name)
    if hline is not None:
        ax.axhline(hline[0], color=REFERENCE_COLOUR, linewidth=1.2, label=hline[1])
    if vline is not None:
        ax.axvline(vline[0], color=THRESHOLD_COLOUR, linestyle="--", linewidth=1.5, label=vline[1])
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    if x_percent:
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if y_percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    return fig


def save_figure(path: Path, fig: Figure) -> Path:
    """Write a chart as PNG (Agg) at the figure's size."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    with open(path, "wb") as f:
        canvas.print_png(f)
    return path


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGB image with the anomaly map as a JET heat overlay; the colour scale is shared via vmin/vmax."""
    norm = np.clip((anomaly_map - vmin) / (vmax - vmin or 1.0), 0.0, 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    return cv2.addWeighted(image, 0.55, heat, 0.45, 0)


def tile_grid(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], tile: int = 200) -> np.ndarray:
    """Rows of captioned tiles, each row with a heading: [(heading, [(rgb, caption), ...]), ...].

    A montage of frames at (near) their own resolution, not a chart, so it stays plain image processing.
    """
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
    """Write an RGB uint8 image as PNG."""
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
