"""Fitting the models on normal frames: feature extraction, PatchCore coreset, PaDiM Gaussians;
EfficientAD's training is in `calibration.efficientad`.

The scoring modules live in `edge.models`; this module only produces their tensors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calibration.coreset import k_center_greedy
from calibration.datasets import DatasetError, Sample, SkipReport, fingerprint, iter_loaded
from calibration.efficientad import efficientad_preprocessing, fit_efficientad
from calibration.progress import Progress
from calibration.settings import OfflineConfig
from edge.backbones import FeatureBackbone, get_spec, load_backbone
from edge.backends import require_device
from edge.bundle import build_manifest
from edge.manifest import BundleManifest, DatasetRecord
from edge.models import AnomalyModel
from edge.models.padim import PadimModel, padim_embedding
from edge.models.patchcore import PatchCoreModel, patchcore_embedding
from edge.preprocessing import Preprocessing, to_rgb8
from edge.settings import to_dict

# Added to each PaDiM covariance so it stays invertible with few frames (paper: 0.01 I).
PADIM_COV_EPS = 0.01


@dataclass(frozen=True)
class FitResult:
    model: AnomalyModel
    preprocessing: Preprocessing
    manifest: BundleManifest
    skipped: SkipReport
    seconds: float


def preprocess_samples(
    samples: list[Sample], preprocessing: Preprocessing, skip_bad: bool, report: SkipReport
) -> torch.Tensor:
    """Read and preprocess every sample -> (N, 3, H, W) float32."""
    arrays = [preprocessing(loaded.image) for loaded in iter_loaded(samples, skip_bad, report)]
    if not arrays:
        raise DatasetError("no readable normal images to fit on")
    return torch.from_numpy(np.stack(arrays))


class FrameStack:
    """Fit frames held as RGB uint8 after `geometry`, normalised a batch at a time when sliced.

    A quarter of the memory of a normalised float stack (at a thousand 256 px frames, 0.2 GB against
    0.8 GB), with the pipeline's own `normalize_batch` arithmetic. Slices and `shape` behave like the
    float (N, 3, H, W) tensor that `preprocess_samples` returns, so the fit functions take either.
    """

    def __init__(self, rgb8: torch.Tensor, preprocessing: Preprocessing) -> None:
        if rgb8.dtype != torch.uint8 or rgb8.ndim != 4 or rgb8.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (N, H, W, 3), got {rgb8.dtype} {tuple(rgb8.shape)}")
        self.rgb8 = rgb8
        self.preprocessing = preprocessing

    @property
    def shape(self) -> torch.Size:
        n, h, w, c = self.rgb8.shape
        return torch.Size((n, c, h, w))

    def __len__(self) -> int:
        return self.rgb8.shape[0]

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.preprocessing.normalize_batch(self.rgb8[index])


def load_frames(samples: list[Sample], preprocessing: Preprocessing, skip_bad: bool, report: SkipReport) -> FrameStack:
    """Read every sample into one preallocated uint8 stack (no per-frame list, no stacking copy)."""
    h, w = preprocessing.input_size
    rgb8 = np.empty((len(samples), h, w, 3), dtype=np.uint8)
    n = 0
    for loaded in iter_loaded(samples, skip_bad, report):
        rgb8[n] = preprocessing.geometry(to_rgb8(loaded.image))
        n += 1
    if not n:
        raise DatasetError("no readable normal images to fit on")
    return FrameStack(torch.from_numpy(rgb8[:n]), preprocessing)


def batches(images: torch.Tensor | FrameStack, batch_size: int, label: str, progress: bool) -> Iterator[torch.Tensor]:
    with Progress(label, images.shape[0], enabled=progress) as bar:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].contiguous(memory_format=torch.channels_last)
            yield batch
            bar.update(batch.shape[0])


def fit_patchcore(
    backbone: FeatureBackbone,
    images: torch.Tensor | FrameStack,
    coreset_ratio: float = 0.1,
    projection_dim: int = 128,
    num_neighbors: int = 9,
    sigma: float = 4.0,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
    search_precision: str = "auto",
    max_bank: int | None = None,
    device: str = "cpu",
) -> PatchCoreModel:
    """Memory bank = greedy k-center coreset of all training patch features, computed on `device`.

    The model comes back on the CPU (what a bundle is saved from), whatever `device` was.
    """
    backbone.to(device)
    with torch.inference_mode():
        # Filled in place: a list of chunks and their concatenation would hold every patch twice.
        features = torch.empty(0)
        row = 0
        for batch in batches(images, batch_size, "features", progress):
            emb = patchcore_embedding(backbone, batch.to(device))
            chunk = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            if not row:
                n = images.shape[0] * (chunk.shape[0] // batch.shape[0])
                features = torch.empty(n, chunk.shape[1], device=device)
            features[row : row + chunk.shape[0]] = chunk
            row += chunk.shape[0]
    backbone.cpu()
    n_select = max(1, round(coreset_ratio * features.shape[0]))
    if max_bank is not None:
        n_select = min(n_select, max_bank)
    if n_select < features.shape[0]:
        selected = k_center_greedy(features, n_select, projection_dim, seed, progress)
        bank = features[selected.to(features.device)]
    else:
        bank = features
    return PatchCoreModel(
        backbone,
        bank.to("cpu", copy=True),
        tuple(images.shape[-2:]),
        num_neighbors=num_neighbors,
        sigma=sigma,
        search_precision=search_precision,
    )


def fit_padim(
    backbone: FeatureBackbone,
    images: torch.Tensor | FrameStack,
    n_features: int = 100,
    sigma: float = 4.0,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
    device: str = "cpu",
) -> PadimModel:
    """Per-position mean and regularised inverse covariance of a random channel subset, computed on `device`.

    Sums are accumulated in float64 batch by batch, so memory does not grow with the number of frames.
    The model comes back on the CPU.
    """
    total = sum(backbone.channels)
    d = min(n_features, total)
    gen = torch.Generator().manual_seed(seed)
    channel_idx = torch.randperm(total, generator=gen)[:d].sort().values
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    n = 0
    backbone.to(device)
    with torch.inference_mode():
        for batch in batches(images, batch_size, "features", progress):
            emb = padim_embedding(backbone, batch.to(device), channel_idx.to(device))
            x = emb.flatten(2).permute(2, 0, 1).double()  # (P, B, d)
            b1 = x.sum(dim=1)
            b2 = torch.einsum("pbi,pbj->pij", x, x)
            s1 = b1 if s1 is None else s1 + b1
            s2 = b2 if s2 is None else s2 + b2
            n += x.shape[1]
    backbone.cpu()
    assert s1 is not None and s2 is not None
    s1, s2 = s1.cpu(), s2.cpu()
    if n < 2:
        raise DatasetError("PaDiM needs at least 2 normal images to estimate covariances")
    mean = s1 / n
    cov = (s2 - n * torch.einsum("pi,pj->pij", mean, mean)) / (n - 1)
    cov += PADIM_COV_EPS * torch.eye(d, dtype=cov.dtype)
    inv_cov = torch.linalg.inv(cov)
    return PadimModel(backbone, channel_idx, mean.float(), inv_cov.float(), tuple(images.shape[-2:]), sigma=sigma)


def fit(config: OfflineConfig, samples: list[Sample], skip_bad: bool = False, progress: bool = False) -> FitResult:
    """Fit the configured model on normal `samples` and build its bundle manifest."""
    start = time.perf_counter()
    mc = config.model
    spec = get_spec(mc.backbone)
    report = SkipReport()
    fc = config.fit
    require_device("fit.device", fc.device)  # before any frame is read
    model: AnomalyModel
    extra: dict[str, Any] = {}
    if mc.name == "efficientad":
        # No backbone at run time: the backbone (if any) only teaches the teacher, inside fit_efficientad.
        preprocessing = efficientad_preprocessing(mc.input_size, mc.crop_size)
        images = preprocess_samples(samples, preprocessing, skip_bad, report)
        used = _used(samples, report)
        data_fingerprint = fingerprint(used)  # keys the training checkpoint and goes into the manifest
        trained = fit_efficientad(mc, images, preprocessing, fc.seed, data_fingerprint, progress, device=fc.device)
        model, extra = trained.model, {"efficientad": trained.info}
        seconds = time.perf_counter() - start
        return _result(config, model, preprocessing, "", used, report, seconds, extra, data_fingerprint)
    border_mode, border_pad = mc.border()
    backbone = load_backbone(
        mc.backbone, mc.layers, mc.backbone_weights, border_pad, border_mode, mc.backbone_precision
    )
    preprocessing = spec.preprocessing(mc.input_size, mc.crop_size)
    images = load_frames(samples, preprocessing, skip_bad, report)
    if mc.name == "patchcore":
        pc = mc.patchcore
        model = fit_patchcore(
            backbone.module,
            images,
            pc.coreset_ratio,
            pc.projection_dim,
            pc.num_neighbors,
            mc.sigma,
            fc.batch_size,
            fc.seed,
            progress,
            pc.search_precision,
            pc.max_bank,
            fc.device,
        )
    else:
        model = fit_padim(
            backbone.module, images, mc.padim.n_features, mc.sigma, fc.batch_size, fc.seed, progress, fc.device
        )
    seconds = time.perf_counter() - start  # the fit itself; hashing the files for the manifest is not part of it
    used = _used(samples, report)
    weights = backbone.weights_sha256
    return _result(config, model, preprocessing, weights, used, report, seconds, extra, fingerprint(used))


def _used(samples: list[Sample], report: SkipReport) -> list[Sample]:
    bad = {path for path, _ in report.skipped}
    return [s for s in samples if s.path not in bad]


def _result(
    config: OfflineConfig,
    model: AnomalyModel,
    preprocessing: Preprocessing,
    weights_sha256: str,
    used: list[Sample],
    report: SkipReport,
    seconds: float,
    extra: dict[str, Any],
    data_fingerprint: str,
) -> FitResult:
    settings = {"model": to_dict(config.model), "fit": to_dict(config.fit)}
    fit_record = {"config": settings, "seconds": round(seconds, 3), **extra}
    dataset = DatasetRecord(len(used), data_fingerprint)
    manifest = build_manifest(model, preprocessing, weights_sha256, dataset, fit_record)
    if config.model.backbone_weights is not None and manifest.backbone is not None:
        manifest = manifest.with_weights_path(config.model.backbone_weights)
    return FitResult(model.eval(), preprocessing, manifest, report, seconds)
