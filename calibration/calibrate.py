"""`linewatch calibrate`: fit on part of the normal frames, bound the false-reject rate with the rest.

1. Split the normal frames (seeded) into a fit set and a held-out calibration set; fit on the first.
2. Score the held-out frames and choose the FPR-bounded threshold (`calibration.threshold`).
3. Estimate recall without real defects: draw synthetic defects on held-out frames and count how
   many score above the threshold, per kind, with a Clopper-Pearson interval.
4. When labelled test frames exist (MVTec `test/`), measure real recall and FPR at the threshold;
   these are reported apart from the normal-only estimates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from calibration.datasets import MVTecCategory, Sample, SkipReport, fingerprint, iter_loaded
from calibration.evaluate import ScoredSet, score_category
from calibration.fit import FitResult, fit
from calibration.metrics import auroc, weakness
from calibration.progress import Progress
from calibration.settings import OfflineConfig
from calibration.synthetic import DEFECT_KINDS, add_defect
from calibration.threshold import ThresholdChoice, choose_threshold, proportion_interval, require_enough_frames
from edge.backends import OnDevice
from edge.golden import GoldenSet
from edge.manifest import BundleManifest, ThresholdRecord
from edge.preprocessing import Preprocessing, to_rgb8
from edge.scoring import Scorer
from edge.settings import to_dict

EXAMPLES_PER_GROUP = 3


@dataclass(frozen=True)
class Rate:
    """`hits` of `n` frames (detected defects or rejected good parts) with a 95 % interval."""

    label: str
    hits: int
    n: int

    @property
    def value(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return proportion_interval(self.hits, self.n) if self.n else (float("nan"), float("nan"))

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"label": self.label, "hits": self.hits, "n": self.n, "rate": self.value, "low": low, "high": high}


@dataclass(frozen=True)
class Example:
    """A frame to show in the report: RGB uint8 at the model's input size, its score and map."""

    group: str
    caption: str
    score: float
    image: np.ndarray
    anomaly_map: np.ndarray | None = None


@dataclass(frozen=True)
class LabelledCheck:
    """Real recall and FPR on labelled test frames (MVTec `test/`) at the chosen threshold."""

    scored: ScoredSet
    fpr: Rate
    recall: Rate
    recall_by_kind: list[Rate]
    image_auroc: float | None


@dataclass
class Calibration:
    fit: FitResult
    choice: ThresholdChoice
    manifest: BundleManifest
    holdout_scores: np.ndarray
    synthetic_scores: dict[str, np.ndarray]
    synthetic_recall: list[Rate]
    synthetic_auroc: float | None  # held-out good frames against the same frames with synthetic defects
    labelled: LabelledCheck | None
    examples: list[Example] = field(default_factory=list)
    skipped: SkipReport = field(default_factory=SkipReport)
    golden: GoldenSet | None = None  # clear good frames and defects the run's self-test pushes through the line

    def weakness(self) -> str | None:
        """One line when the model separates defects from good frames poorly here (see metrics.weakness)."""
        figures = {"image AUROC on synthetic defects": self.synthetic_auroc}
        if self.labelled is not None:
            figures["image AUROC on the test set"] = self.labelled.image_auroc
        return weakness(self.manifest.model, figures)


def separation(good: np.ndarray, defects: dict[str, np.ndarray]) -> float | None:
    """Image AUROC of good frames' scores against defective ones' (None without both)."""
    bad = np.concatenate([*defects.values(), np.zeros(0)])
    if not good.size or not bad.size:
        return None
    return auroc(np.r_[np.zeros(good.size), np.ones(bad.size)], np.r_[good, bad])


