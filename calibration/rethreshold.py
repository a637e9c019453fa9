"""Re-choose a calibrated bundle's threshold on normal frames the line passed, without refitting the model.

The frames are RGB uint8 at the model's input size, as the runtime archived them (after resize and crop),
each with the hash of the bundle that passed it. They are normalised and scored with the bundle's own model
on `fit.device`, like `calibrate`'s held-out frames, and `choose_threshold` takes the FPR-bounded order
statistic (`calibration.threshold`). A frame of another size was archived for a bundle with another input
size: it is skipped and counted, never resized (resizing it again would not give the frame the model saw).

What the bound covers. The frames are parts that the threshold in force t0 passed; normal parts that t0
rejected are missing from them. The bound is on P(s > t | s <= t0), the false-reject rate among such
parts, and the line's rate is

    P(s > t) = P(s > t | s <= t0) * (1 - FPR(t0)) + P(s > t, s > t0) <= bound + FPR(t0),

so the true rate can exceed the bound by up to t0's own false-reject rate, which matters when t < t0. The
line's reject rate over the same period estimates FPR(t0) from above: with a share d of defective parts it is
FPR(t0) * (1 - d) + recall * d, at least FPR(t0) whenever t0 catches defects more often than it rejects good
parts.

The archive keeps JPEG frames (quality 95). Their scores differ from those of the frames as captured, more on
fine, high-contrast texture, where the compression noise mostly raises them (measured in
tests/pipeline/test_recalibrate.py and docs/calibration.md): the bound is on the archived frames' scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import torch

from calibration.calibrate import kept_scores, normalization, score_images
from calibration.settings import OfflineConfig
from calibration.threshold import (
    InsufficientCalibrationData,
    ThresholdChoice,
    bounded_order,
    choose_threshold,
    min_calibration_frames,
    proportion_interval,
)
from edge.backends import OnDevice
from edge.bundle import Bundle
from edge.manifest import BundleManifest, ThresholdRecord


class LineFrame(NamedTuple):
    """A frame the line passed: RGB uint8 (h, w, 3) as the model saw it, and the hash of the bundle that did."""

    image: np.ndarray
    bundle: str


@dataclass(frozen=True)
class ScoredFrames:
    scores: np.ndarray  # (n,) of the frames at the model's input size, in the order they came
    skipped: int  # frames of another size
    by_bundle: dict[str, int]  # frames scored, by the hash of the bundle that decided them


@dataclass(frozen=True)
class ReviewedRecall:
    """How many of the defects people confirmed on the line the new threshold rejects, with a 95 % interval."""

    scores: np.ndarray  # (n,) of the confirmed defects' archived frames
    caught: int  # of them with score > the new threshold
    low: float
    high: float

    @property
    def n(self) -> int:
        return int(self.scores.size)

    @property
    def recall(self) -> float:
        return self.caught / self.n

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "caught": self.caught, "recall": self.recall, "interval_95": [self.low, self.high]}


def score_line_frames(bundle: Bundle, frames: Iterable[LineFrame], config: OfflineConfig) -> ScoredFrames:
    """Scores of `frames` with `bundle`'s model on fit.device; frames of another size are skipped and counted.
    ValueError for a frame that is not RGB uint8."""
    size = bundle.preprocessing.input_size
    by_bundle: dict[str, int] = {}
    skipped = 0

    def at_input_size() -> Iterator[np.ndarray]:
        nonlocal skipped
        for frame in frames:
            image = frame.image
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"frame: expected an (h, w, 3) uint8 RGB array, got {image.shape} {image.dtype}")
            if image.shape[:2] != size:
                skipped += 1
                continue
            by_bundle[frame.bundle] = by_bundle.get(frame.bundle, 0) + 1
            yield image

    # Scored on fit.device: the threshold is chosen in the arithmetic of the device the line runs on.
    device = config.fit.device
    model = OnDevice(bundle.model.to(device), device)
    try:
        scores = np.asarray(
            [s for s, _ in score_images(model, bundle.preprocessing, at_input_size(), config.fit.batch_size)],
            dtype=np.float64,
        )
    finally:
        bundle.model.cpu()
    return ScoredFrames(scores, skipped, dict(sorted(by_bundle.items())))


def reviewed_recall(
    bundle: Bundle, defects: Iterable[LineFrame], threshold: float, config: OfflineConfig
) -> ReviewedRecall | None:
    """The recall at `threshold` on archived frames of defects people confirmed; None when there are none."""
    scores = score_line_frames(bundle, defects, config).scores
    if scores.size == 0:
        return None
    caught = int((scores > threshold).sum())
    low, high = proportion_interval(caught, int(scores.size))
    return ReviewedRecall(scores, caught, low, high)


@dataclass(frozen=True)
class Rethreshold:
    """The new manifest (the bundle's own with the new threshold), the choice and the scores it came from."""

    manifest: BundleManifest
    choice: ThresholdChoice
    scores: np.ndarray  # (n,) of the frames used, in the order they came
    previous_threshold: float
    skipped: int  # frames of another size than the model's input
    by_bundle: dict[str, int]  # frames used, by the hash of the bundle that passed them


def rethreshold(
    bundle: Bundle, frames: Iterable[LineFrame], config: OfflineConfig, source: dict[str, Any]
) -> Rethreshold:
    """Score `frames` with `bundle`'s model and choose its threshold anew at config.calibration's target and
    confidence. `source` (where the frames came from) opens the manifest's `calibration` record.

    ValueError for a bundle without a threshold or a frame that is not RGB uint8; InsufficientCalibrationData,
    naming the counts, when the frames cannot meet the bound and config.calibration.allow_weak_bound is off.
    """
    if bundle.manifest.threshold is None:
        raise ValueError(
            f"{bundle.path or 'bundle'}: has no threshold to re-choose (make one with linewatch calibrate)"
        )
    previous = bundle.manifest.threshold.value
    cc, device = config.calibration, config.fit.device
    size = bundle.preprocessing.input_size
    scored = score_line_frames(bundle, frames, config)
    scores, skipped = scored.scores, scored.skipped
    by_bundle = scored.by_bundle
    n = int(scores.size)
    if n == 0 or (not cc.allow_weak_bound and bounded_order(n, cc.target_fpr, cc.confidence) is None):
        needed = min_calibration_frames(cc.target_fpr, cc.confidence)
        weak = "" if cc.allow_weak_bound else ", or pass --allow-weak-bound"
        raise InsufficientCalibrationData(
            f"{n} passed frames at the model's input size {size[0]}x{size[1]} ({skipped} of another size skipped): "
            f"bounding the false-reject rate at {cc.target_fpr:g} with {cc.confidence:.0%} confidence needs at "
            f"least {needed} (take a longer period, a higher target or lower confidence{weak})"
        )
    choice = choose_threshold(scores, cc.target_fpr, cc.confidence, cc.allow_weak_bound)
    backbone = bundle.model.backbone
    arithmetic = None if backbone is None else backbone.arithmetic(torch.device(device))
    manifest = replace(
        bundle.manifest,
        threshold=ThresholdRecord(choice.threshold, backbone_arithmetic=arithmetic, choice=choice.to_dict()),
        normalization=normalization(scores, choice.threshold),
        calibration={
            **source,
            "config": {
                "target_fpr": cc.target_fpr,
                "confidence": cc.confidence,
                "allow_weak_bound": cc.allow_weak_bound,
            },
            "frames": n,
            "holdout_scores": kept_scores(scores),
            "skipped": skipped,
            "bundle_of_frames": by_bundle,
            "previous_threshold": previous,
            "previous_bundle": bundle.hash,
            "rethresholded": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return Rethreshold(manifest, choice, scores, previous, skipped, by_bundle)
