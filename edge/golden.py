"""Golden frames: a few frames a bundle carries with the verdicts and scores it gave them at calibration.

`linewatch run` pushes them through its pipeline at start (and on demand, and every `golden.every_h`
hours); a verdict other than the recorded one, or a score off by more than the stated tolerance, means
the box no longer scores as the calibration did. They are clear cases, far from the threshold: the
lowest-scoring held-out good frames and the highest-scoring synthetic defects. Frames are kept as the
model saw them (after resize and crop, uint8 RGB), in the bundle's tensors under `golden.frames`, so
the content hash covers them; the manifest's `golden` record holds their labels and scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TENSOR = "golden.frames"
GOOD, DEFECT = 0, 1


def clear_case(label: int, score: float, threshold: float, margin: float) -> bool:
    """Whether a frame is decided its label's way with room to spare: a good one at most (1 - margin) x the
    threshold, a defect at least (1 + margin) x it."""
    return score <= (1 - margin) * threshold if label == GOOD else score >= (1 + margin) * threshold


@dataclass(frozen=True)
class GoldenSet:
    frames: np.ndarray  # (N, H, W, 3) uint8 at the model's input size
    labels: tuple[int, ...]  # GOOD or DEFECT: the verdict expected (pass or reject)
    scores: tuple[float, ...]  # the scores at calibration
    captions: tuple[str, ...]  # what each frame is ("held-out good", "synthetic scratch")

    def __len__(self) -> int:
        return len(self.labels)

    def record(self) -> dict[str, Any]:
        """The manifest's `golden` entry."""
        return {"labels": list(self.labels), "scores": list(self.scores), "captions": list(self.captions)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {TENSOR: torch.from_numpy(np.ascontiguousarray(self.frames))}

    @classmethod
    def of(cls, record: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> GoldenSet | None:
        """The set a bundle holds; None for a bundle without one (older, or written by `fit`)."""
        if not record or TENSOR not in tensors:
            return None
        frames = tensors[TENSOR].numpy()
        labels = tuple(int(v) for v in record["labels"])
        if frames.ndim != 4 or frames.shape[0] != len(labels) or frames.dtype != np.uint8:
            raise ValueError(
                f"golden frames: expected ({len(labels)}, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
            )
        return cls(frames, labels, tuple(float(v) for v in record["scores"]), tuple(record.get("captions", ())))

    def clear_at(self, threshold: float, margin: float = 0.1) -> GoldenSet | None:
        """The frames still clear cases at another threshold (a re-chosen one); None when none is."""
        keep = [
            i
            for i, (label, score) in enumerate(zip(self.labels, self.scores, strict=True))
            if clear_case(label, score, threshold, margin)
        ]
        if not keep:
            return None
        captions = tuple(self.captions[i] if i < len(self.captions) else "golden" for i in keep)
        labels, scores = tuple(self.labels[i] for i in keep), tuple(self.scores[i] for i in keep)
        return GoldenSet(self.frames[keep], labels, scores, captions)

    @classmethod
    def choose(
        cls, good: list[tuple[float, str, np.ndarray]], defects: list[tuple[float, str, np.ndarray]], threshold: float,
        per_kind: int = 4, margin: float = 0.1,
    ) -> GoldenSet | None:  # fmt: skip
        """Up to `per_kind` good frames scoring at most (1 - margin) x threshold, lowest first, and defects
        scoring at least (1 + margin) x threshold, highest first: clear cases, which a box that scores as the
        calibration did decides the same way. None when no frame qualifies."""
        clear_good = sorted((g for g in good if clear_case(GOOD, g[0], threshold, margin)), key=lambda g: g[0])
        clear_bad = sorted((d for d in defects if clear_case(DEFECT, d[0], threshold, margin)), key=lambda d: -d[0])
        clear_good, clear_bad = clear_good[:per_kind], clear_bad[:per_kind]
        chosen = [(GOOD, g) for g in clear_good] + [(DEFECT, d) for d in clear_bad]
        if not chosen:
            return None
        return cls(
            frames=np.stack([np.ascontiguousarray(item[2], dtype=np.uint8) for _, item in chosen]),
            labels=tuple(label for label, _ in chosen),
            scores=tuple(float(item[0]) for _, item in chosen),
            captions=tuple(item[1] for _, item in chosen),
        )
