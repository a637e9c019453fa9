"""`linewatch history` and `linewatch export` in-process on a real store (SQLite, and PostgreSQL with the data
folder for the images) and a real image archive: filters, the three output forms, the export folder, and
one-line errors."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from linewatch_plc.wire import Verdict
from pipeline.app.cli import main
from pipeline.store.archive import ImageArchive
from pipeline.store.paths import DATA_FOLDER, DATABASE_FILE
from pipeline.store.records import FIELDS
from pipeline.store.verdicts import StoredVerdict, VerdictStore, sqlite_url

S = 1_000_000_000
CAMERAS = ("cam0", "cam1", "line 3/top")
BUNDLE = "cd" * 32


@dataclass(frozen=True)
class Line:
    """A store filled as a day on the line: its rows, the options that point at it, its data folder."""

    rows: list[StoredVerdict]
    options: list[str]
    data: Path
    now_ns: int
    store: VerdictStore


def make_rows(now_ns: int) -> list[StoredVerdict]:
    """24 parts, one every 7 minutes before now, oldest first: the older half in run-old, the newer in run-new."""
    rows = []
    for k in range(24, 0, -1):
        t = now_ns - k * 7 * 60 * S
        kind = "reject" if k % 4 == 0 else "error" if k % 7 == 0 else "pass"
        verdict = Verdict(
            camera_id=CAMERAS[k % 3],
            frame_id=100 + k,
            t_capture_ns=t - 40_000_000,
            t_decision_ns=t,
            score=None if kind == "error" else (3.0 + k / 4 if kind == "reject" else k / 10),
            threshold=3.0,
            verdict=kind,
            trigger=None if k % 2 else 5000 + k,
        )
        run = "run-old" if k > 12 else "run-new"
        rows.append(StoredVerdict(run, 25 - k, 25 - k, verdict, BUNDLE))
    return rows


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)


@pytest.fixture()
def line(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Line:
    """On SQLite the store is the data folder's own; on PostgreSQL it is given by URL beside the folder."""
    data = tmp_path / "data"
    data.mkdir()
    on_sqlite = store_url.startswith("sqlite")
    url = sqlite_url(data / DATABASE_FILE) if on_sqlite else store_url
    options = ["--data", str(data)] + ([] if on_sqlite else ["--store-url", url])
    now_ns = time.time_ns() // S * S  # whole seconds: ISO times in the tests are exact
    store = VerdictStore(url)
    request.addfinalizer(store.close)
    archive = ImageArchive(data / "images", max_bytes=10**9, max_days=90)
    rows = []
    for v in make_rows(now_ns):
        if v.verdict.verdict == "reject" or v.seq % 5 == 0:  # rejects and some passes keep their images
            level = 240 if v.verdict.verdict == "reject" else 30
            anomaly = np.full((24, 32), level, np.uint8)
            key = archive.save(v.run, v.seq, v.verdict.camera_id, v.verdict.t_capture_ns, frame(v.seq), anomaly)
            v = StoredVerdict(v.run, v.seq, v.topic_seq, v.verdict, v.bundle, key)
        rows.append(v)
    store.start_run("run-old", BUNDLE, "/lines/3/line3.pt", {"pipeline": {"max_batch": 4}}, now_ns - 4 * 3600 * S)
    store.stop_run("run-old", now_ns - 85 * 60 * S)
    store.start_run("run-new", BUNDLE, "/lines/3/line3.pt", {"pipeline": {"max_batch": 8}}, now_ns - 84 * 60 * S)
    store.write(rows)
    archive.max_bytes = archive.bytes_used - 1  # the oldest image goes, its row stays marked expired
    gone = archive.enforce_retention(now_ns)
    assert store.mark_expired(gone, now_ns) == len(gone) == 1
    stored = store.range("run-new", 1, 99) + store.range("run-old", 1, 99)  # as the store has them now
    return Line(stored, options, data, now_ns, store)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def newest_first(rows: list[StoredVerdict]) -> list[StoredVerdict]:
    return sorted(rows, key=lambda v: v.verdict.t_decision_ns, reverse=True)


def utc_iso(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns // S, UTC).isoformat()


def csv_rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames or ()) == FIELDS
    return list(reader)


