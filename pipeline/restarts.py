"""When a failed stage starts again, and when it has failed too often for the run to go on.

The first failure of a stage is restarted at once (a single crash should cost as few parts as
possible); each further failure within the window waits twice as long as the one before, up to a
cap. A stage that fails more than `max_restarts` times within the window ends the run, so that the
service manager (systemd, Kubernetes) sees the box fail instead of a loop that never stops.
"""

from __future__ import annotations

from collections import deque

from pipeline.settings import PipelineConfig


class RestartSchedule:
    def __init__(self, max_restarts: int, window_s: float, backoff_s: float, backoff_max_s: float) -> None:
        self.max_restarts, self.window_s = max_restarts, window_s
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._failures: dict[int, deque[float]] = {}

    @classmethod
    def of(cls, config: PipelineConfig) -> RestartSchedule:
        return cls(config.max_restarts, config.restart_window_s, config.restart_backoff_s, config.restart_backoff_max_s)

    def failed(self, stage: int, now_s: float) -> float | None:
        """Record a failure of `stage` at `now_s` (monotonic seconds). Returns the wait before its restart, or
        None when this failure is one too many within the window."""
        times = self._failures.setdefault(stage, deque())
        times.append(now_s)
        while times[0] <= now_s - self.window_s:
            times.popleft()
        return self.wait(len(times))

    def wait(self, failures: int) -> float | None:
        """The wait before the restart that follows the `failures`-th failure within the window."""
        if failures > self.max_restarts:
            return None
        if failures == 1:
            return 0.0
        return min(self.backoff_s * 2 ** (failures - 2), self.backoff_max_s)

    def failures(self, stage: int) -> int:
        return len(self._failures.get(stage, ()))
