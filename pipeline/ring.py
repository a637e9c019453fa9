"""Shared-memory rings between stage processes: fixed slots, one writer, one reader, no locks.

Every link of the pipeline (source -> preprocess -> infer -> decide -> supervisor) is a `FrameRing`:
N slots, each a `RECORD` header plus an optional pixel/tensor payload, in one shared-memory block.
Pixel data never goes through a pipe or a pickle; only ring names and shapes are passed at spawn.

Why no locks: a lock held by a process that is killed stays held forever and freezes the pipeline.
Instead each field has one writer at a time. The writer fills a FREE slot and sets state WRITTEN
last; the reader uses a WRITTEN slot and sets it FREE last. If the reader dies while holding a slot,
the slot is still WRITTEN, so its restarted successor processes it again (re-queue on crash); the
`attempts` field stops a frame that crashes the stage from doing so forever.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.context import BaseContext

import numpy as np

from linewatch_plc.wire import VERDICT_NAMES, Verdict

FREE, WRITTEN = 0, 1
# Longest a writer short of room sleeps on the `room` doorbell before it looks at the stop flag again.
ROOM_WAIT_S = 0.05
NO_TRIGGER = np.iinfo(np.int64).min
VERDICT_PASS, VERDICT_REJECT, VERDICT_ERROR = 0, 1, 2  # indices into linewatch_plc.wire.VERDICT_NAMES

# One record layout for every ring; each stage copies the header forward and fills its own fields.
RECORD = np.dtype(
    [
        ("state", np.int64),
        ("seq", np.int64),  # order of writing into this ring (FIFO for the reader)
        ("camera", np.int32),  # index into the run's camera list
        ("bundle", np.int32),  # slot of the run's BundleTable that decides this frame (set by preprocess)
        ("shadow", np.int32),  # 1 + the slot of the bundle scoring it in shadow (set by preprocess); 0: none
        ("shadow_verdict", np.int32),  # the shadow bundle's verdict (decide), unpublished
        ("shadow_score", np.float64),  # the shadow bundle's score (infer)
        ("golden", np.int32),  # 1: a golden frame of the self-test (frame_id: its index, source_index: the round)
        ("h", np.int32),
        ("w", np.int32),
        ("attempts", np.int32),  # times a reader started processing this slot
        ("frame_id", np.int64),
        ("trigger", np.int64),  # encoder / trigger value from the source, NO_TRIGGER when none
        ("label", np.int64),  # ground truth when replaying a labelled set: -1 unknown, 0 good, 1 defect
        ("t_capture_ns", np.int64),  # time.time_ns() at capture: what a PLC bridge shifts by
        ("m_capture_ns", np.int64),  # time.monotonic_ns() at capture, for latencies
        ("m_pre_ns", np.int64),  # preprocess done
        ("m_infer_start_ns", np.int64),
        ("m_infer_ns", np.int64),  # inference done
        ("m_decide_ns", np.int64),  # verdict published
        ("t_decision_ns", np.int64),
        ("batch", np.int32),
        ("verdict", np.int32),
        ("score", np.float64),
        ("source_index", np.int64),  # position in a replayed folder (for offline comparison)
        ("pub_seq", np.int64),  # the published message's seq and topic_seq (set by decide)
        ("topic_seq", np.int64),
        ("keep", np.int32),  # 1: the frame and its anomaly map ride in the payload for the image archive
        ("image_slot", np.int32),  # in the recorder's image ring: where that payload went (-1: none)
    ]
)


def verdict_at(score: float, threshold: float) -> int:
    """The decision rule: reject when score > threshold."""
    return VERDICT_REJECT if score > threshold else VERDICT_PASS


def verdict_of_record(rec: np.void, cameras: tuple[str, ...], threshold: float) -> Verdict:
    """The published verdict a decided record stands for."""
    verdict = VERDICT_NAMES[int(rec["verdict"])]
    return Verdict(
        camera_id=cameras[int(rec["camera"])],
        frame_id=int(rec["frame_id"]),
        t_capture_ns=int(rec["t_capture_ns"]),
        t_decision_ns=int(rec["t_decision_ns"]),
        score=None if verdict == "error" else float(rec["score"]),
        threshold=threshold,
        verdict=verdict,
        trigger=None if rec["trigger"] == NO_TRIGGER else int(rec["trigger"]),
    )


class Doorbell:
    """Wakes a ring's reader when a slot is committed, so an idle reader sleeps instead of polling.

    A counting semaphore: the writer posts once per commit; the reader waits with a timeout (it still
    heartbeats and sees stop flags) and then takes every WRITTEN slot, so a post that an earlier pass
    already covered costs one empty pass. Unlike a lock or an Event it holds nothing a killed writer
    could leave held. Polling readers cost the model CPU: on the 2-core box three processes waking every
    0.2 ms slowed PatchCore by a third, and the backoff to 2 ms added that much latency per hop.
    Several rings may share one doorbell (preprocess waits on every camera's ring at once). Passed to
    stage processes only at spawn, inside their `RingSpec`.
    """

    def __init__(self, context: BaseContext, most: int | None = None) -> None:
        self._semaphore = context.Semaphore(0)
        # Posts beyond `most` are dropped: a waiter that wakes re-checks every slot anyway, and a ring
        # whose waiter rarely waits (a writer that is never short of room) must not count up for ever.
        self.most = most

    def ring(self) -> None:
        if self.most is not None:
            try:
                if self._semaphore.get_value() >= self.most:
                    return
            except NotImplementedError:  # macOS has no sem_getvalue: post unbounded
                pass
        self._semaphore.release()

    def wait(self, timeout_s: float) -> bool:
        """True when woken by a commit, False after `timeout_s` without one."""
        return self._semaphore.acquire(timeout=timeout_s)

    def clear(self) -> None:
        """Forget the posts pending: for a reader that takes everything at once and then sleeps on the bell,
        so that commits it already took do not wake it again, one by one."""
        while self._semaphore.acquire(False):
            pass


@dataclass(frozen=True)
class RingSpec:
    """What a process needs to attach to a ring (picklable at spawn, small)."""

    name: str
    slots: int
    payload_shape: tuple[int, ...]
    payload_dtype: str
    doorbell: Doorbell | None = None  # rung on every commit; None: the reader polls
    room: Doorbell | None = None  # rung when the reader frees a slot; None: a writer short of room polls


class FrameRing:
    def __init__(self, spec: RingSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec = spec
        self._shm = shm
        self._owner = owner
        # Commits / releases made with notify=False whose bell has not rung yet (this process's side only).
        self._quiet_commits = False
        self._quiet_releases = False
        n = spec.slots
        header_bytes = RECORD.itemsize * n
        self.meta = np.ndarray((2,), dtype=np.int64, buffer=shm.buf, offset=0)  # [next_seq, unused]
        self.headers = np.ndarray((n,), dtype=RECORD, buffer=shm.buf, offset=16)
        payload_offset = 16 + header_bytes
        payload_offset += (-payload_offset) % 64
        shape = (n, *spec.payload_shape) if spec.payload_shape else (n, 0)  # header-only ring: empty payloads
        self.payloads = np.ndarray(shape, dtype=np.dtype(spec.payload_dtype), buffer=shm.buf, offset=payload_offset)

    @staticmethod
    def _size(slots: int, payload_shape: tuple[int, ...], dtype: str) -> int:
        payload = int(np.prod(payload_shape, dtype=np.int64)) * np.dtype(dtype).itemsize if payload_shape else 0
        return 16 + RECORD.itemsize * slots + 64 + payload * slots

    @classmethod
    def create(
        cls,
        slots: int,
        payload_shape: tuple[int, ...] = (),
        dtype: str = "uint8",
        doorbell: Doorbell | None = None,
        room: Doorbell | None = None,
    ) -> FrameRing:
        if slots < 1:
            raise ValueError(f"a ring needs at least 1 slot, got {slots}")
        shm = shared_memory.SharedMemory(create=True, size=cls._size(slots, payload_shape, dtype))
        spec = RingSpec(shm.name, slots, tuple(payload_shape), dtype, doorbell, room)
        ring = cls(spec, shm, owner=True)
        ring.meta[:] = 0
        ring.headers[:] = np.zeros(slots, dtype=RECORD)
        return ring

    @classmethod
    def attach(cls, spec: RingSpec) -> FrameRing:
        return cls(spec, attach_untracked(spec.name), owner=False)

    # writer side
    def free_slot(self) -> int | None:
        free = np.flatnonzero(self.headers["state"] == FREE)
        return int(free[0]) if free.size else None

    def wait_free_slot(self, stop: Callable[[], bool]) -> int | None:
        """Block until a slot is free (backpressure); None when `stop()` turns true first.

        With a `room` doorbell the writer sleeps until the reader frees a slot. Polling instead woke
        each blocked writer every 2 ms at full speed, and every wake-up on the 2-core box took a core
        from one of inference's two threads while the other waited for it.
        """
        idle = Idle()
        while True:
            slot = self.free_slot()
            if slot is not None:
                return slot
            if self._quiet_commits:
                self.notify_reader()  # the reader makes room only once it sees what is already committed
            if stop():
                return None
            if self.spec.room is None:
                idle.sleep()
            else:
                self.spec.room.wait(ROOM_WAIT_S)

    def commit(self, slot: int, record: np.void | None = None, notify: bool = True) -> None:
        """Publish slot to the reader; `record` (a RECORD) is copied in first when given.

        notify=False leaves the reader asleep until `notify_reader`: a writer that commits a batch
        wakes it once, not once per slot (each wake-up on two cores preempts an inference thread).
        A writer that then has to wait for room rings first, so deferred commits never hold it up.
        """
        if record is not None:
            record = record.copy()
            record["state"] = FREE  # records copied from another ring say WRITTEN: that must come last
            self.headers[slot] = record
        self.headers[slot]["seq"] = self.meta[0]
        self.headers[slot]["attempts"] = 0
        self.meta[0] += 1
        self.headers[slot]["state"] = WRITTEN  # last: the reader may take the slot from here on
        if notify:
            self.notify_reader()
        else:
            self._quiet_commits = True

    def notify_reader(self) -> None:
        self._quiet_commits = False
        if self.spec.doorbell is not None:
            self.spec.doorbell.ring()

    # reader side
    def written(self) -> np.ndarray:
        """WRITTEN slots, oldest first."""
        slots = np.flatnonzero(self.headers["state"] == WRITTEN)
        return slots[np.argsort(self.headers["seq"][slots], kind="stable")]

    def wait_for_commit(self, timeout_s: float) -> None:
        """Sleep until a writer commits to this ring (or any ring sharing its doorbell), at most `timeout_s`."""
        if self._quiet_releases:
            self.notify_writer()  # the writer commits again only once it sees the room already made
        if self.spec.doorbell is None:
            time.sleep(min(timeout_s, 0.002))
        else:
            self.spec.doorbell.wait(timeout_s)

    def release(self, slot: int, notify: bool = True) -> None:
        """Free slot for the writer; notify=False defers the wake-up to `notify_writer` (see `commit`)."""
        self.headers[slot]["state"] = FREE
        if notify:
            self.notify_writer()
        else:
            self._quiet_releases = True

    def notify_writer(self) -> None:
        self._quiet_releases = False
        if self.spec.room is not None:
            self.spec.room.ring()

    def occupancy(self) -> int:
        return int((self.headers["state"] == WRITTEN).sum())

    def close(self) -> None:
        # Views into the buffer must go before the block can be closed.
        del self.meta, self.headers, self.payloads
        release_block(self._shm, self._owner)


def release_block(shm: shared_memory.SharedMemory, owner: bool) -> None:
    """Close a block; the owner (its creator) also unlinks it. Views into it must be gone first."""
    shm.close()
    if owner:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass  # already unlinked (a second close)


def attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing block without registering it with the resource tracker.

    The creating process owns and unlinks the block; on Python < 3.13 an attaching process would
    otherwise have it unlinked (and warned about as leaked) when that process exits or is restarted.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    original = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = original  # type: ignore[assignment]


class Idle:
    """Sleep of an idle polling loop: short right after work, backing off to `longest_s` when quiet.

    Polling keeps the rings lock-free; the backoff keeps idle stages from eating the CPU the model
    needs, at the cost of at most `longest_s` extra latency for the first frame after a quiet spell.
    """

    def __init__(self, shortest_s: float = 0.0002, longest_s: float = 0.002) -> None:
        self.shortest_s, self.longest_s = shortest_s, longest_s
        self.current = shortest_s

    def sleep(self) -> None:
        time.sleep(self.current)
        self.current = min(self.current * 2, self.longest_s)

    def reset(self) -> None:
        self.current = self.shortest_s