def test_the_table_lists_the_newest_first_in_aligned_columns(line: Line, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(["history", *line.options], capsys)
    assert rc == 0, err
    header, *lines = out.splitlines()
    assert header.split() == [
        "time",
        "camera",
        "frame",
        "trigger",
        "run",
        "seq",
        "verdict",
        "score",
        "threshold",
        "image",
    ]
    want = newest_first(line.rows)
    assert len(lines) == len(want)
    verdict_at, seq_end = header.index("verdict"), header.index("seq") + len("seq")
    camera_at, image_at = header.index("camera"), header.index("image")
    for text, v in zip(lines, want, strict=True):
        assert text[verdict_at:].split()[0] == v.verdict.verdict  # left-aligned under its header
        assert text[:seq_end].split()[-1] == str(v.seq)  # right-aligned under its header
        assert text[camera_at:].startswith(v.verdict.camera_id)
        image = "-" if v.image_key is None else "expired" if v.image_expired_ns else v.image_key
        assert text[image_at:] == image


def test_history_filters_by_time_camera_verdict_score_and_run(line: Line, capsys: pytest.CaptureFixture[str]) -> None:
    times = sorted(v.verdict.t_decision_ns for v in line.rows)
    since, until = times[4], times[15]
    cases: list[tuple[list[str], Callable[[StoredVerdict], bool]]] = [
        (["--since", utc_iso(since)], lambda v: v.verdict.t_decision_ns >= since),
        (
            ["--since", utc_iso(since), "--until", utc_iso(until).replace("+00:00", "Z")],
            lambda v: since <= v.verdict.t_decision_ns < until,
        ),
        (["--camera", "line 3/top"], lambda v: v.verdict.camera_id == "line 3/top"),
        (
            ["--verdict", "reject", "--camera", "cam1"],
            lambda v: v.verdict.verdict == "reject" and v.verdict.camera_id == "cam1",
        ),
        (
            ["--min-score", "1.0", "--max-score", "5.0"],
            lambda v: v.verdict.score is not None and 1.0 <= v.verdict.score <= 5.0,
        ),
        (["--run", "run-old", "--verdict", "error"], lambda v: v.run == "run-old" and v.verdict.verdict == "error"),
    ]
    for flags, keep in cases:
        rc, out, err = cli(["history", *line.options, *flags, "--csv"], capsys)
        assert rc == 0, err
        want = newest_first([v for v in line.rows if keep(v)])
        assert want, flags  # each case selects something, and not everything
        assert len(want) < len(line.rows), flags
        assert [(r["run"], int(r["seq"])) for r in csv_rows(out)] == [(v.run, v.seq) for v in want], flags


@pytest.fixture()
def india_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set to UTC+5:30 (a POSIX TZ rule: no zone database needed)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_time_without_a_zone_is_local_and_a_relative_one_counts_back_from_now(
    line: Line, india_time: None, capsys: pytest.CaptureFixture[str]
) -> None:
    t = sorted(v.verdict.t_decision_ns for v in line.rows)[10]
    local = datetime.fromtimestamp(t // S).strftime("%Y-%m-%dT%H:%M:%S")  # the wall-clock time in India
    assert local != datetime.fromtimestamp(t // S, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    _, out, _ = cli(["history", *line.options, "--since", local, "--csv"], capsys)
    assert [int(r["t_decision_ns"]) for r in csv_rows(out)] == sorted(
        (v.verdict.t_decision_ns for v in line.rows if v.verdict.t_decision_ns >= t), reverse=True
    )
    _, out, _ = cli(["history", *line.options, "--since", "-30m", "--csv"], capsys)  # parts every 7 minutes
    assert [int(r["seq"]) for r in csv_rows(out)] == [v.seq for v in newest_first(line.rows)][:4]
    _, out, _ = cli(["history", *line.options, "--until=-2h", "--csv"], capsys)
    assert len(csv_rows(out)) == sum(v.verdict.t_decision_ns < line.now_ns - 2 * 3600 * S for v in line.rows)


def test_json_lines_and_the_limit(line: Line, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(["history", *line.options, "--json", "--limit", "5"], capsys)
    objects = [json.loads(text) for text in out.splitlines()]
    want = newest_first(line.rows)[:5]
    assert rc == 0 and [tuple(o) for o in objects] == [FIELDS] * 5
    for o, v in zip(objects, want, strict=True):
        assert (o["run"], o["seq"], o["camera_id"], o["score"], o["trigger"], o["image_key"]) == (
            v.run,
            v.seq,
            v.verdict.camera_id,
            v.verdict.score,
            v.verdict.trigger,
            v.image_key,
        )
        assert datetime.fromisoformat(o["time"]).timestamp() == v.verdict.t_decision_ns / S
    _, out, _ = cli(["history", *line.options, "--json", "--limit", "0"], capsys)
    assert len(out.splitlines()) == len(line.rows)


def test_export_writes_the_runs_rows_record_and_images(
    line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "export" / "run-old"
    rc, out, err = cli(["export", *line.options, "--run", "run-old", "--out", str(target)], capsys)
    assert rc == 0, err
    stored = line.store.range("run-old", 0, 10**6)
    exported = csv_rows((target / "verdicts.csv").read_text())
    assert [(r["run"], int(r["seq"]), r["camera_id"], r["verdict"], r["score"], r["image_key"]) for r in exported] == [
        (
            v.run,
            v.seq,
            v.verdict.camera_id,
            v.verdict.verdict,
            "" if v.verdict.score is None else str(v.verdict.score),
            v.image_key or "",
        )
        for v in stored
    ]
    expired = [v for v in stored if v.image_expired_ns is not None]
    kept = [v for v in stored if v.image_key is not None and v.image_expired_ns is None]
    assert len(expired) == 1 and kept
    assert [r["image_expired_ns"] for r in exported if r["image_expired_ns"]] == [str(expired[0].image_expired_ns)]
    files = {p.relative_to(target / "images").as_posix() for p in (target / "images").rglob("*.jpg")}
    assert files == {f"{v.image_key}{s}" for v in kept for s in (".jpg", ".overlay.jpg")}
    for v in kept:
        copy, original = target / "images" / f"{v.image_key}.jpg", line.data / "images" / f"{v.image_key}.jpg"
        assert copy.read_bytes() == original.read_bytes()
    record = json.loads((target / "run.json").read_text())
    assert record["started_ns"] == line.now_ns - 4 * 3600 * S and record["stopped_ns"] == line.now_ns - 85 * 60 * S
    assert record["bundle_hash"] == BUNDLE and record["bundle_path"] == "/lines/3/line3.pt"
    assert record["config"] == {"pipeline": {"max_batch": 4}}
    assert (record["verdicts"], record["images"], record["images_expired"]) == (len(stored), len(kept), 1)
    assert out.strip() == f"run run-old: {len(stored)} verdicts, {len(kept)} images, 1 expired -> {target}"


def test_the_store_is_found_beside_the_bundle_or_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "lines" / DATA_FOLDER
    data.mkdir(parents=True)
    store = VerdictStore(sqlite_url(data / DATABASE_FILE))
    rows = make_rows(time.time_ns())
    store.write(rows)
    store.close()
    _, by_bundle, _ = cli(["history", "--bundle", str(tmp_path / "lines" / "line3.pt"), "--csv"], capsys)
    config = tmp_path / "config.yaml"
    config.write_text(f"pipeline:\n  bundle: {tmp_path / 'lines' / 'line3.pt'}\n")
    _, by_config, _ = cli(["history", "--config", str(config), "--csv"], capsys)
    config.write_text(f"store:\n  path: {data}\n")
    _, by_path, _ = cli(["history", "--config", str(config), "--csv"], capsys)
    assert len(csv_rows(by_bundle)) == len(rows) and by_bundle == by_config == by_path


def test_bad_input_is_one_line_with_exit_2(line: Line, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("someone's")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    nowhere = tmp_path / "nowhere"
    cases = {
        ("history", *line.options, "--since", "yesterday"): "--since 'yesterday': expected an ISO 8601 time",
        ("history", *line.options, "--until", "2026-13-01"): "--until '2026-13-01': expected an ISO 8601 time",
        ("history", *line.options, "--limit", "-2"): "--limit -2: expected a number of rows >= 0 (0 = all)",
        ("history", "--data", str(nowhere)): f"{nowhere / DATABASE_FILE}: no verdict store here (no such file)",
        ("history", "--bundle", str(nowhere / "b.pt")): (
            f"{nowhere / DATA_FOLDER / DATABASE_FILE}: no verdict store here (no such file)"
        ),
        ("history",): "no store given: pass --bundle, --data DIR or --store-url URL",
        ("export", *line.options, "--run", "run-x", "--out", str(tmp_path / "x")): (
            f"--run run-x: no such run in {line.store.where}; the latest are run-new, run-old"
        ),
        ("export", *line.options, "--run", "run-new", "--out", str(used)): (
            f"--out {used}: exists and is not an empty folder (export writes into a new one)"
        ),
        ("export", *line.options, "--run", "run-new", "--out", str(a_file)): f"--out {a_file}: exists and is not",
    }
    for argv, message in cases.items():
        rc, out, err = cli(list(argv), capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and out == "", argv
        assert len(lines) == 1 and lines[0].startswith(f"linewatch: error: {message}"), (argv, lines)
    assert not nowhere.exists() and not (tmp_path / "x").exists()  # a read never creates a store or a folder
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]
