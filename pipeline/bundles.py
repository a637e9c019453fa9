"""The bundles a run decides with, in shared memory, and which one decides each camera's next frame.

A run starts with one bundle per distinct `pipeline.sources[].bundle` (and `shadow_bundle`) and may
load more while it runs (a product changeover, a candidate tried in shadow). Each bundle takes a slot
of the `BundleTable`; the table also maps each camera to the slot its next frame is decided by, and to
the slot that scores it in shadow, if any. Preprocess reads both when it takes a frame and stamps them
into the frame's record, so every frame is decided by exactly one bundle whatever happens to the map
afterwards; infer, decide and the recorder look the slots up for the model, the threshold and the hash.

One writer per field, as in `RunState`: the supervisor fills slots and the camera map; the infer stage
says whether it has loaded a slot's model (`loaded`, `error`). The one hand-over: a slot whose load
failed is set back to pending by the supervisor when a switch asks for it again, which infer only
reads until it loads the slot. A slot stays taken for the whole run, so a frame in flight never finds
its slot given to another bundle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pipeline.ring import attach_untracked, release_block

if TYPE_CHECKING:  # torch comes with them: decide and the recorder never need it
    from edge.golden import GoldenSet
    from edge.manifest import BundleManifest
    from edge.preprocessing import Preprocessing

MAX_BUNDLES = 16
NO_BUNDLE = -1
EMPTY, ACTIVE = 0, 1  # slot state (supervisor)
LOAD_PENDING, LOADED, LOAD_FAILED = 0, 1, 2  # slot load state (infer)
PATH_BYTES, PREPROCESSING_BYTES, ERROR_BYTES = 1024, 1024, 512

SLOT = np.dtype(
    [
        ("state", np.int64),  # supervisor: EMPTY | ACTIVE
        ("threshold", np.float64),  # supervisor
        ("hash", "S64"),  # supervisor: the bundle's content hash
        ("path", f"S{PATH_BYTES}"),  # supervisor: the file infer loads
        ("preprocessing", f"S{PREPROCESSING_BYTES}"),  # supervisor: JSON of the bundle's Preprocessing
        ("loaded", np.int64),  # infer: LOAD_PENDING | LOADED | LOAD_FAILED
        ("error", f"S{ERROR_BYTES}"),  # infer: why loading failed
    ]
)


class BundleLookup(Protocol):
    """What turns a record's bundle slot into the published hash and threshold."""

    def hash(self, slot: int) -> str: ...

    def threshold(self, slot: int) -> float: ...


@dataclass(frozen=True)
class SingleBundle:
    """A lookup with one bundle for every slot: for tools that write verdicts outside a run."""

    digest: str
    value: float

    def hash(self, slot: int) -> str:
        return self.digest

    def threshold(self, slot: int) -> float:
        return self.value


@dataclass(frozen=True)
class RunBundle:
    """A bundle read and checked by the supervisor: what the table and the metrics need of it."""

    path: Path
    manifest: BundleManifest
    hash: str
    threshold: float
    golden: GoldenSet | None = None  # the frames of the run's self-test, when the bundle holds them

    @classmethod
    def read(cls, path: str | Path, input_size: tuple[int, int] | None = None) -> RunBundle:
        """Read and verify a bundle; BundleError, naming the file, for one this run cannot decide with: no
        threshold, or an input size other than `input_size` (a run's frames share one tensor ring)."""
        from edge.bundle import BundleError, read_bundle_file
        from edge.golden import GoldenSet

        path = Path(path)
        manifest, tensors, digest = read_bundle_file(path)
        if manifest.threshold is None:
            raise BundleError(f"{path}: bundle has no threshold; make one with `linewatch calibrate`")
        if input_size is not None and tuple(manifest.input_size) != tuple(input_size):
            (h, w), (rh, rw) = manifest.input_size, input_size
            raise BundleError(
                f"{path}: input size {h}x{w}, but this run's bundles take {rh}x{rw} (every bundle of a run "
                "shares the input size; calibrate the bundle at that size or start a run for it)"
            )
        if len(str(path.resolve()).encode()) >= PATH_BYTES:
            raise BundleError(f"{path}: path longer than {PATH_BYTES - 1} bytes")
        try:
            golden = GoldenSet.of(manifest.golden, tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}: {exc}") from None
        return cls(path.resolve(), manifest, digest, manifest.threshold.value, golden)

    def cuts_like(self, other: RunBundle) -> bool:
        """Whether both resize and crop frames alike: a shadow bundle scores the frames as the live one cut them."""
        mine, theirs = self.manifest.preprocessing, other.manifest.preprocessing
        return (mine.resize, mine.crop) == (theirs.resize, theirs.crop)