def split_holdout(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(fit, held-out): a seeded random split, independent of the order the files were listed in."""
    ordered = sorted(samples, key=lambda s: str(s.path))
    n_hold = int(round(len(ordered) * fraction))
    if len(ordered) - n_hold < 2 or n_hold < 1:
        raise ValueError(
            f"{len(ordered)} normal frames cannot be split into a fit set (>= 2) and a held-out set (>= 1) "
            f"with holdout_fraction {fraction}"
        )
    order = np.random.default_rng(seed).permutation(len(ordered))
    hold = sorted(order[:n_hold].tolist())
    fit_idx = sorted(order[n_hold:].tolist())
    return [ordered[i] for i in fit_idx], [ordered[i] for i in hold]


def score_images(
    model: Scorer, pre: Preprocessing, images: Iterable[np.ndarray], batch_size: int
) -> Iterator[tuple[float, np.ndarray]]:
    """(score, RGB uint8 image) per image; images are RGB uint8 already at the model's input size."""
    pending: list[np.ndarray] = []

    def flush() -> Iterator[tuple[float, np.ndarray]]:
        x = pre.normalize_batch(torch.from_numpy(np.stack(pending)))
        with torch.inference_mode():
            scores = model(x).scores
        yield from zip(scores.tolist(), pending, strict=True)
        pending.clear()

    for image in images:
        pending.append(image)
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def anomaly_maps(model: Scorer, pre: Preprocessing, images: list[np.ndarray]) -> list[np.ndarray]:
    if not images:
        return []
    x = pre.normalize_batch(torch.from_numpy(np.stack(images)))
    with torch.inference_mode():
        return list(model(x).maps.numpy())


class _Extremes:
    """Keeps the frames with the highest and lowest scores seen (for the report's examples)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.items: list[tuple[float, str, np.ndarray]] = []

    def add(self, score: float, caption: str, image: np.ndarray) -> None:
        self.items.append((score, caption, image))
        self.items.sort(key=lambda t: t[0])
        if len(self.items) > 2 * self.k:
            del self.items[self.k]  # drop the middle one: keep k lowest and k highest

    def highest(self) -> list[tuple[float, str, np.ndarray]]:
        return self.items[::-1][: self.k]

    def lowest(self) -> list[tuple[float, str, np.ndarray]]:
        return self.items[: min(self.k, max(0, len(self.items) - self.k))]


def calibrate(
    config: OfflineConfig,
    samples: list[Sample],
    test_category: MVTecCategory | None = None,
    skip_bad: bool = False,
    progress: bool = False,
) -> Calibration:
    cc = config.calibration
    fit_set, holdout = split_holdout(samples, cc.holdout_fraction, cc.seed)
    if not cc.allow_weak_bound:
        require_enough_frames(len(holdout), cc.target_fpr, cc.confidence)  # before the costly fit
    result = fit(config, fit_set, skip_bad=skip_bad, progress=progress)
    pre, report = result.preprocessing, result.skipped
    # Scored on fit.device: the threshold is chosen in the arithmetic of the device the line runs on.
    model = OnDevice(result.model.to(config.fit.device), config.fit.device)
    batch = config.fit.batch_size

    # Held-out frames for the synthetic defects are picked up front so each image is read only once.
    rng = np.random.default_rng([cc.seed, 1])
    per_kind = min(cc.synthetic_per_kind, len(holdout))
    picks = {kind: rng.choice(len(holdout), per_kind, replace=False) for kind in DEFECT_KINDS} if per_kind else {}
    wanted = {int(i) for idx in picks.values() for i in idx}
    kept: dict[int, np.ndarray] = {}
    worst_normals = _Extremes(EXAMPLES_PER_GROUP)

    position = {s.path: i for i, s in enumerate(holdout)}

    def holdout_images() -> Iterator[np.ndarray]:
        with Progress("held-out", len(holdout), enabled=progress) as bar:
            for loaded in iter_loaded(holdout, skip_bad, report):
                rgb = pre.geometry(to_rgb8(loaded.image))
                index = position[loaded.sample.path]
                if index in wanted:
                    kept[index] = rgb
                yield rgb
                bar.update()

    scores: list[float] = []
    bad = len(report.skipped)
    for score, rgb in score_images(model, pre, holdout_images(), batch):
        scores.append(score)
        worst_normals.add(score, "held-out good", rgb)
    bad_paths = {p for p, _ in report.skipped[bad:]}
    used_holdout = [s for s in holdout if s.path not in bad_paths]
    holdout_scores = np.asarray(scores)
    choice = choose_threshold(holdout_scores, cc.target_fpr, cc.confidence, cc.allow_weak_bound)
    t = choice.threshold

    synthetic_scores: dict[str, np.ndarray] = {}
    defects = _Extremes(EXAMPLES_PER_GROUP)
    with Progress("synthetic defects", per_kind * len(picks), enabled=progress) as bar:
        for kind, idx in picks.items():
            frames = [kept[int(i)] for i in idx if int(i) in kept]

            def with_defect(frames: list[np.ndarray] = frames, kind: str = kind) -> Iterator[np.ndarray]:
                for rgb in frames:
                    yield add_defect(rgb, kind, rng)[0]
                    bar.update()

            got = []
            for score, image in score_images(model, pre, with_defect(), batch):
                got.append(score)
                defects.add(score, f"synthetic {kind}", image)
            synthetic_scores[kind] = np.asarray(got)
    synthetic_recall = [Rate(kind, int((s > t).sum()), int(s.size)) for kind, s in synthetic_scores.items()]
    synthetic_auroc = separation(holdout_scores, synthetic_scores)

    labelled = None
    if test_category is not None and test_category.test:
        labelled = check_labelled(model, result, test_category, t, skip_bad, report, progress)

    examples = _examples(model, pre, worst_normals, defects, t)
    golden = GoldenSet.choose(worst_normals.lowest(), defects.highest(), t)
    result.model.cpu()  # what the bundle is saved from
    arithmetic = None
    if result.model.backbone is not None:  # what the held-out frames were scored in (see Bundle.arithmetic_mismatch)
        arithmetic = result.model.backbone.arithmetic(torch.device(config.fit.device))
    manifest = replace(
        result.manifest,
        threshold=ThresholdRecord(t, backbone_arithmetic=arithmetic, choice=choice.to_dict()),
        normalization=normalization(holdout_scores, t),
        golden=None if golden is None else golden.record(),
        calibration={
            "config": to_dict(cc),
            "holdout": {"n_images": len(used_holdout), "fingerprint": fingerprint(used_holdout)},
            "holdout_scores": kept_scores(holdout_scores),
            "synthetic_recall": [r.to_dict() for r in synthetic_recall],
            "synthetic_image_auroc": synthetic_auroc,
            "labelled": None
            if labelled is None
            else {
                "fpr": labelled.fpr.to_dict(),
                "recall": labelled.recall.to_dict(),
                "recall_by_kind": [r.to_dict() for r in labelled.recall_by_kind],
                "image_auroc": labelled.image_auroc,
            },
        },
    )
    return Calibration(
        fit=result,
        choice=choice,
        manifest=manifest,
        holdout_scores=holdout_scores,
        synthetic_scores=synthetic_scores,
        synthetic_recall=synthetic_recall,
        synthetic_auroc=synthetic_auroc,
        labelled=labelled,
        examples=examples,
        skipped=report,
        golden=golden,
    )


def kept_scores(scores: np.ndarray) -> list[float]:
    """Scores as the bundle keeps them (JSON floats, 7 significant digits: float32's own)."""
    return [float(f"{s:.7g}") for s in np.asarray(scores, dtype=np.float64)]


def normalization(holdout_scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Score scale shared by dashboards across models: 0 = median good frame, 1 = the threshold."""
    center = float(np.median(holdout_scores))
    scale = float(threshold - center) if threshold > center else 1.0
    return {"method": "holdout_median_to_threshold", "center": center, "scale": scale}


def check_labelled(
    scorer: Scorer,
    result: FitResult,
    category: MVTecCategory,
    threshold: float,
    skip_bad: bool,
    report: SkipReport,
    progress: bool,
) -> LabelledCheck:
    scored = score_category(scorer, result.preprocessing, category, skip_bad, report, progress)
    kinds = scored.kinds
    rejected = scored.scores > threshold
    good = scored.labels == 0
    by_kind = [
        Rate(kind, int(rejected[[k == kind for k in kinds]].sum()), int(sum(k == kind for k in kinds)))
        for kind in sorted(set(kinds) - {"good"})
    ]
    both = 0 < scored.labels.sum() < scored.labels.size
    return LabelledCheck(
        scored=scored,
        fpr=Rate("good", int(rejected[good].sum()), int(good.sum())),
        recall=Rate("all defects", int(rejected[~good].sum()), int((~good).sum())),
        recall_by_kind=by_kind,
        image_auroc=auroc(scored.labels, scored.scores) if both else None,
    )


def _examples(
    model: Scorer, pre: Preprocessing, normals: _Extremes, defects: _Extremes, threshold: float
) -> list[Example]:
    groups = [
        ("worst normals", normals.highest()),
        ("best-detected defects", defects.highest()),
        ("hardest defects", defects.lowest()),
    ]
    flat = [(group, s, c, im) for group, items in groups for s, c, im in items]
    maps = anomaly_maps(model, pre, [im for *_, im in flat])
    out = []
    for (group, score, caption, image), amap in zip(flat, maps, strict=True):
        verdict = "REJECT" if score > threshold else "pass"
        out.append(Example(group, f"{caption}: {score:.2f} {verdict}", score, image, amap))
    return out
