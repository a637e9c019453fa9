"""The verdict store on SQLite and on a real PostgreSQL server: stored once per (run, seq), replayed as the
published bytes, searched, images marked expired, older stores upgraded, loud refusals, nothing lost when
the writer is killed."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from postgres_server import new_database
from sqlalchemy import BigInteger, Column, Connection, create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from linewatch_plc.wire import Verdict, encode
from pipeline.app.ports import free_port
from pipeline.store.keys import image_key
from pipeline.store.migrations import MIGRATIONS, Migration, add_column, apply_step, check_steps
from pipeline.store.schema import SCHEMA_VERSION
from pipeline.store.verdicts import (
    HistoryFilter,
    StoredVerdict,
    StoreError,
    VerdictStore,
    public_url,
    sqlite_url,
)

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
    newer, unknown = tmp_path / "newer.db", tmp_path / "unknown.db"
    for path, version in ((newer, "99"), (unknown, "0")):
        VerdictStore(sqlite_url(path)).close()
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE store_meta SET value = ? WHERE key = 'schema_version'", (version,))
    cases = {
        corrupt: "cannot open the verdict store (file is not a database)",
        foreign: "not a linewatch verdict store (it has tables parts; missing runs, store_meta, verdicts)",
        newer: f"verdict store schema version '99' is not supported by this linewatch (supports <= {SCHEMA_VERSION}); "
        "upgrade linewatch",
        unknown: "verdict store schema version '0' is not one linewatch makes",
        tmp_path / "no" / "such" / "dir" / "s.db": "cannot open the verdict store (unable to open database file)",
    }
    for path, message in cases.items():
        with pytest.raises(StoreError) as info:
            VerdictStore(sqlite_url(path))
        assert str(info.value) == f"{path}: {message}"
    assert foreign.read_bytes()[:16] == b"SQLite format 3\x00"  # a refused store is left as it was


def test_a_reader_does_not_create_a_store_where_there_is_none(store_url: str) -> None:
    with pytest.raises(StoreError) as info:
        VerdictStore(store_url, create=False)
    if store_url.startswith("sqlite:///"):
        path = Path(store_url.removeprefix("sqlite:///"))
        assert str(info.value) == f"{path}: no verdict store here (no such file)" and not path.exists()
    else:
        where = make_url(store_url).render_as_string(hide_password=True)
        assert str(info.value) == f"{where}: no verdict store here (the database has no tables)"
        engine = create_engine(store_url)
        assert inspect(engine).get_table_names() == []
        engine.dispose()
    VerdictStore(store_url).close()
    VerdictStore(store_url, create=False).close()  # once made, it opens


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


def with_images(batch: list[StoredVerdict]) -> list[StoredVerdict]:
    """The batch with an image key on every reject and every fourth row."""
    return [
        dataclasses.replace(v, image_key=image_key(v.run, v.seq, v.verdict.camera_id, v.verdict.t_capture_ns))
        if v.verdict.verdict == "reject" or v.seq % 4 == 0
        else v
        for v in batch
    ]


def test_search_filters_by_time_camera_verdict_score_and_run(store: VerdictStore) -> None:
    stored = verdicts("run-a", 60) + verdicts("run-b", 30, start=100)
    store.write(stored)
    t = sorted(v.verdict.t_decision_ns for v in stored)
    since, until = t[10], t[50]

    def expected(keep: Callable[[StoredVerdict], bool], newest_first: bool = True) -> list[StoredVerdict]:
        rows = [v for v in stored if keep(v)]
        return sorted(rows, key=lambda v: (v.verdict.t_decision_ns, v.run, v.seq), reverse=newest_first)

    f = HistoryFilter(since_ns=since, until_ns=until, camera="cam1", verdict="reject")
    assert store.search(f) == expected(
        lambda v: (
            since <= v.verdict.t_decision_ns < until and v.verdict.camera_id == "cam1" and v.verdict.verdict == "reject"
        )
    )
    f = HistoryFilter(min_score=3.0, max_score=6.0, run="run-a", newest_first=False)
    got = store.search(f)
    assert got == expected(
        lambda v: v.run == "run-a" and v.verdict.score is not None and 3.0 <= v.verdict.score <= 6.0, newest_first=False
    )
    assert got and all(v.verdict.verdict != "error" for v in got)
    assert store.search(HistoryFilter(limit=7)) == expected(lambda v: True)[:7]
    assert store.search(HistoryFilter(limit=None)) == expected(lambda v: True)
    assert store.search(HistoryFilter(camera="cam9")) == []


def test_runs_are_listed_newest_first(store: VerdictStore) -> None:
    for i, run in enumerate(["run-old", "run-new", "run-mid"]):
        store.start_run(run, "ab" * 32, f"/data/{run}.pt", {"i": i}, T0 + (0, 20, 10)[i])
    assert [r["run_id"] for r in store.runs_list()] == ["run-new", "run-mid", "run-old"]
    assert store.runs_list()[0] == store.run_record("run-new")


def test_expired_images_are_marked_by_key_and_the_rows_stay(store: VerdictStore) -> None:
    stored = with_images(verdicts("run-a", 40))
    store.write(stored)
    keyed = [v for v in stored if v.image_key is not None]
    gone = [v.image_key for v in keyed[: len(keyed) // 2]]
    stale = image_key("run-a", keyed[-1].seq, "another-camera", T0)  # that row's seq, not its key
    assert store.mark_expired([*gone, stale], T0 + 99) == len(gone)
    assert store.mark_expired(gone, T0 + 500) == 0  # already marked: the first time stays
    assert store.count("run-a") == 40
    expired = {v.image_key for v in store.range("run-a", 1, 40) if v.image_expired_ns == T0 + 99}
    assert expired == set(gone)
    assert store.mark_expired([], T0) == 0
    with pytest.raises(ValueError, match=r"image key 'run-a/7': expected YYYY-MM-DD/CAMERA/RUN-SEQ"):
        store.mark_expired(["run-a/7"], T0)


def test_passes_with_images_leave_out_rejects_plain_rows_and_expired_images(store: VerdictStore) -> None:
    stored = with_images(verdicts("run-a", 60))
    store.write(stored)
    passes = [v for v in stored if v.verdict.verdict == "pass" and v.image_key is not None]
    store.mark_expired([passes[0].image_key], T0)  # type: ignore[list-item]
    since, until = T0, stored[-1].verdict.t_decision_ns  # the last row is after the window
    want = [v for v in passes[1:] if since <= v.verdict.t_decision_ns < until]
    assert store.passes_with_images(since, until) == want and len(want) >= 3
    assert store.passes_with_images(since, until, camera="cam0") == [v for v in want if v.verdict.camera_id == "cam0"]


def test_verdict_counts_count_each_kind_the_filter_selects(store: VerdictStore) -> None:
    stored = verdicts("run-a", 60) + verdicts("run-b", 30, start=100)
    store.write(stored)
    t = sorted(v.verdict.t_decision_ns for v in stored)
    for f in (
        HistoryFilter(limit=5),  # the limit does not apply to a count
        HistoryFilter(since_ns=t[10], until_ns=t[50], camera="cam1"),
        HistoryFilter(run="run-b", verdict="pass"),
    ):
        counts = Counter(v.verdict.verdict for v in store.search(dataclasses.replace(f, limit=None)))
        assert store.verdict_counts(f) == dict(counts) and sum(counts.values()) > 5
    assert store.verdict_counts(HistoryFilter(camera="cam9")) == {}


def test_a_store_url_is_written_down_without_its_password() -> None:
    assert public_url("postgresql+psycopg://line:s3cret@db.example/linewatch") == (
        "postgresql+psycopg://line:***@db.example/linewatch"
    )
    assert public_url("sqlite:////srv/line3/linewatch-data/verdicts.sqlite") == (
        "sqlite:////srv/line3/linewatch-data/verdicts.sqlite"
    )


# Version 1 of the schema, as its stores were made: the tables without verdicts.image_expired_ns.
V1_DDL = (
    "CREATE TABLE store_meta (key VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE runs (run_id VARCHAR(64) NOT NULL PRIMARY KEY, started_ns BIGINT NOT NULL, stopped_ns BIGINT, "
    "bundle_hash VARCHAR(64) NOT NULL, bundle_path TEXT NOT NULL, config_json TEXT NOT NULL)",
    "CREATE TABLE verdicts (run_id VARCHAR(64) NOT NULL, seq BIGINT NOT NULL, topic_seq BIGINT NOT NULL, "
    'camera_id VARCHAR(128) NOT NULL, frame_id BIGINT NOT NULL, "trigger" BIGINT, t_capture_ns BIGINT NOT NULL, '
    "t_decision_ns BIGINT NOT NULL, score DOUBLE PRECISION, threshold DOUBLE PRECISION NOT NULL, "
    "verdict VARCHAR(16) NOT NULL, bundle VARCHAR(64) NOT NULL, image_key TEXT, PRIMARY KEY (run_id, seq))",
    "CREATE INDEX ix_verdicts_time ON verdicts (t_decision_ns)",
    "CREATE INDEX ix_verdicts_camera_time ON verdicts (camera_id, t_decision_ns)",
    "INSERT INTO store_meta (key, value) VALUES ('schema_version', '1')",
)
V1_COLUMNS = (
    "run_id, seq, topic_seq, camera_id, frame_id, trigger, t_capture_ns, t_decision_ns, score, threshold, verdict, "
    "bundle, image_key"
)


def make_v1_store(url: str, rows: list[StoredVerdict]) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in V1_DDL:
            conn.execute(text(statement))
        names = V1_COLUMNS.split(", ")
        quoted = ", ".join(f'"{n}"' for n in names)  # "trigger" is an SQL keyword
        insert = f"INSERT INTO verdicts ({quoted}) VALUES (" + ", ".join(f":{n}" for n in names) + ")"
        conn.execute(text(insert), [{n: v.row()[n] for n in names} for v in rows])
        conn.execute(
            text("INSERT INTO runs VALUES ('run-a', :t, NULL, :h, '/data/line.pt', '{}')"), {"t": T0, "h": "ab" * 32}
        )
    engine.dispose()


def schema_version(url: str) -> str:
    engine = create_engine(url)
    with engine.connect() as conn:
        version = conn.execute(text("SELECT value FROM store_meta WHERE key = 'schema_version'")).scalar_one()
    engine.dispose()
    return str(version)


def verdict_columns(url: str) -> list[str]:
    engine = create_engine(url)
    names = [c["name"] for c in inspect(engine).get_columns("verdicts")]
    engine.dispose()
    return names


def schema_shape(url: str) -> dict[str, tuple[list[str], list[str]]]:
    """Every table's columns and index names."""
    engine = create_engine(url)
    found = inspect(engine)
    shape = {
        t: ([c["name"] for c in found.get_columns(t)], sorted(str(i["name"]) for i in found.get_indexes(t)))
        for t in found.get_table_names()
    }
    engine.dispose()
    return shape


