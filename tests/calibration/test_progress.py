"""Progress off a terminal: periodic log lines with count, rate and ETA, even while nothing advances."""

from __future__ import annotations

import io
import logging
import re
import time

import pytest

from calibration.progress import Progress


def test_a_stalled_step_still_logs_on_the_timer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="calibration.progress")
    with Progress("train student", 10, stream=io.StringIO(), log_every_s=0.2) as bar:
        bar.update(3)
        time.sleep(1.1)  # one slow step: no update() for five timer periods
        bar.update(7)
    lines = [r.getMessage() for r in caplog.records]
    stalled = [line for line in lines if line.startswith("train student: 3/10 (30%)")]
    assert len(stalled) >= 3, lines
    assert re.fullmatch(r"train student: 10/10 \(100%\) elapsed 00:0\d, ETA 00:00, +[\d.]+ ?(it/s|s/it)", lines[-1])


def test_disabled_progress_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="calibration.progress")
    stream = io.StringIO()
    with Progress("coreset", 5, enabled=False, stream=stream, log_every_s=0.05) as bar:
        bar.update(5)
        time.sleep(0.2)
    assert caplog.records == [] and stream.getvalue() == ""
