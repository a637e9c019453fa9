"""The restart policy: backoff per stage, and the run ends non-zero when a stage keeps failing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.app.ports import free_port
from pipeline.restarts import RestartSchedule
from pipeline.settings import SourceConfig
from pipeline.supervisor import Pipeline
from tests.pipeline.test_runtime import run_config


def test_first_restart_is_immediate_then_the_wait_doubles_up_to_the_cap() -> None:
    schedule = RestartSchedule(max_restarts=6, window_s=100, backoff_s=1.0, backoff_max_s=5.0)
    waits = [schedule.failed(0, t) for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)]
    assert waits == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert schedule.failed(0, 6.0) is None  # the 7th failure within 100 s: one too many
    assert schedule.failed(1, 6.0) == 0.0  # each stage has its own count


def test_failures_older_than_the_window_are_forgotten() -> None:
    schedule = RestartSchedule(max_restarts=2, window_s=10, backoff_s=1.0, backoff_max_s=30.0)
    assert schedule.failed(0, 0.0) == 0.0 and schedule.failed(0, 5.0) == 1.0
    assert schedule.failed(0, 10.5) == 1.0  # the failure at 0 s has left the window: this is the 2nd again
    assert schedule.failed(0, 11.0) is None


def test_a_stage_that_crashes_on_every_start_ends_the_run_after_its_restarts(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    """Infer is killed once; its bundle is then unreadable, so every restart crashes at start. With 2
    restarts allowed and a 0.5 s backoff, the run stops on the third failure, at least 0.5 s later."""
    bundle = tmp_path / "bundle.pt"
    shutil.copy(bundle_path, bundle)
    killed: list[float] = []
    pipeline: Pipeline

    def on_verdict(rec: np.void) -> None:
        if not killed:
            bundle.write_bytes(b"not a bundle any more")
            infer = next(s for s in pipeline.stages if s.kind == "infer")
            assert infer.process is not None and infer.process.pid is not None
            os.kill(infer.process.pid, signal.SIGKILL)
            killed.append(time.monotonic())

    config = run_config(free_port(), max_restarts=2, restart_backoff_s=0.5, restart_window_s=300)
    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=600, loop=True)
    pipeline = Pipeline(config, bundle, (source,), on_verdict)
    summary = pipeline.run(duration_s=120, install_signals=False)
    took = time.monotonic() - killed[0]
    assert summary.failure is not None and "stage infer exited with code 2" in summary.failure
    assert "failure number 3 within 300 s (pipeline.max_restarts = 2)" in summary.failure
    assert summary.restarts_by_stage["infer"] == 2
    assert 0.5 <= took < 60  # the second restart waited its backoff; the run did not go on to its duration
    assert summary.frames == summary.verdicts + summary.drops  # every frame is still accounted for


def test_a_run_that_sees_no_frame_exits_non_zero_with_the_reason(bundle_path: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.app.cli", "run", "--bundle", str(bundle_path), "--duration", "3"]
        + ["--source", f"camera:{tmp_path / 'no-such-camera.avi'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LINEWATCH_METRICS__PORT": "0", "LINEWATCH_UI__ENABLED": "false"}
        | {"LINEWATCH_PUBLISHER__ADDRESS": f"tcp://127.0.0.1:{free_port()}"}
        | {"LINEWATCH_PUBLISHER__REPLAY_ADDRESS": f"tcp://127.0.0.1:{free_port()}"},
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("linewatch: run failed: no frame arrived from any source during the run: cam0 (camera:")
    assert "not connected" in last
    assert "cannot be opened; retrying in" in proc.stderr  # one line per backoff step while it ran


def test_a_folder_without_images_also_fails_the_run(bundle_path: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = run_config(free_port())
    summary = Pipeline(config, bundle_path, (SourceConfig(spec=f"folder:{empty}"),)).run(install_signals=False)
    assert summary.frames == 0 and summary.failure is not None and "no frame arrived" in summary.failure