def test_the_migration_steps_reach_the_schema_version_one_at_a_time() -> None:
    check_steps(MIGRATIONS)
    skipped = SCHEMA_VERSION + 2  # a step that jumps over a version
    reached = [*range(2, SCHEMA_VERSION + 1), skipped]
    with pytest.raises(
        ValueError, match=re.escape(f"reach versions {reached}; expected {[*reached[:-1], skipped - 1, skipped]}")
    ):
        check_steps([*MIGRATIONS, dataclasses.replace(MIGRATIONS[0], to_version=skipped)], last=skipped)


def test_a_version_1_store_is_upgraded_on_open_and_keeps_its_rows(
    store_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = with_images(verdicts("run-a", 30))
    make_v1_store(store_url, rows)
    assert schema_version(store_url) == "1" and "image_expired_ns" not in verdict_columns(store_url)
    caplog.set_level(logging.INFO, logger="pipeline.store.verdicts")
    store = VerdictStore(store_url)
    assert schema_version(store_url) == str(SCHEMA_VERSION)
    assert [r.getMessage() for r in caplog.records] == [
        f"{store.where}: verdict store upgraded to schema version {m.to_version}: {m.description}" for m in MIGRATIONS
    ]
    assert store.range("run-a", 1, 30) == rows
    assert store.run_record("run-a")["bundle_path"] == "/data/line.pt"  # type: ignore[index]
    kept = next(r for r in rows if r.image_key is not None)
    assert store.mark_expired([kept.image_key], T0 + 7) == 1  # type: ignore[list-item]
    expired = dataclasses.replace(kept, image_expired_ns=T0 + 7)
    assert store.range("run-a", kept.seq, kept.seq) == [expired]
    store.close()
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    VerdictStore(fresh).close()
    assert verdict_columns(store_url) == verdict_columns(fresh)  # upgraded = made new
    assert schema_shape(store_url) == schema_shape(fresh)

    caplog.clear()
    again = VerdictStore(store_url)  # already current: nothing to do
    assert caplog.records == [] and schema_version(store_url) == str(SCHEMA_VERSION)
    assert again.range("run-a", 1, 30) == [expired if r.seq == kept.seq else r for r in rows]
    assert again.write(verdicts("run-a", 35)) == 5
    again.close()
    engine = create_engine(store_url)
    assert apply_step(engine, MIGRATIONS[-1]) is False  # another process already upgraded it: skipped
    engine.dispose()


def _add_then_fail(conn: Connection) -> None:
    add_column("verdicts", Column("image_expired_ns", BigInteger))(conn)
    conn.execute(text("SELECT no_such_column FROM verdicts"))


def test_a_failed_step_leaves_the_store_at_the_version_before(store_url: str) -> None:
    rows = verdicts("run-a", 5)
    make_v1_store(store_url, rows)
    engine = create_engine(store_url)
    with pytest.raises(SQLAlchemyError, match="no_such_column"):
        apply_step(engine, Migration(2, "adds a column, then fails", _add_then_fail))
    engine.dispose()
    assert schema_version(store_url) == "1" and "image_expired_ns" not in verdict_columns(store_url)
    store = VerdictStore(store_url)  # the real step upgrades it as if nothing had happened
    assert schema_version(store_url) == str(SCHEMA_VERSION) and store.range("run-a", 1, 5) == rows
    store.close()


def test_an_upgrade_that_fails_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "half.db"
    make_v1_store(sqlite_url(path), verdicts("run-a", 3))
    with sqlite3.connect(path) as conn:  # a store edited by hand: version 1 with the version-2 column
        conn.execute("ALTER TABLE verdicts ADD COLUMN image_expired_ns BIGINT")
    with pytest.raises(StoreError) as info:
        VerdictStore(sqlite_url(path))
    step = MIGRATIONS[0]
    assert str(info.value) == (
        f"{path}: upgrading the verdict store to schema version 2 ({step.description}) failed "
        "(duplicate column name: image_expired_ns); it stays at version 1"
    )
    assert schema_version(sqlite_url(path)) == "1"


def test_lines_sharing_one_database_each_write_their_line_and_read_only_their_own(store_url: str) -> None:
    from pipeline.selftest import SelfTestResult
    from pipeline.store.reviews import Reviews
    from pipeline.store.selftests import SelfTestLog
    from pipeline.store.switches import BundleSwitch, SwitchLog

    line_a, line_b = VerdictStore(store_url, line="line-a"), VerdictStore(store_url, line="line-b")
    LABEL = "false_reject"  # seq 1 is a reject
    try:
        for store, run, n in ((line_a, "run-a", 12), (line_b, "run-b", 7)):
            store.start_run(run, "hash", "/data/line.pt", {}, T0)
            assert store.write(verdicts(run, n)) == n
            SwitchLog(store).record(BundleSwitch(run, "top", T0, "alice", "/b.pt", "hash", "hash2", switched_ns=T0))
            SelfTestLog(store).record(run, SelfTestResult("hash", "/b.pt", T0, 6, ()))
        everything = HistoryFilter(limit=1000)
        assert {v.run for v in line_a.search(everything)} == {"run-a"} and len(line_a.search(everything)) == 12
        assert sum(line_b.verdict_counts(everything).values()) == 7
        assert line_a.range("run-b", 1, 7) == [] and line_b.count("run-b") == 7  # replay: its own runs only
        assert [r["run_id"] for r in line_a.runs_list()] == ["run-a"] and line_b.run_record("run-a") is None
        assert [s.run_id for s in SwitchLog(line_b).recent()] == ["run-b"]
        assert [run for run, _ in SelfTestLog(line_a).recent()] == ["run-a"]
        for store, run in ((line_a, "run-a"), (line_b, "run-b")):
            Reviews(store).add_label(run, 1, LABEL, "", "alice", T0)
        assert [v.run for v in Reviews(line_b).labelled(LABEL)] == ["run-b"]  # reviews: this line's verdicts
        engine = create_engine(store_url)
        with engine.connect() as conn:  # and every row says whose it is
            for table in ("runs", "verdicts", "bundle_switches", "selftests"):
                rows = conn.execute(text(f"SELECT run_id, line_id FROM {table}")).all()
                assert {(run, line) for run, line in rows} == {("run-a", "line-a"), ("run-b", "line-b")}, table
        engine.dispose()
    finally:
        line_a.close()
        line_b.close()


def test_a_line_id_longer_than_the_column_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"store.line = .*: expected at most 64 characters, got 65"):
        VerdictStore(f"sqlite:///{tmp_path / 'store.db'}", line="x" * 65)


def open_store_in_a_process(url: str, line: str) -> None:
    VerdictStore(url, line=line).close()


def test_boxes_starting_together_on_one_empty_postgresql_all_open_it(postgres_url: str) -> None:
    """A plant's lines started at once on a new database: the schema is made once, and no box fails."""
    url = new_database(postgres_url, "plant")
    context = mp.get_context("spawn")
    boxes = [context.Process(target=open_store_in_a_process, args=(url, f"line-{i}")) for i in range(6)]
    for box in boxes:
        box.start()
    for box in boxes:
        box.join(120)
    assert [box.exitcode for box in boxes] == [0] * 6
    assert schema_version(url) == str(SCHEMA_VERSION)
