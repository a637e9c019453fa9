"""The model bundle: one file with the fitted tensors, a JSON manifest and a content hash.

File layout (a `torch.save` of plain containers, read back with `weights_only=True`, never a pickle of
code objects):
    {"format": "linewatch-bundle", "manifest": <JSON text>, "hash": <sha256 hex>, "tensors": {name: Tensor}}
The manifest is a `BundleManifest` (edge.manifest) written as JSON.
The hash covers the manifest text and every tensor's name, dtype, shape and bytes, so any edit to the
file, or a bundle assembled from mismatched parts, is refused on load.
The backbone's weights are not copied in; the manifest records their SHA-256 and loading checks it,
so a bundle never silently runs with other weights than it was fitted with. EfficientAD has no
backbone at run time: its teacher, student and autoencoder are all among the bundle's tensors.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from edge.backbones import load_backbone
from edge.golden import TENSOR as GOLDEN_TENSOR
from edge.golden import GoldenSet
from edge.manifest import BackboneRecord, BundleManifest, DatasetRecord, ManifestError
from edge.models import AnomalyModel, get_model_class
from edge.preprocessing import Preprocessing

FORMAT = "linewatch-bundle"


class BundleError(ValueError):
    """A bundle file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Bundle:
    model: AnomalyModel
    preprocessing: Preprocessing
    manifest: BundleManifest
    hash: str
    path: Path | None = None
    golden: GoldenSet | None = None

    @property
    def threshold(self) -> float | None:
        """Reject when score > threshold; None for a bundle written by `fit` (not calibrated)."""
        t = self.manifest.threshold
        return None if t is None else t.value

    def arithmetic_mismatch(self, device: str) -> str | None:
        """A one-line warning when the backbone runs in another arithmetic on `device` than the one the
        threshold was calibrated in (bf16 moves image scores by up to ~3 %), else None."""
        t = self.manifest.threshold
        calibrated = None if t is None else t.backbone_arithmetic
        backbone = self.model.backbone
        if calibrated is None or backbone is None:
            return None
        here = backbone.arithmetic(torch.device(device))
        if here == calibrated:
            return None
        return (
            f"{self.path or 'bundle'}: threshold was calibrated with the backbone in {calibrated}, {device} runs it "
            f"in {here}: image scores differ slightly, so the false-reject bound is approximate; calibrate on this "
            "kind of box"
        )


def versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "linewatch": version("linewatch"),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "python": platform.python_version(),
    }


def content_hash(manifest_text: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(manifest_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_manifest(
    model: AnomalyModel,
    preprocessing: Preprocessing,
    weights_sha256: str,
    dataset: DatasetRecord,
    fit: dict[str, Any],
) -> BundleManifest:
    """The manifest of a freshly fitted model (no threshold yet)."""
    bb = model.backbone
    backbone = None
    if bb is not None:  # None for a model that carries all its weights (EfficientAD): nothing outside to check
        backbone = BackboneRecord(
            bb.name, tuple(bb.layers), bb.border_pad, bb.border_mode, bb.precision, weights_sha256
        )
    return BundleManifest(
        model=model.name,
        model_params=model.params(),
        backbone=backbone,
        preprocessing=preprocessing,
        dataset=dataset,
        fit=fit,
        versions=versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def save_bundle(
    path: str | Path, model: AnomalyModel, manifest: BundleManifest, golden: GoldenSet | None = None
) -> str:
    """Write the bundle atomically (temp file + rename) and return its content hash; `golden`: the frames of the
    run's self-test, whose labels and scores `manifest.golden` records."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.tensors().items()}
    if golden is not None:
        tensors |= golden.tensors()
    text = json.dumps(manifest.to_dict(), sort_keys=True)
    digest = content_hash(text, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "manifest": text, "hash": digest, "tensors": tensors}, tmp)
    tmp.replace(path)
    return digest


def read_bundle_file(path: str | Path) -> tuple[BundleManifest, dict[str, torch.Tensor], str]:
    """Read and verify a bundle file: (manifest, tensors, hash). Raises BundleError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: bundle file does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types, some with a page of advice
        raise BundleError(f"{path}: not a linewatch bundle (a torch file of plain tensors was expected)") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path}: not a linewatch bundle (no '{FORMAT}' header)")
    text, recorded, tensors = raw.get("manifest"), raw.get("hash"), raw.get("tensors")
    if not isinstance(text, str) or not isinstance(recorded, str) or not isinstance(tensors, dict):
        raise BundleError(f"{path}: bundle is missing its manifest, hash or tensors")
    actual = content_hash(text, tensors)
    if actual != recorded:
        raise BundleError(
            f"{path}: content hash mismatch (recorded {recorded[:12]}, actual {actual[:12]}): "
            "the file is corrupt or was modified"
        )
    try:
        manifest = BundleManifest.from_dict(json.loads(text))
    except (ManifestError, ValueError) as exc:
        raise BundleError(f"{path}: {exc}") from None
    return manifest, tensors, recorded


def load_bundle(path: str | Path, backbone_weights: str | Path | None = None) -> Bundle:
    """Load a bundle, rebuild its model on the CPU in eval mode, and check the backbone weights match."""
    manifest, tensors, digest = read_bundle_file(path)
    bb = manifest.backbone
    module = None
    if bb is not None:
        backbone = load_backbone(
            bb.name, bb.layers, backbone_weights or bb.weights_path, bb.border_pad, bb.border_mode, bb.precision
        )
        if backbone.weights_sha256 != bb.weights_sha256:
            raise BundleError(
                f"{path}: backbone weights {backbone.weights_path} (sha256 {backbone.weights_sha256[:12]}) differ "
                f"from those the model was fitted with (sha256 {bb.weights_sha256[:12]})"
            )
        module = backbone.module
    preprocessing = manifest.preprocessing
    try:
        golden = GoldenSet.of(manifest.golden, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: {exc}") from None
    tensors = {k: v for k, v in tensors.items() if k != GOLDEN_TENSOR}
    try:
        cls = get_model_class(manifest.model)
        model = cls.from_tensors(module, preprocessing.input_size, manifest.model_params, tensors)  # type: ignore[arg-type]
    except (KeyError, ValueError) as exc:
        raise BundleError(f"{path}: bundle tensors do not fit model {manifest.model}: {exc}") from exc
    return Bundle(model.eval(), preprocessing, manifest, digest, Path(path), golden)