@dataclass(frozen=True)
class BundleTableSpec:
    name: str
    cameras: int


class BundleTable:
    def __init__(self, spec: BundleTableSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec, self._shm, self._owner = spec, shm, owner
        self.slots = np.ndarray((MAX_BUNDLES,), dtype=SLOT, buffer=shm.buf, offset=0)
        at = SLOT.itemsize * MAX_BUNDLES
        # supervisor: the slot that decides each camera's next frame, and the one scoring it in shadow (or NO_BUNDLE)
        self.live = np.ndarray((spec.cameras,), dtype=np.int64, buffer=shm.buf, offset=at)
        self.shadow = np.ndarray((spec.cameras,), dtype=np.int64, buffer=shm.buf, offset=at + 8 * spec.cameras)

    @staticmethod
    def _size(cameras: int) -> int:
        return SLOT.itemsize * MAX_BUNDLES + 16 * cameras

    @classmethod
    def create(cls, cameras: int) -> BundleTable:
        shm = shared_memory.SharedMemory(create=True, size=cls._size(cameras))
        table = cls(BundleTableSpec(shm.name, cameras), shm, owner=True)
        table.slots[:] = np.zeros(MAX_BUNDLES, dtype=SLOT)
        table.live[:] = NO_BUNDLE
        table.shadow[:] = NO_BUNDLE
        return table

    @classmethod
    def attach(cls, spec: BundleTableSpec) -> BundleTable:
        return cls(spec, attach_untracked(spec.name), owner=False)

    # supervisor side
    def add(self, bundle: RunBundle) -> int:
        """The slot holding `bundle`: the one already holding its hash, else a new one (its model not loaded
        yet). BundleError when every slot is taken."""
        from edge.bundle import BundleError

        if (slot := self.slot_of(bundle.hash)) is not None:
            return slot
        empty = np.flatnonzero(self.slots["state"] == EMPTY)
        if not empty.size:
            raise BundleError(f"{bundle.path}: this run holds {MAX_BUNDLES} bundles already; restart it to load more")
        slot = int(empty[0])
        entry = self.slots[slot]
        entry["threshold"] = bundle.threshold
        entry["hash"] = bundle.hash.encode()
        entry["path"] = str(bundle.path).encode()
        entry["preprocessing"] = json.dumps(bundle.manifest.preprocessing.to_dict()).encode()
        entry["loaded"], entry["error"] = LOAD_PENDING, b""
        entry["state"] = ACTIVE  # last: readers take the slot from here on
        return slot

    def slot_of(self, digest: str) -> int | None:
        match = np.flatnonzero((self.slots["state"] == ACTIVE) & (self.slots["hash"] == digest.encode()))
        return int(match[0]) if match.size else None

    # every side
    def active(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self.slots["state"] == ACTIVE)]

    def threshold(self, slot: int) -> float:
        return float(self.slots["threshold"][slot])

    def hash(self, slot: int) -> str:
        return self.slots["hash"][slot].decode()

    def path(self, slot: int) -> str:
        return self.slots["path"][slot].decode()

    def preprocessing(self, slot: int) -> Preprocessing:
        from edge.preprocessing import Preprocessing

        return Preprocessing.from_dict(json.loads(self.slots["preprocessing"][slot]))

    def error(self, slot: int) -> str:
        return self.slots["error"][slot].decode(errors="replace")

    # infer side (and the supervisor's `retry`)
    def set_pending(self, slot: int) -> None:
        self.slots[slot]["loaded"] = LOAD_PENDING

    def set_loaded(self, slot: int, error: str | None = None) -> None:
        entry = self.slots[slot]
        if error is not None:
            entry["error"] = error.encode()[: ERROR_BYTES - 1]
        entry["loaded"] = LOADED if error is None else LOAD_FAILED

    def close(self) -> None:
        del self.slots, self.live, self.shadow
        release_block(self._shm, self._owner)
