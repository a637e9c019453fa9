"""Every decision kept: the recorder stage, the spool, the image archive and the heartbeat, in real runs.

Real processes, real signals, a real SQLite file and a real PostgreSQL server that is stopped mid-run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from postgres_server import PostgresServer, server_binaries
from store_helpers import stored_messages
from test_runtime import Subscriber, _alive, _ppid

from calibration.datasets import MVTecCategory
from pipeline.app.cli import main
from pipeline.app.config import Config, config_from_dict, with_overrides
from pipeline.app.ports import free_port
from pipeline.settings import SourceConfig
from pipeline.store.verdicts import VerdictStore
from pipeline.supervisor import Pipeline, RunSummary


def store_config(data: Path, url: str | None = None, **store: Any) -> Config:
    return config_from_dict(
        {
            "pipeline": {"max_frame_height": 256, "max_frame_width": 256, "max_batch": 4},
            "publisher": {
                "address": f"tcp://127.0.0.1:{free_port()}",
                "replay_address": f"tcp://127.0.0.1:{free_port()}",
                "heartbeat_ms": 100,
            },
            "metrics": {"port": 0},
            "store": {"path": str(data), "url": url, **store},
        }
    )


def test_every_published_verdict_is_stored_once_with_the_images_of_rejects(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    config = store_config(tmp_path / "data", keep_pass_fraction=0.5)
    listener = Subscriber(config.publisher.address)
    listener.start()
    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=600)  # 10 parts/s: heartbeats in between
    pipeline = Pipeline(config, bundle_path, (source,))
    summary = pipeline.run(install_signals=False)
    time.sleep(0.3)
    listener.stop()

    n = len(MVTecCategory(small_category).test)
    assert summary.verdicts == n and summary.stored == n and summary.spooled == 0
    url = f"sqlite:///{tmp_path / 'data' / 'verdicts.sqlite'}"
    assert stored_messages(url, summary.run_id) == listener.messages  # the very messages that went out
    store = VerdictStore(url)
    rows = store.range(summary.run_id, 1, n)
    record = store.run_record(summary.run_id)
    store.close()
    assert record is not None and record["stopped_ns"] >= record["started_ns"]
    assert record["bundle_hash"] == pipeline.bundle_hash
    assert json.loads(record["config_json"])["store"]["keep_pass_fraction"] == 0.5
    # Every reject's frame and overlay are archived, and about half the passes'.
    rejects = [r for r in rows if r.verdict.verdict == "reject"]
    passes = [r for r in rows if r.verdict.verdict == "pass"]
    assert rejects and all(r.image_key for r in rejects)
    kept_passes = sum(r.image_key is not None for r in passes)
    assert 0 < kept_passes < len(passes)
    for r in rejects + [p for p in passes if p.image_key]:
        frame = cv2.imread(str(tmp_path / "data" / "images" / f"{r.image_key}.jpg"))
        overlay = cv2.imread(str(tmp_path / "data" / "images" / f"{r.image_key}.overlay.jpg"))
        assert frame is not None and frame.shape == (128, 128, 3) and overlay.shape == frame.shape
    # Heartbeats came between the verdicts, each saying how far the sequence had got.
    beats = listener.heartbeats
    assert len(beats) >= 5 and all(b.run == summary.run_id for b in beats)
    assert [b.seq for b in beats] == sorted(b.seq for b in beats) and beats[-1].seq == n
    assert beats[-1].topic_seqs["reject"] == summary.rejects


def test_a_killed_recorder_is_restarted_and_every_seq_is_stored_exactly_once(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    config = store_config(tmp_path / "data", buffer_slots=16)
    # Restarted at once however often it is killed: this test is about what gets stored, not the backoff.
    config = with_overrides(config, {"pipeline.max_restarts": 100, "pipeline.restart_backoff_s": 0})
    kills: list[int] = []
    first_verdict: list[float] = []
    pipeline: Pipeline

    def on_verdict(rec: np.void) -> None:
        # A kill a second, each of a recorder not killed before (a killed one looks alive until it is reaped),
        # in the first 6 s only: the supervisor restarts each well before the 14 s run stops.
        now = time.monotonic()
        first_verdict[:] = first_verdict or [now]
        recorder = next(s for s in pipeline.stages if s.kind == "recorder")
        p = recorder.process
        if p is None or p.pid is None or p.pid in kills or not p.is_alive():
            return
        if now - first_verdict[0] < 6.0 and now - first_verdict[0] >= len(kills):
            os.kill(p.pid, signal.SIGKILL)
            kills.append(p.pid)

    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=1200, loop=True)
    pipeline = Pipeline(config, bundle_path, (source,), on_verdict)
    summary = pipeline.run(duration_s=14, install_signals=False)
    assert len(kills) >= 2 and summary.restarts_by_stage["recorder"] == len(kills)
    url = f"sqlite:///{tmp_path / 'data' / 'verdicts.sqlite'}"
    seqs = [m["seq"] for m in stored_messages(url, summary.run_id)]
    assert seqs == list(range(1, summary.verdicts + 1))
    assert summary.stored == summary.verdicts


def test_a_decide_stage_killed_between_publishing_and_recording_loses_no_seq(
    bundle_path: Path, small_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINEWATCH_FAILPOINT", "decide_after_publish:10")  # SIGKILL right after sending seq 10
    config = store_config(tmp_path / "data")
    listener = Subscriber(config.publisher.address)
    listener.start()
    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=600)
    summary = Pipeline(config, bundle_path, (source,)).run(install_signals=False)
    time.sleep(0.3)
    listener.stop()

    n = len(MVTecCategory(small_category).test)
    assert summary.restarts_by_stage["decide"] == 1
    assert summary.verdicts == n and summary.stored == n and summary.frames == n
    stored = stored_messages(f"sqlite:///{tmp_path / 'data' / 'verdicts.sqlite'}", summary.run_id)
    assert [m["seq"] for m in stored] == list(range(1, n + 1))  # no seq lost, none given twice
    assert len({m["frame_id"] for m in stored}) == n  # every frame decided once
    # Every message that went out is the one stored under its seq. Seq 10 itself may not have: ZeroMQ's I/O
    # thread sends it, and the kill can come first. Its subscribers then see a gap that replay fills.
    assert listener.messages and all(m == stored[m["seq"] - 1] for m in listener.messages)
    assert stored[9]["frame_id"] == stored[8]["frame_id"] + 1


@pytest.fixture()
def own_postgres() -> Any:
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed here (apt-get install postgresql; .ci/run does)")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.remove()


def scrape(port: int | None) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("linewatch_store", "linewatch_archive", "linewatch_images")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_through_outage(
    config: Config, bundle: Path, category: Path, outage: Callable[[], Callable[[], None]], after_s: float
) -> tuple[RunSummary, list[int], dict[str, float]]:
    """A looping paced run whose store breaks once verdicts flow (`outage()` breaks it and returns what mends
    it), is mended 4 s later and stops `after_s` after that (however long the start took); returns the
    summary, the seqs a subscriber saw and /metrics during the outage."""
    listener = Subscriber(config.publisher.address)
    listener.start()
    scraped: list[dict[str, float]] = []
    flowing = threading.Event()
    pipeline: Pipeline

    def break_and_mend() -> None:
        flowing.wait(120)
        mend = outage()
        time.sleep(4)
        scraped.append(scrape(pipeline.metrics_port))
        mend()
        time.sleep(after_s)
        pipeline.request_stop()

    source = SourceConfig(spec=f"folder:{category}", rate_ppm=1200, loop=True)
    pipeline = Pipeline(config, bundle, (source,), lambda rec: flowing.set() if rec["frame_id"] >= 20 else None)
    thread = threading.Thread(target=break_and_mend)
    thread.start()
    summary = pipeline.run(duration_s=180, install_signals=False)
    thread.join()
    time.sleep(0.3)
    listener.stop()
    return summary, [m["seq"] for m in listener.messages], scraped[0]


def test_a_stopped_database_loses_nothing_and_the_backlog_is_bounded_and_visible(
    bundle_path: Path, small_category: Path, tmp_path: Path, own_postgres: PostgresServer
) -> None:
    config = store_config(tmp_path / "data", own_postgres.url, buffer_slots=16, image_slots=4)

    def outage() -> Callable[[], None]:
        own_postgres.stop()
        return own_postgres.start

    summary, published, during = run_through_outage(config, bundle_path, small_category, outage, after_s=6)
    # The line went on deciding and publishing through the outage ...
    assert published == list(range(1, summary.verdicts + 1)) and summary.verdicts > 100
    # ... the buffer filled and the rest was spooled, which the metrics showed ...
    assert summary.spooled > 0 and summary.store_lost == 0
    assert during["linewatch_store_backlog"] > 16 and during["linewatch_store_errors_total"] > 0
    assert during["linewatch_store_writes_total"] > 0 and during["linewatch_archive_bytes"] > 0
    assert during["linewatch_images_expired_total"] == 0 and during["linewatch_store_lost_total"] == 0
    # ... and once the database was back, every verdict was written, once.
    assert [m["seq"] for m in stored_messages(own_postgres.url, summary.run_id)] == published
    assert summary.stored == summary.verdicts
    assert not list((tmp_path / "data" / "spool").glob("*.seg")) and not list(
        (tmp_path / "data" / "spool").glob("*.part")
    )


@pytest.mark.parametrize("group", [True, False], ids=["process-group", "supervisor-alone"])
def test_sigkill_of_the_run_keeps_every_verdict_older_than_200_ms(
    bundle_path: Path, small_category: Path, tmp_path: Path, group: bool
) -> None:
    """Killing the whole process group leaves no process to store the buffer: verdicts published more than
    200 ms before are stored. Killing `linewatch run` alone, its stages store the buffer before exiting."""
    before = set(os.listdir("/dev/shm"))
    data = tmp_path / "data"
    config = store_config(data)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(
        json.dumps(
            {
                "pipeline": {
                    "max_frame_height": 256,
                    "max_frame_width": 256,
                    "sources": [{"spec": f"folder:{small_category}", "loop": True, "rate_ppm": 1200}],
                },
                "publisher": {"address": config.publisher.address, "replay_address": config.publisher.replay_address},
                "metrics": {"port": 0},
                "store": {"path": str(data)},
            }
        )
    )
    listener = Subscriber(config.publisher.address)
    listener.start()
    received: list[tuple[float, int]] = []
    cmd = [sys.executable, "-m", "pipeline.app.cli", "run", "--bundle", str(bundle_path), "--config", str(config_file)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 90
        while len(listener.messages) < 30 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(listener.messages) >= 30, "the run published too little before the kill"
        time.sleep(1.0)
        stages = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == proc.pid]
        if group:
            os.killpg(proc.pid, signal.SIGKILL)  # linewatch and every stage at once: nobody gets to clean up
        else:
            os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(10)
        deadline = time.monotonic() + 40  # orphaned stages see their parent gone and exit
        while any(_alive(p) for p in stages) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in stages)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.3)
    listener.stop()
    received = [(t, m["seq"]) for t, m in zip(listener.received_at, listener.messages, strict=True)]
    old_enough = [seq for t, seq in received if t < killed_at - 0.2]
    run = listener.messages[0]["run"]
    url = f"sqlite:///{data / 'verdicts.sqlite'}"
    stored = {m["seq"] for m in stored_messages(url, run)}  # the store opens cleanly after the kill
    assert old_enough and set(old_enough) <= stored
    if not group:
        assert {seq for _, seq in received} <= stored  # the orphaned recorder stored the whole buffer
    for name in set(os.listdir("/dev/shm")) - before:  # what the killed run could not unlink
        if name.startswith("psm_"):
            os.unlink(f"/dev/shm/{name}")


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all, just bytes" * 100, "foreign"],
    ids=["corrupt", "foreign"],
)
def test_a_corrupt_or_foreign_store_is_refused_at_start_in_one_line(
    bundle_path: Path, tmp_path: Path, content: bytes | str, capfd: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "verdicts.sqlite"
    if content == "foreign":
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    else:
        db.write_bytes(content)  # type: ignore[arg-type]
    config = tmp_path / "c.yaml"
    config.write_text(f"store:\n  path: {data}\nmetrics:\n  port: 0\n")
    code = main(["run", "--bundle", str(bundle_path), "--config", str(config), "--source", "camera:0"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(db) in err[0], err
    assert ("not a linewatch verdict store" if content == "foreign" else "cannot open") in err[0]


def test_a_wrong_database_password_is_refused_at_start_in_one_line(
    bundle_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    config = tmp_path / "c.yaml"
    config.write_text(
        f"store:\n  path: {tmp_path / 'data'}\n  url: postgresql+psycopg://linewatch:secret@127.0.0.1:{port}/lw\n"
        "metrics:\n  port: 0\n"
    )
    code = main(["run", "--bundle", str(bundle_path), "--config", str(config), "--source", "camera:0"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "secret" not in err[0] and f"127.0.0.1:{port}" in err[0], err


REPO = Path(__file__).resolve().parents[2]
BRIDGE_LINE = re.compile(r"^(REJECT|ERROR) run (\S+) seq (\d+):")


def start_bridge(config: Config, state: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "linewatch_plc.cli", "log", "--address", config.publisher.address]
    argv += ["--replay-address", config.publisher.replay_address, "--state", str(state)]
    with log.open("a") as out:
        env = {**os.environ, "PYTHONPATH": str(REPO / "plc")}
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_a_bridge_started_late_and_killed_mid_run_ends_with_every_reject_of_the_real_run(
    bundle_path: Path, small_category: Path, tmp_path: Path
) -> None:
    config = store_config(tmp_path / "data")
    state, log = tmp_path / "bridge.json", tmp_path / "bridge.log"
    bridges: list[subprocess.Popen[bytes]] = []
    flowing = threading.Event()

    def bridge_comes_and_goes() -> None:
        flowing.wait(120)
        time.sleep(1.5)  # a second and a half of rejects published before the bridge exists
        bridges.append(start_bridge(config, state, log))
        time.sleep(2.5)
        bridges[-1].send_signal(signal.SIGKILL)  # killed mid-run ...
        bridges[-1].wait()
        time.sleep(1.5)
        bridges.append(start_bridge(config, state, log))  # ... and back with its state

    source = SourceConfig(spec=f"folder:{small_category}", rate_ppm=1200, loop=True)
    pipeline = Pipeline(config, bundle_path, (source,), lambda rec: flowing.set())
    thread = threading.Thread(target=bridge_comes_and_goes)
    thread.start()
    try:
        summary = pipeline.run(duration_s=14, install_signals=False)
        thread.join()
        url = f"sqlite:///{tmp_path / 'data' / 'verdicts.sqlite'}"
        wanted = {m["seq"] for m in stored_messages(url, summary.run_id) if m["verdict"] != "pass"}
        assert summary.stored == summary.verdicts and len(wanted) == summary.rejects + summary.errors > 20

        def handled() -> list[int]:
            matches = (BRIDGE_LINE.match(line) for line in log.read_text().splitlines())
            return [int(m[3]) for m in matches if m is not None and m[2] == summary.run_id]

        deadline = time.monotonic() + 30  # the replay endpoint is gone with the run: all came before its end
        while set(handled()) != wanted and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = handled()
        assert set(seen) == wanted
        assert len(seen) - len(set(seen)) <= 1  # at least once: the message in hand when it was killed
        assert any("(replayed)" in line for line in log.read_text().splitlines())
    finally:
        for bridge in bridges:
            if bridge.poll() is None:
                bridge.kill()
                bridge.wait()


@pytest.fixture()
def tiny_filesystem(tmp_path: Path) -> Any:
    """A 2 MB tmpfs: a disk that fills up for real (needs mount rights; skipped where there are none)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Take every free byte of `folder`'s filesystem with one file."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_under_the_database_loses_nothing_once_space_is_back(
    bundle_path: Path, small_category: Path, tmp_path: Path, tiny_filesystem: Path
) -> None:
    url = f"sqlite:///{tiny_filesystem / 'verdicts.sqlite'}"
    config = store_config(tmp_path / "data", url, buffer_slots=16, image_slots=4)

    def outage() -> Callable[[], None]:
        return fill(tiny_filesystem).unlink

    summary, published, during = run_through_outage(config, bundle_path, small_category, outage, after_s=3)
    assert published == list(range(1, summary.verdicts + 1)) and summary.spooled > 0 and summary.store_lost == 0
    assert during["linewatch_store_backlog"] > 16 and during["linewatch_store_errors_total"] > 0
    assert [m["seq"] for m in stored_messages(url, summary.run_id)] == published
