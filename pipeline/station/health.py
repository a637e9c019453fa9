"""How the running pipeline is, read from its shared state for the operator page (never written)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.state import SPOOL_LOST, STORE_FAILING, STORE_WRITTEN, RunState, StateSpec


class HealthSource(Protocol):
    def snapshot(self) -> dict[str, Any] | None:
        """Stages, cameras and the store backlog; None when no run is there to read."""


@dataclass(frozen=True)
class StageSlot:
    name: str
    index: int  # its cells in RunState
    timeout_s: float  # silent longer than this, the supervisor restarts it
    camera: int | None = None  # a capture stage's camera


class NoRun:
    """The page over a store with no run on this box (`linewatch station`)."""

    def snapshot(self) -> dict[str, Any] | None:
        return None


class RunHealth:
    """The run's counters and stage heartbeats, as the supervisor keeps them."""

    def __init__(self, spec: StateSpec, stages: tuple[StageSlot, ...], cameras: tuple[str, ...]):
        self.state = RunState.attach(spec)
        self.stages, self.cameras = stages, cameras

    def snapshot(self) -> dict[str, Any] | None:
        s, now = self.state, time.monotonic_ns()
        stages = []
        for st in self.stages:
            age = (now - int(s.heartbeat_ns[st.index])) / 1e9
            stages.append({"name": st.name, "state": self._stage_state(st, age), "restarts": int(s.restarts[st.index])})
        cameras = [
            {
                "id": cam,
                "connected": bool(s.connected[c]),
                "captured": int(s.captured[c]),
                "drops": int(s.drops[c].sum()),
                "done": bool(s.done[c]),
            }
            for c, cam in enumerate(self.cameras)
        ]
        backlog = max(0, int(s.publisher[0]) - int(s.store[STORE_WRITTEN]) - int(s.spool[SPOOL_LOST]))
        return {
            "stages": stages,
            "cameras": cameras,
            "store_backlog": backlog,
            "store_failing": bool(s.store[STORE_FAILING]),
        }

    def _stage_state(self, st: StageSlot, heartbeat_age_s: float) -> str:
        """up, down or finished (a capture stage whose source has ended)."""
        s = self.state
        if st.camera is not None and s.done[st.camera]:
            return "finished"
        # A capture stage is up while it beats; the others once they are also ready for frames.
        ready = st.camera is not None or bool(s.ready[st.index])
        return "up" if ready and heartbeat_age_s < st.timeout_s else "down"
