"""What the operator page is given when it starts: where the store and images are, and what is deciding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.manifest import BundleManifest

REPORT_FILE = "report.html"  # what `linewatch calibrate` writes next to the bundle


@dataclass(frozen=True)
class BundleSummary:
    """The bundle in use, as the model page shows it."""

    path: str
    hash: str
    model: str
    backbone: str
    created: str
    threshold: float
    choice: dict[str, Any] = field(default_factory=dict)  # calibration.threshold.ThresholdChoice.to_dict()
    report: str | None = None  # calibration report.html, when it is beside the bundle

    @property
    def target_fpr(self) -> float | None:
        value = self.choice.get("target_fpr")
        return float(value) if value is not None else None

    @property
    def confidence(self) -> float | None:
        value = self.choice.get("confidence")
        return float(value) if value is not None else None


@dataclass(frozen=True)
class StationSettings:
    store_url: str
    archive: str  # image archive folder
    data: str  # data folder: the session key lives here
    host: str = "127.0.0.1"
    port: int = 8080
    feed_address: str | None = None  # the recorder's live feed; None: the store alone
    heartbeat_address: str | None = None  # the publisher, for its heartbeat topic
    window_min: float = 5.0
    bundle: BundleSummary | None = None
    cameras: tuple[str, ...] = ()
    run: str | None = None
    camera_bundles: dict[str, BundleSummary] = field(default_factory=dict)  # each camera's bundle at the run's start
    control_address: str | None = None  # the run's changeover endpoint; None: no switching from the page
    recipes: tuple[str, ...] = ()  # pipeline.recipes' names, offered on the model page
    store_line: str = ""  # store.line: the line whose rows the page shows


def bundle_summary(path: Path, manifest: BundleManifest, content_hash: str) -> BundleSummary:
    """What the model page shows of a bundle; its report is `report.html` beside it when calibrate put it there."""
    report = path.resolve().parent / REPORT_FILE
    threshold = manifest.threshold
    return BundleSummary(
        path=str(path),
        hash=content_hash,
        model=manifest.model,
        backbone=manifest.feature_extractor,
        created=manifest.created,
        threshold=threshold.value if threshold is not None else float("nan"),
        choice=dict(threshold.choice) if threshold is not None else {},
        report=str(report) if report.is_file() else None,
    )
