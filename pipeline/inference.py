"""The infer stage's side of the bundle table: one prepared model per bundle slot, and batches of one bundle.

The bundles a run starts with are loaded before the stage says it is ready. One added while the run
goes on (a product changeover) is loaded and warmed up in a background thread while the current
bundles keep inferring; the stage then tells the supervisor through the table, which switches the
camera over only once the model is ready, so no frame waits for a load.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge.backends import PreparedModel, engine_cache_dir, prepare_backend
from edge.bundle import BundleError, load_bundle
from edge.preprocessing import Preprocessing
from pipeline.bundles import ACTIVE, LOAD_FAILED, BundleTable
from pipeline.ring import FrameRing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """How every bundle's model is prepared on this stage's device."""

    backbone_weights: str | None
    device: str
    backend: str
    backend_fallback: bool
    engine_cache: str | None  # None: an `engines` folder beside each bundle
    example: torch.Tensor  # (max_batch, 3, h, w) on the CPU: the batch shape engines are built for


@dataclass(frozen=True)
class SlotModel:
    model: PreparedModel
    preprocessing: Preprocessing
    threshold: float


class BundleModels:
    def __init__(self, table: BundleTable, settings: ModelSettings) -> None:
        self.table, self.settings = table, settings
        self.models: dict[int, SlotModel] = {}
        self._loading: set[int] = set()

    def load_current(self) -> None:
        """At the stage's start: load the bundles deciding or shadowing a camera now; BundleError or BackendError
        for one that cannot be loaded (the stage cannot inspect without it). The table's other bundles (a
        camera's earlier one, one still loading for a switch) are loaded in the background: one that fails
        then is marked failed, and costs no restart."""
        in_use = {int(s) for s in (*self.table.live, *self.table.shadow) if s >= 0}
        for slot in self.table.active():
            if slot in in_use:
                self.models[slot] = self._prepare(slot)
                self.table.set_loaded(slot)
            elif self.table.slots["loaded"][slot] != LOAD_FAILED:
                self.table.set_pending(slot)  # this process does not hold it yet: `poll` loads it

    def poll(self) -> None:
        """Start loading, in the background, every bundle added to the table since the last poll."""
        slots = self.table.slots
        for slot in np.flatnonzero((slots["state"] == ACTIVE) & (slots["loaded"] == 0)):
            slot = int(slot)
            if slot not in self.models and slot not in self._loading:
                self._loading.add(slot)
                threading.Thread(
                    target=self._load_in_background, args=(slot,), name=f"load-{slot}", daemon=True
                ).start()

    def get(self, slot: int) -> SlotModel | None:
        return self.models.get(slot)

    def _load_in_background(self, slot: int) -> None:
        try:
            self.models[slot] = self._prepare(slot)
        except Exception as exc:  # noqa: BLE001 - any failure refuses that bundle; the line goes on without it
            log.error("%s", exc)
            self.table.set_loaded(slot, str(exc) or type(exc).__name__)
        else:
            self.table.set_loaded(slot)
            log.info("bundle %s (%s) loaded", self.table.hash(slot)[:12], self.table.path(slot))
        finally:
            self._loading.discard(slot)

    def _prepare(self, slot: int) -> SlotModel:
        s, path, digest = self.settings, self.table.path(slot), self.table.hash(slot)
        bundle = load_bundle(path, s.backbone_weights)
        if bundle.hash != digest:
            raise BundleError(f"{path}: changed since it was checked (hash {bundle.hash[:12]}, not {digest[:12]})")
        cache = engine_cache_dir(s.engine_cache, Path(path))
        model = prepare_backend(
            bundle.model, s.backend, s.device, s.example, cache, digest, allow_fallback=s.backend_fallback
        )
        if (mismatch := bundle.arithmetic_mismatch(s.device)) is not None:
            log.warning("%s", mismatch)
        model.warm_up(s.example.to(s.device))  # the first part on this bundle gets the steady-state latency
        return SlotModel(model, bundle.preprocessing, self.table.threshold(slot))


def one_bundle_batch(headers: np.ndarray, slots: np.ndarray, max_batch: int) -> list[int]:
    """The next batch: up to `max_batch` of the waiting `slots` (oldest first) decided by the oldest one's
    bundle. A camera's frames are taken only up to its first frame of another bundle: each camera's frames
    must reach decide in order, and the ones after a changeover wait for the next batch."""
    first = int(headers["bundle"][slots[0]])
    taken: list[int] = []
    held: set[int] = set()
    for s in slots:
        camera = int(headers["camera"][s])
        if camera in held:
            continue
        if int(headers["bundle"][s]) != first:
            held.add(camera)
            continue
        taken.append(int(s))
        if len(taken) == max_batch:
            break
    return taken


def shadow_scores(
    models: BundleModels, tensors: FrameRing, frames: list[int], device: str
) -> dict[int, tuple[float, float]]:
    """The scores of `frames` (tensor-ring slots) by their cameras' shadow bundles, with each one's threshold,
    by slot; frames without a shadow, or whose shadow is not loaded yet, are left out."""
    by_shadow: dict[int, list[int]] = {}
    for s in frames:
        if (shadow := int(tensors.headers[s]["shadow"])) > 0:
            by_shadow.setdefault(shadow - 1, []).append(s)
    out: dict[int, tuple[float, float]] = {}
    for slot, taken in by_shadow.items():
        if (model := models.get(slot)) is None:
            continue
        x = model.preprocessing.normalize_batch(torch.from_numpy(tensors.payloads[taken]).to(device))
        with torch.inference_mode():
            scores = model.model(x).scores.float().cpu().tolist()
        out.update((s, (score, model.threshold)) for s, score in zip(taken, scores, strict=True))
    return out
