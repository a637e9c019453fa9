"""Run-wide counters and flags in shared memory, readable by the supervisor at any time.

Each cell has exactly one writing process (noted per field), so no lock is needed and the counts
survive the crash of the process that wrote them: the supervisor reconciles
captured = verdicts + drops + in flight from these cells and the rings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from pipeline.ring import attach_untracked, release_block

# Drop reasons and who counts them: ring_full / unreadable -> the source process of that camera,
# stale (drop_oldest skipped an older frame) -> preprocess, shutdown (in flight at a forced stop) -> supervisor.
DROP_REASONS = ("ring_full", "unreadable", "stale", "shutdown")
FLAG_STOP_SOURCES, FLAG_STOP_ALL, FLAG_SELFTEST_FAILED = 0, 1, 2
FLAGS = 3
# Cells of `RunState.spool` (written by decide) and `RunState.store` (written by the recorder).
SPOOLED, SPOOL_LOST = 0, 1
STORE_WRITTEN, STORE_ERRORS, STORE_UNSPOOLED, STORE_ARCHIVE_BYTES, STORE_EXPIRED, STORE_FAILING = range(6)
# Cells of `RunState.pending` (written by decide): the verdict it is publishing, until it is in the buffer.
PENDING_CELLS = ("flag", "slot", "camera", "frame_id", "seq", "topic_seq", "verdict", "t_decision_ns")


class PipelineError(RuntimeError):
    """The runtime cannot go on (a stage cannot start); the message says which and why."""


@dataclass(frozen=True)
class StateSpec:
    name: str
    cameras: int
    processes: int
    supervisor_pid: int  # the process that created the state and spawns the stages


class RunState:
    FIELDS_PER_CAMERA = ("captured", "connected", "reconnects", "done", "position", "next_frame_id", "last_decided")

    def __init__(self, spec: StateSpec, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self.spec, self._shm, self._owner = spec, shm, owner
        c, p = spec.cameras, spec.processes
        arr = np.ndarray((self.cells(c, p),), dtype=np.int64, buffer=shm.buf)
        self._arr = arr
        at = 0

        def take(n: int) -> np.ndarray:
            nonlocal at
            view = arr[at : at + n]
            at += n
            return view

        self.flags = take(FLAGS)  # supervisor
        per_camera = take(c * len(self.FIELDS_PER_CAMERA)).reshape(len(self.FIELDS_PER_CAMERA), c)
        # source process of each camera:
        self.captured, self.connected, self.reconnects, self.done, self.position, self.next_frame_id = per_camera[:6]
        # decide: the newest frame id it has published and forwarded, per camera (-1: none yet). Frames of a
        # camera reach decide in frame-id order (every ring is FIFO), so a frame at or below it is a retry
        # of one already decided: a stage that died after forwarding a frame but before releasing it.
        self.last_decided = per_camera[6]
        self.drops = take(c * len(DROP_REASONS)).reshape(c, len(DROP_REASONS))
        self.heartbeat_ns = take(p)  # each process its own cell
        self.restarts = take(p)  # supervisor
        self.ready = take(p)  # each process its own cell, once it can take frames
        self.publisher = take(4)  # decide: [seq, seq per verdict pass/reject/error]
        self.spool = take(2)  # decide: verdicts spooled to disk (the recorder's buffer was full), and lost
        self.store = take(6)  # recorder: rows written, errors, taken back from the spool, archive bytes, ... (STORE_*)
        self.pending = take(len(PENDING_CELLS))  # decide: see PENDING_CELLS and stages.PendingVerdict

    @staticmethod
    def cells(cameras: int, processes: int) -> int:
        per_camera = cameras * (len(RunState.FIELDS_PER_CAMERA) + len(DROP_REASONS))
        return FLAGS + per_camera + 3 * processes + 4 + 2 + 6 + len(PENDING_CELLS)

    @classmethod
    def create(cls, cameras: int, processes: int) -> RunState:
        shm = shared_memory.SharedMemory(create=True, size=8 * cls.cells(cameras, processes))
        state = cls(StateSpec(shm.name, cameras, processes, os.getpid()), shm, owner=True)
        state._arr[:] = 0
        state.last_decided[:] = -1
        return state

    @classmethod
    def attach(cls, spec: StateSpec) -> RunState:
        return cls(spec, attach_untracked(spec.name), owner=False)

    def drop(self, camera: int, reason: str, n: int = 1) -> None:
        self.drops[camera, DROP_REASONS.index(reason)] += n

    def supervisor_gone(self) -> bool:
        """True in a stage whose supervisor has died (the stage was handed to another parent).

        Stages ignore SIGINT and SIGTERM so that the supervisor alone decides how a run ends; without this
        check, a supervisor killed outright (SIGKILL, the OOM killer) would leave them blocked on full rings
        for ever, holding the GPU, the shared memory and the publisher's port. The supervisor starts them
        itself (the `spawn` method, no fork server), so while it lives it is their parent.
        """
        return not self._owner and os.getppid() != self.spec.supervisor_pid

    def stopping_sources(self) -> bool:
        return bool(self.flags[FLAG_STOP_SOURCES] or self.flags[FLAG_STOP_ALL]) or self.supervisor_gone()

    def stopping(self) -> bool:
        return bool(self.flags[FLAG_STOP_ALL]) or self.supervisor_gone()

    def close(self) -> None:
        del self.flags, self.captured, self.connected, self.reconnects, self.done, self.position
        del self.next_frame_id, self.drops, self.heartbeat_ns, self.restarts, self.ready, self.publisher
        del self.spool, self.store, self.pending, self._arr
        release_block(self._shm, self._owner)
