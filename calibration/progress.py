"""Progress of long offline steps (feature extraction, coreset, training), on stderr or in the log.

On a terminal it is a tqdm bar with rate and ETA. Elsewhere (systemd, `2>log`, CI) a bar redrawn
in place is noise, so the same tqdm line (count, rate, ETA) goes to the log as an INFO record every
`LOG_EVERY_S` seconds, from a timer, so that even a step slower than that interval shows it is alive.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_S = 10.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) elapsed {elapsed}, ETA {remaining}, {rate_fmt}"

log = logging.getLogger(__name__)


class _LogLines:
    """A file-like sink for tqdm that turns each redraw into one log record."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            self.logger.info("%s", line)

    def flush(self) -> None:
        pass


class Progress:
    """`with Progress("coreset", total=n) as bar: bar.update(k)`; silent when `enabled` is False."""

    def __init__(
        self,
        label: str,
        total: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        log_every_s: float = LOG_EVERY_S,
    ) -> None:
        stream = stream or sys.stderr
        self._live = stream.isatty()
        self._bar = tqdm(
            total=total,
            desc=label,
            disable=not enabled,
            file=stream if self._live else _LogLines(log),
            mininterval=0.2 if self._live else float("inf"),  # off a terminal the timer alone redraws
            dynamic_ncols=self._live,
            bar_format=None if self._live else LOG_FORMAT,
            leave=True,
        )
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if enabled and not self._live:
            self._timer = threading.Thread(
                target=self._tick, args=(log_every_s,), name=f"progress:{label}", daemon=True
            )
            self._timer.start()

    def _tick(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._bar.refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        self._bar.close()  # the final line: count, elapsed time and rate
