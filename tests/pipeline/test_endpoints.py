"""/healthz, /readyz and the systemd notify protocol, on real runs: a real HTTP server, real processes,
real signals and a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.app.config import with_overrides
from pipeline.app.ports import free_port
from pipeline.endpoints import RunProbe
from pipeline.service import ServiceNotifier
from pipeline.settings import SourceConfig
from pipeline.supervisor import Pipeline
from tests.pipeline.test_runtime import run_config, write_stream


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_probe_is_live_while_the_loop_passes_and_ready_without_problems() -> None:
    now = [100.0]
    probe = RunProbe(stall_s=2.0, clock=lambda: now[0])
    assert probe.live() == (True, "ok") and not probe.ready()[0]  # starting
    probe.set_problems([])
    assert probe.ready() == (True, "ok")
    probe.set_problems(["camera cam0 (camera:7) not connected"])
    assert probe.ready() == (False, "camera cam0 (camera:7) not connected")
    now[0] += 2.5
    live, why = probe.live()
    assert not live and why == "supervisor loop stalled: last pass 2.5 s ago (bound 2 s)"
    probe.passed()
    assert probe.live()[0]


def test_notifier_speaks_systemds_protocol_and_rate_limits_the_watchdog(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(1)
        notifier = ServiceNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        notifier.ready()
        notifier.watchdog(10.0)
        notifier.watchdog(10.1)  # within a quarter of WatchdogSec: not sent again
        notifier.watchdog(10.6)
        notifier.status("inspecting")
        notifier.status("inspecting")  # unchanged: not sent again
        notifier.close()
        got = [sock.recv(256).decode() for _ in range(4)]
    assert got == ["READY=1", "WATCHDOG=1", "WATCHDOG=1", "STATUS=inspecting"]
    # Another process's watchdog (WATCHDOG_PID) and no socket at all: nothing to do, nothing raised.
    assert ServiceNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog_s == 0
    ServiceNotifier({}).ready()


def test_healthz_fails_while_the_supervisor_loop_is_stuck(bundle_path: Path, small_category: Path) -> None:
    """The loop is held up in the verdict callback (as a slow consumer would hold it); the HTTP thread still
    answers, and says the loop is stalled."""
    seen: dict[str, tuple[int, str]] = {}
    pipeline: Pipeline

    verdicts: list[int] = []

    def on_verdict(rec: np.void) -> None:
        verdicts.append(1)
        if seen or len(verdicts) < 10:  # by the 10th verdict (1 s) readiness was refreshed with the camera up
            return
        url = f"http://127.0.0.1:{pipeline.metrics_port}"
        seen["ready"] = get(f"{url}/readyz")
        seen["before"] = get(f"{url}/healthz")
        time.sleep(2.5)  # the loop is stuck here
        seen["stuck"] = get(f"{url}/healthz")
        seen["stuck_metrics"] = get(f"{url}/metrics")

    config = with_overrides(run_config(free_port()), {"metrics.stall_s": 1.0})
    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=600)
    pipeline = Pipeline(config, bundle_path, (source,), on_verdict)
    pipeline.run(duration_s=6, install_signals=False)
    assert seen["ready"] == (200, "ok\n") and seen["before"] == (200, "ok\n")
    status, body = seen["stuck"]
    assert status == 503 and body.startswith("supervisor loop stalled: last pass ")
    assert "\nlinewatch_up 0.0\n" in seen["stuck_metrics"][1]


def test_a_real_run_under_a_stand_in_systemd(bundle_path: Path, small_category: Path, tmp_path: Path) -> None:
    """READY once the model is loaded, watchdog pings from the loop (none while the process is SIGSTOPped,
    when /healthz cannot answer either), /readyz failing while the camera is unplugged, STOPPING at the end."""
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        sock.settimeout(0.2)
        while not done.is_set():
            try:
                messages.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                continue

    threading.Thread(target=listen, daemon=True).start()
    stream = tmp_path / "camera.avi"  # a file opened as a camera: deleting it unplugs the camera for good
    write_stream(small_category, stream, passes=20)
    port = free_port()
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify),
        "WATCHDOG_USEC": "1000000",
        "LINEWATCH_METRICS__PORT": str(port),
        "LINEWATCH_UI__ENABLED": "false",
        "LINEWATCH_STORE__ENABLED": "false",
        "LINEWATCH_PUBLISHER__ADDRESS": f"tcp://127.0.0.1:{free_port()}",
        "LINEWATCH_PIPELINE__SOURCES": f'[{{spec: "camera:{stream}", id: line, reconnect_max_s: 0.5}}]',
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.app.cli", "run", "--bundle", str(bundle_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get_or_none(f"{url}/readyz") == (200, "ok\n"), 120, "the run never became ready")
        assert get(f"{url}/healthz") == (200, "ok\n")
        os.kill(proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert get_or_none(f"{url}/healthz", timeout=2.0) is None  # a frozen box answers nothing
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        wait_for(lambda: get_or_none(f"{url}/healthz") == (200, "ok\n"), 10, "healthz did not come back")
        stream.unlink()  # unplugged: reads fail, and every reopen too
        wait_for(lambda: "camera line" in (get_or_none(f"{url}/readyz") or (0, ""))[1], 30, "readyz stayed ok")
        status, body = get(f"{url}/readyz")
        assert status == 503 and body.strip() == f"camera line (camera:{stream}) not connected"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        done.set()
    time.sleep(0.3)
    sock.close()
    texts = [m for _, m in messages]
    assert texts.count("READY=1") == 1 and texts.count("STOPPING=1") == 1
    assert texts.index("READY=1") < texts.index("STOPPING=1")
    pings = [t for t, m in messages if m == "WATCHDOG=1"]
    assert len(pings) > 5
    assert not [t for t in pings if stopped_at + 0.1 < t < resumed_at]  # a stopped loop pings nobody
    assert any(m.startswith("STATUS=camera line (camera:") for m in texts)


def get_or_none(url: str, timeout: float = 2.0) -> tuple[int, str] | None:
    try:
        return get(url, timeout)
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None


def wait_for(condition: Callable[[], bool], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def test_readyz_follows_a_replayed_folder_that_goes_away_and_comes_back(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "line"
    shutil.copytree(small_category / "test", folder)
    seen: list[tuple[int, str]] = []
    verdicts_after_return: list[int] = []
    pipeline: Pipeline

    def on_verdict(rec: np.void) -> None:
        if seen and seen[-1][0] == 503 and (tmp_path / "line").is_dir():
            verdicts_after_return.append(int(rec["frame_id"]))

    def unplug_and_replug() -> None:
        wait_for(lambda: pipeline.metrics_port is not None, 60, "metrics never served")
        url = f"http://127.0.0.1:{pipeline.metrics_port}/readyz"
        wait_for(lambda: get_or_none(url) == (200, "ok\n"), 60, "never ready")
        folder.rename(tmp_path / "away")
        wait_for(lambda: (get_or_none(url) or (0, ""))[0] == 503, 20, "readyz stayed ok")
        seen.append(get(url))
        (tmp_path / "away").rename(folder)
        wait_for(lambda: get_or_none(url) == (200, "ok\n"), 20, "readyz did not come back")

    source = SourceConfig(spec=f"folder:{folder}", rate_ppm=1200, loop=True, reconnect_max_s=0.5)
    pipeline = Pipeline(run_config(free_port()), bundle_path, (source,), on_verdict)
    helper = threading.Thread(target=unplug_and_replug, daemon=True)
    helper.start()
    summary = pipeline.run(duration_s=25, install_signals=False)
    helper.join(1)
    assert seen == [(503, f"camera cam0 (folder:{folder}) not connected\n")]
    assert summary.cameras["cam0"]["reconnects"] >= 1 and verdicts_after_return  # the line went on
    assert summary.failure is None and summary.frames == summary.verdicts + summary.drops
