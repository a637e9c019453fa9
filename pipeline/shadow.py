"""A candidate bundle's verdict on a frame it scored in shadow: stored beside the live verdict, never published."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from linewatch_plc.wire import VERDICT_NAMES
from pipeline.bundles import BundleLookup


@dataclass(frozen=True)
class ShadowVerdict:
    bundle: str  # the shadow bundle's content hash
    score: float
    verdict: str  # pass | reject, at the shadow bundle's own threshold

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "score": self.score, "verdict": self.verdict}

    @classmethod
    def from_json(cls, data: Any) -> ShadowVerdict | None:
        if not isinstance(data, dict):
            return None
        return cls(str(data["bundle"]), float(data["score"]), str(data["verdict"]))


def shadow_of_record(rec: np.void, bundles: BundleLookup) -> ShadowVerdict | None:
    """The shadow verdict a decided record carries; None when the frame was not scored in shadow."""
    if int(rec["shadow"]) <= 0:
        return None
    slot = int(rec["shadow"]) - 1
    return ShadowVerdict(bundles.hash(slot), float(rec["shadow_score"]), VERDICT_NAMES[int(rec["shadow_verdict"])])
