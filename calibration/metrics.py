"""Detection metrics in numpy: ROC/AUROC, PRO (per-region overlap) and best F1.

Ties are handled exactly: all samples sharing a score move across the threshold together, so the ROC
has one point per distinct score (AUROC equals the Mann-Whitney statistic with ties counted as 1/2).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np


class Curve(NamedTuple):
    """Cumulative counts when thresholding at each distinct score, highest first (score > t is positive)."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    return labels, scores


def _distinct_cumsum(sorted_scores: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums of `weights` taken at the last index of each run of equal (sorted) scores."""
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    return sorted_scores[last], np.cumsum(weights)[last]


def detection_curve(labels: np.ndarray, scores: np.ndarray) -> Curve:
    labels, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    thresholds, tp = _distinct_cumsum(s, y.astype(np.int64))
    _, seen = _distinct_cumsum(s, np.ones_like(y, dtype=np.int64))
    n_pos = int(y.sum())
    return Curve(thresholds, tp, seen - tp, n_pos, int(y.size - n_pos))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    c = detection_curve(labels, scores)
    if c.n_pos == 0 or c.n_neg == 0:
        raise ValueError("ROC needs both normal and anomalous samples")
    fpr = np.r_[0.0, c.fp / c.n_neg]
    tpr = np.r_[0.0, c.tp / c.n_pos]
    return fpr, tpr, np.r_[np.inf, c.thresholds]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, exact with ties)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1 over all thresholds, the threshold t achieving it; positive means score >= t)."""
    c = detection_curve(labels, scores)
    if c.n_pos == 0:
        raise ValueError("F1 needs at least one anomalous sample")
    precision = c.tp / np.maximum(c.tp + c.fp, 1)
    recall = c.tp / c.n_pos
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    i = int(np.argmax(f1))
    return float(f1[i]), float(c.thresholds[i])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of all images: masks bool (N, H, W), maps float (N, H, W)."""
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    return auroc(masks, maps)


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `max_fpr` (Bergmann et al. 2021).

    Each connected ground-truth region counts equally: at a threshold, PRO is the mean over regions of
    the fraction of the region's pixels above it; FPR is over all pixels outside the masks. Sweeping
    thresholds from high to low, each region pixel adds 1 / (K * |region|) to PRO, so the curve is one
    weighted cumulative sum. Area up to `max_fpr` (interpolated there), divided by `max_fpr`.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    region_pixels = []
    for i in range(masks.shape[0]):
        n, labels = cv2.connectedComponents(masks[i].astype(np.uint8), connectivity=8)
        for r in range(1, n):
            region_pixels.append((i, labels == r))
        n_regions += n - 1
    if n_regions == 0:
        raise ValueError("PRO needs at least one anomalous region in the masks")
    for i, region in region_pixels:
        weights[i][region] = 1.0 / (n_regions * region.sum())
    negatives = ~masks
    n_neg = int(negatives.sum())
    if n_neg == 0:
        raise ValueError("PRO needs normal pixels to measure the false-positive rate")
    flat = maps.ravel()
    order = np.argsort(-flat, kind="stable")
    s = flat[order]
    _, pro = _distinct_cumsum(s, weights.ravel()[order])
    _, fp = _distinct_cumsum(s, negatives.ravel()[order].astype(np.int64))
    fpr = np.r_[0.0, fp / n_neg]
    pro = np.r_[0.0, pro]
    # Integrate up to max_fpr, closing the curve at the interpolated value there.
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size:
        x = np.r_[x, max_fpr]
        y = np.r_[y, np.interp(max_fpr, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])]
    return float(np.trapezoid(y, x) / max_fpr)


WEAK_AUROC = 0.9  # below this, no threshold both keeps false rejects low and catches most defects


def weakness(model: str, figures: dict[str, float | None]) -> str | None:
    """One line saying that `model` detects poorly on the data these figures (name -> AUROC) were measured on,
    naming each figure below WEAK_AUROC; None when none is (or none could be measured)."""
    weak = [f"{name} {value:.3f}" for name, value in figures.items() if value is not None and value < WEAK_AUROC]
    if not weak:
        return None
    return (
        f"{model} detects poorly on this data: {', '.join(weak)} (below {WEAK_AUROC:.2f}); "
        "another model (model.name) may do far better"
    )
