"""Evaluating a bundle on a labelled MVTec-layout test set."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from calibration.datasets import DatasetError, MVTecCategory, SkipReport, iter_loaded
from calibration.metrics import auroc, best_f1, pixel_auroc, pro_score
from calibration.progress import Progress
from edge.bundle import Bundle
from edge.preprocessing import Preprocessing
from edge.scoring import Scorer


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one bundle on one test set (None where the data cannot support the metric)."""

    image_auroc: float | None
    pixel_auroc: float | None
    pro: float | None
    f1: float | None
    n_images: int
    ms_per_image: float
    fpr_at_threshold: float | None = None  # good frames rejected / good frames, at the bundle's threshold
    tpr_at_threshold: float | None = None  # defect frames rejected / defect frames

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def format_metric(value: float | None, width: int = 0) -> str:
    """A metric in tables and summaries: three decimals, `n/a` where the data could not support it."""
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.3f}"


@dataclass(frozen=True)
class ScoredSet:
    labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    scores: np.ndarray  # (N,)
    maps: np.ndarray  # (N, H, W) float32
    masks: np.ndarray | None  # (N, H, W) bool, None when the category has no ground truth
    ms: np.ndarray  # (N,) scoring time at batch 1
    kinds: list[str]  # (N,) "good" or the defect type of each image

    def subset(self, keep: np.ndarray) -> ScoredSet:
        """The images where `keep` (N,) bool is true."""
        masks = None if self.masks is None else self.masks[keep]
        kinds = [k for k, kept in zip(self.kinds, keep, strict=True) if kept]
        return ScoredSet(self.labels[keep], self.scores[keep], self.maps[keep], masks, self.ms[keep], kinds)


def score_category(
    model: Scorer,
    pre: Preprocessing,
    category: MVTecCategory,
    skip_bad: bool,
    report: SkipReport,
    progress: bool = False,
) -> ScoredSet:
    """Score every test image at batch 1 with `model` (timed: forward pass only, after one warm-up)."""
    if not category.test:
        raise DatasetError(f"{category.root / 'test'}: no test images to evaluate on")
    category.check_masks(skip_bad, report)
    labels, scores, maps, masks, ms, kinds = [], [], [], [], [], []
    with torch.inference_mode(), Progress("evaluate", len(category.test), enabled=progress) as bar:
        warm = True
        for loaded in iter_loaded(category.test, skip_bad, report):
            x = torch.from_numpy(pre(loaded.image)).unsqueeze(0).contiguous(memory_format=torch.channels_last)
            if warm:
                model(x)
                warm = False
            t0 = time.perf_counter()
            result = model(x)
            ms.append((time.perf_counter() - t0) * 1000.0)
            labels.append(loaded.sample.label)
            kinds.append(loaded.sample.defect_type)
            scores.append(float(result.scores[0]))
            maps.append(result.maps[0].numpy().astype(np.float32))
            if loaded.mask is not None:
                masks.append(pre.mask(loaded.mask))
            else:
                masks.append(np.zeros(pre.input_size, dtype=bool))
            bar.update()
    if not labels:
        raise DatasetError(f"{category.root / 'test'}: no readable test images")
    return ScoredSet(
        labels=np.asarray(labels),
        scores=np.asarray(scores),
        maps=np.stack(maps),
        masks=np.stack(masks) if category.has_masks else None,
        ms=np.asarray(ms),
        kinds=kinds,
    )


def metrics_of(scored: ScoredSet, threshold: float | None = None) -> Evaluation:
    both = 0 < scored.labels.sum() < scored.labels.size
    has_regions = scored.masks is not None and bool(scored.masks.any())
    return Evaluation(
        image_auroc=auroc(scored.labels, scored.scores) if both else None,
        pixel_auroc=pixel_auroc(scored.masks, scored.maps) if has_regions else None,  # type: ignore[arg-type]
        pro=pro_score(scored.masks, scored.maps) if has_regions else None,  # type: ignore[arg-type]
        f1=best_f1(scored.labels, scored.scores)[0] if scored.labels.sum() > 0 else None,
        n_images=int(scored.labels.size),
        ms_per_image=float(scored.ms.mean()),
        fpr_at_threshold=_rate(scored.scores[scored.labels == 0], threshold),
        tpr_at_threshold=_rate(scored.scores[scored.labels == 1], threshold),
    )


def _rate(scores: np.ndarray, threshold: float | None) -> float | None:
    """Share of `scores` above `threshold` (rejected); None without a threshold or without frames."""
    if threshold is None or scores.size == 0:
        return None
    return float((scores > threshold).mean())


def evaluate(
    bundle: Bundle, category: MVTecCategory, skip_bad: bool = False, progress: bool = False
) -> tuple[Evaluation, SkipReport]:
    report = SkipReport()
    scored = score_category(bundle.model, bundle.preprocessing, category, skip_bad, report, progress)
    return metrics_of(scored, bundle.threshold), report
