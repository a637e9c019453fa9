"""The bundle manifest: what scoring needs to rebuild a fitted model, as typed, versioned records.

It holds the model and its parameters, the backbone and the SHA-256 of its weights, the
preprocessing, the reject threshold and how it was chosen, the fit settings, the dataset fingerprint,
the versions it was made with and when. Nothing about where the bundle will run (addresses, ports,
sources) belongs here. Stored as JSON inside the bundle file (`edge.bundle`).

Version 2 is this layout. Version 1 manifests (the first bundles) are read and converted: their
flat threshold record splits into value and choice, and their copy of the whole config keeps only
the model and fit settings.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edge.preprocessing import Preprocessing
from edge.settings import SettingsError, record_from_dict

MANIFEST_VERSION = 2


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the field and what was expected."""


@dataclass(frozen=True)
class BackboneRecord:
    """The feature extractor a model was fitted with; loading checks the weights' hash."""

    name: str
    layers: tuple[str, ...]
    border_pad: int
    border_mode: str
    precision: str
    weights_sha256: str
    weights_path: str | None = None  # where the weights were, when given explicitly at fit time


@dataclass(frozen=True)
class ThresholdRecord:
    """Reject when score > value; `choice` says how it was chosen (`calibration.threshold.ThresholdChoice`)."""

    value: float
    reject_if: str = "score > value"
    backbone_arithmetic: str | None = None  # what the held-out frames were scored in (float32, bfloat16)
    choice: dict[str, Any] = field(default_factory=dict)

    def false_reject_bound(self) -> float | None:
        """The false-reject rate this threshold stays under with the calibration's confidence: the target when it
        was met, the weaker bound reached when it was not; None for a threshold set without calibration."""
        known = [float(self.choice[k]) for k in ("target_fpr", "fpr_bound") if self.choice.get(k) is not None]
        return max(known) if known else None


@dataclass(frozen=True)
class DatasetRecord:
    n_images: int
    fingerprint: str


@dataclass(frozen=True)
class BundleManifest:
    model: str
    model_params: dict[str, Any]
    backbone: BackboneRecord | None  # None: the model carries all its networks (EfficientAD)
    preprocessing: Preprocessing
    dataset: DatasetRecord
    fit: dict[str, Any]  # the model and fit settings, the fit's duration, model-specific training facts
    versions: dict[str, str]
    created: str  # ISO 8601, UTC
    threshold: ThresholdRecord | None = None  # None until `calibrate` chooses one
    normalization: dict[str, float] | None = None  # maps scores so the threshold sits at 1.0
    calibration: dict[str, Any] | None = None  # calibration settings, held-out set and recall estimates
    golden: dict[str, Any] | None = None  # the golden frames' labels and scores (edge.golden); frames in the tensors

    def holdout_scores(self) -> list[float] | None:
        """The good frames' scores the threshold was chosen from (the drift watch's reference); None for a
        bundle calibrated before they were kept."""
        scores = (self.calibration or {}).get("holdout_scores")
        return None if scores is None else [float(s) for s in scores]

    format_version: int = MANIFEST_VERSION

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.input_size

    @property
    def feature_extractor(self) -> str:
        """What computes the features, for labels and reports: the backbone, or EfficientAD's PDN size."""
        if self.backbone is not None:
            return self.backbone.name
        return f"pdn_{self.model_params.get('size', 'unknown')}"

    def with_weights_path(self, path: str) -> BundleManifest:
        assert self.backbone is not None
        return replace(self, backbone=replace(self.backbone, weights_path=path))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["preprocessing"] = self.preprocessing.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any) -> BundleManifest:
        """Parse a stored manifest (version 1 or 2); ManifestError names what is missing or malformed."""
        if not isinstance(data, dict):
            raise ManifestError(f"manifest: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ManifestError(f"manifest format_version = {version!r}: expected a whole number from 1")
        if version > MANIFEST_VERSION:
            raise ManifestError(
                f"format_version {version!r} is not supported by this linewatch (supports <= {MANIFEST_VERSION}); "
                "upgrade linewatch"
            )
        if version == 1:
            data = _from_version_1(data)
        threshold = data.get("threshold")
        value = threshold.get("value") if isinstance(threshold, dict) else 0.0
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ManifestError(f"manifest threshold.value = {value!r}: expected a finite number")
        try:
            return record_from_dict(cls, data)
        except SettingsError as exc:
            raise ManifestError(f"manifest {exc}") from None


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest in version 2's layout; defaults for fields the first bundles did not record."""
    out = {k: v for k, v in data.items() if k not in ("format", "format_version", "input_size")}
    backbone = data.get("backbone")
    if isinstance(backbone, dict):
        # Recorded later in version 1: bundles without them mirrored the border and ran float32.
        out["backbone"] = {"border_pad": 0, "border_mode": "reflect", "precision": "float32", **backbone}
    threshold = data.get("threshold")
    if isinstance(threshold, dict):
        known = ("value", "reject_if", "backbone_arithmetic")
        out["threshold"] = {k: threshold[k] for k in known if k in threshold}
        out["threshold"]["choice"] = {k: v for k, v in threshold.items() if k not in known}
    fit = data.get("fit")
    if isinstance(fit, dict) and isinstance(fit.get("config"), dict):
        config = fit["config"]  # the whole application config: keep what describes the fit
        out["fit"] = {**fit, "config": {k: config[k] for k in ("model", "fit") if k in config}}
    return out
