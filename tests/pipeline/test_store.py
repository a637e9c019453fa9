"""The verdict store on SQLite and on a real PostgreSQL server: stored once per (run, seq), replayed as the
published bytes, loud refusals, nothing lost when the writer is killed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from pipeline.app.ports import free_port
from pipeline.store.verdicts import StoredVerdict, StoreError, VerdictStore, sqlite_url
from pipeline.wire import Verdict, encode

T0 = 1_764_748_800_000_000_000  # ns since the epoch, as on the wire


def verdicts(run: str, n: int, start: int = 1) -> list[StoredVerdict]:
    out = []
    for seq in range(start, start + n):
        kind = ("pass", "reject", "error")[seq % 3]
        v = Verdict(
            camera_id=f"cam{seq % 2}",
            frame_id=seq // 2,
            t_capture_ns=T0 + seq * 1_000_003,
            t_decision_ns=T0 + seq * 1_000_003 + 12_345_678,
            score=None if kind == "error" else 0.1 * seq + 1 / 3,
            threshold=25.49,
            verdict=kind,
            trigger=None if seq % 5 else seq * 7,
        )
        out.append(StoredVerdict(run, seq, seq // 3 + 1, v, "ab" * 32, None))
    return out


@pytest.fixture()
def store(store_url: str) -> Iterator[VerdictStore]:
    s = VerdictStore(store_url)
    yield s
    s.close()


def test_a_verdict_is_stored_once_and_replayed_as_the_published_bytes(store: VerdictStore) -> None:
    batch = verdicts("run-a", 50)
    assert store.write(batch[:30]) == 30
    store.close()
    again = VerdictStore(store.url)  # a restarted recorder, writing what it had in hand
    assert again.write(batch[20:]) == 20
    assert again.count("run-a") == 50
    replayed = again.range("run-a", 11, 40)
    assert [r.seq for r in replayed] == list(range(11, 41))
    assert [r.message() for r in replayed] == [
        encode(v.run, v.seq, v.topic_seq, v.verdict, v.bundle) for v in batch[10:40]
    ]
    assert again.range("run-b", 1, 50) == [] and again.range("run-a", 60, 70) == []
    again.close()


def test_runs_are_recorded_with_their_bundle_and_config(store: VerdictStore) -> None:
    store.start_run("run-a", "ab" * 32, "/data/line.pt", {"pipeline": {"max_batch": 2}}, T0)
    store.start_run("run-a", "ab" * 32, "/data/line.pt", {"pipeline": {"max_batch": 2}}, T0 + 5)  # a restart: kept
    record = store.run_record("run-a")
    assert record is not None and record["started_ns"] == T0 and record["stopped_ns"] is None
    assert record["config_json"] == '{"pipeline": {"max_batch": 2}}'
    store.stop_run("run-a", T0 + 10**9)
    assert store.run_record("run-a")["stopped_ns"] == T0 + 10**9  # type: ignore[index]
    assert store.run_record("run-b") is None


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    store = VerdictStore(sqlite_url(tmp_path / "store.db"))
    store.write(verdicts("run-a", 1))
    store.close()
    with sqlite3.connect(tmp_path / "store.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_corrupt_foreign_or_newer_store_is_refused_in_one_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database file at all, just text" * 40)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE parts (serial TEXT)")
    newer = tmp_path / "newer.db"
    VerdictStore(sqlite_url(newer)).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'")
    cases = {
        corrupt: "cannot open the verdict store (file is not a database)",
        foreign: "not a linewatch verdict store (it has tables parts; missing runs, store_meta, verdicts)",
        newer: "verdict store schema version '99' is not supported by this linewatch (supports <= 1); "
        "upgrade linewatch",
        tmp_path / "no" / "such" / "dir" / "s.db": "cannot open the verdict store (unable to open database file)",
    }
    for path, message in cases.items():
        with pytest.raises(StoreError) as info:
            VerdictStore(sqlite_url(path))
        assert str(info.value) == f"{path}: {message}"
    assert foreign.read_bytes()[:16] == b"SQLite format 3\x00"  # a refused store is left as it was


def _write_forever(url: str, ready: mp.synchronize.Event) -> None:  # pragma: no cover - child process
    store = VerdictStore(url)
    seq = 1
    while True:
        store.write(verdicts("run-k", 20, seq))
        seq += 20
        ready.set()


def test_a_writer_killed_mid_batch_leaves_a_store_that_opens_and_completes(store_url: str) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    writer = ctx.Process(target=_write_forever, args=(store_url, ready))
    writer.start()
    assert ready.wait(60)
    time.sleep(0.5)
    os.kill(writer.pid, signal.SIGKILL)  # type: ignore[arg-type]
    writer.join(10)
    store = VerdictStore(store_url)
    written = store.count("run-k")
    assert written > 0 and written % 20 == 0  # whole batches only: a killed transaction leaves nothing
    assert [r.seq for r in store.range("run-k", 1, written)] == list(range(1, written + 1))
    assert store.write(verdicts("run-k", written + 40)) == 40  # what it had in hand, written again: only the new
    assert store.count("run-k") == written + 40
    store.close()


def test_a_wrong_postgresql_address_or_user_is_refused_in_one_line(postgres_url: str) -> None:
    url = make_url(postgres_url)
    wrong_user = url.set(username="nobody").render_as_string(hide_password=False)
    with pytest.raises(StoreError, match=r'role "nobody" does not exist\)$') as info:
        VerdictStore(wrong_user)
    assert str(info.value).startswith(f"postgresql+psycopg://nobody@127.0.0.1:{url.port}/postgres: cannot open")
    closed = url.set(port=free_port(), password="secret").render_as_string(hide_password=False)
    with pytest.raises(StoreError, match=r"cannot open the verdict store \(.*connect.*\)$") as info:
        VerdictStore(closed)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
