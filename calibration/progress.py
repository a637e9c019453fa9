"""A minimal progress bar for long offline steps (feature extraction, coreset), written to stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`with Progress("coreset", total=n) as bar: bar.update(k)`; silent when `enabled` is False.

    Redraws at most every 0.2 s so the bar costs nothing inside tight loops; when the stream is not a
    terminal (logs, CI) it writes only the final line.
    """

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._live = enabled and self.stream.isatty()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._draw(final=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self._live and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw(final=False)

    def _draw(self, final: bool) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 28
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = time.perf_counter() - self.start
        end = "\n" if final else ""
        start = "\r" if self._live else ""
        self.stream.write(f"{start}{self.label:<20} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s{end}")
        self.stream.flush()
