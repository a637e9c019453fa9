"""`linewatch history` and `linewatch export`: the verdict store and the image archive read from the shell.

history lists stored verdicts, filtered by decision time, camera, verdict, score and run, as an aligned
table, CSV or one JSON object a line. export writes one run into a new folder: verdicts.csv (every row,
in seq order), run.json (the run's record: start, stop, bundle, the configuration that ran) and the
run's archived frames and overlays under images/<key>. Both only read: a store that is not where it
is looked for is an error naming the place, never created empty.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from pipeline.settings import StoreConfig
from pipeline.store.keys import KINDS, image_path
from pipeline.store.paths import DATABASE_FILE, StorePaths
from pipeline.store.verdicts import HistoryFilter, StoredVerdict, VerdictStore, sqlite_url

# The history CSV's and JSON's fields: the published message's, the image's, and the decision time as text.
FIELDS = (
    "time",
    "run",
    "seq",
    "topic_seq",
    "camera_id",
    "frame_id",
    "trigger",
    "t_capture_ns",
    "t_decision_ns",
    "score",
    "threshold",
    "verdict",
    "bundle",
    "image_key",
    "image_expired_ns",
)
TABLE = ("time", "camera", "frame", "trigger", "run", "seq", "verdict", "score", "threshold", "image")
RIGHT_ALIGNED = frozenset({"frame", "trigger", "seq", "score", "threshold"})
LAST_SEQ = 2**63 - 1  # the largest seq a BIGINT holds: "to the end of the run"
_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreLocation:
    """The store's database URL and the image archive's folder (None when only a URL was given)."""

    url: str
    images: Path | None


@dataclass(frozen=True)
class ExportSummary:
    rows: int
    images: int  # keys whose frame was copied
    expired: int  # rows whose images the archive had deleted
    missing: int  # rows whose images should be archived but were not found


def locate(store: StoreConfig, bundle: str | Path | None, data: Path | None, store_url: str | None) -> StoreLocation:
    """Where the store is: `data` (a data folder) or the config's, beside `bundle` by default; `store_url`
    replaces the database either way. ValueError when nothing says where."""
    paths: StorePaths | None
    if data is not None:
        paths = StorePaths(data, sqlite_url(data / DATABASE_FILE))
    else:
        try:
            paths = StorePaths.resolve(store, bundle)
        except ValueError:
            paths = None
    if paths is None:
        if store_url is None:
            raise ValueError(
                "no store given: pass --bundle, --data DIR or --store-url URL (or set pipeline.bundle or store.path)"
            )
        return StoreLocation(store_url, None)
    return StoreLocation(store_url or paths.url, paths.images)


def open_store(location: StoreLocation) -> VerdictStore:
    """The store at `location`, for reading: StoreError naming the place when there is none."""
    return VerdictStore(location.url, create=False)


def parse_time(text: str, flag: str, now_ns: int) -> int:
    """ns since the epoch of ISO 8601 `text` (local time unless it gives a zone) or of a relative time
    (-15m, -2h, -1d, -30s: that long before now_ns); ValueError naming `flag`."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative is not None:
        return now_ns - round(float(relative[1]) * _SECONDS[relative[2]] * 1e9)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{flag} {text!r}: expected an ISO 8601 time (2026-12-03T10:00, local unless a zone is given) "
            "or a time before now (-15m, -2h, -1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is the local one
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def history_filter(
    since: str | None,
    until: str | None,
    camera: str | None,
    verdict: str | None,
    min_score: float | None,
    max_score: float | None,
    run: str | None,
    limit: int,
    now_ns: int,
) -> HistoryFilter:
    """The filter the history flags ask for; ValueError naming a flag whose value is not usable."""
    if limit < 0:
        raise ValueError(f"--limit {limit}: expected a number of rows >= 0 (0 = all)")
    return HistoryFilter(
        since_ns=None if since is None else parse_time(since, "--since", now_ns),
        until_ns=None if until is None else parse_time(until, "--until", now_ns),
        camera=camera,
        verdict=verdict,
        min_score=min_score,
        max_score=max_score,
        run=run,
        limit=limit or None,
    )


def local_time(t_ns: int) -> datetime:
    """The local time of ns since the epoch, to the microsecond (exact: no float in between)."""
    seconds, ns = divmod(t_ns, 1_000_000_000)
    return (datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=ns // 1000)).astimezone()


def record(v: StoredVerdict) -> dict[str, Any]:
    """One stored verdict as the CSV and JSON fields (FIELDS), the time as local ISO 8601 with its offset."""
    values = {
        "time": local_time(v.verdict.t_decision_ns).isoformat(timespec="milliseconds"),
        "run": v.run,
        "seq": v.seq,
        "topic_seq": v.topic_seq,
        **vars(v.verdict),
        "bundle": v.bundle,
        "image_key": v.image_key,
        "image_expired_ns": v.image_expired_ns,
    }
    return {name: values[name] for name in FIELDS}


def write_csv(rows: Sequence[StoredVerdict], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(record(v) for v in rows)


def write_json_lines(rows: Sequence[StoredVerdict], out: TextIO) -> None:
    for v in rows:
        out.write(json.dumps(record(v)) + "\n")


def write_table(rows: Sequence[StoredVerdict], out: TextIO) -> None:
    """An aligned table for a person: numbers right-aligned, '-' for a value the row does not have."""
    cells = [TABLE, *(_table_row(v) for v in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE))]
    for row in cells:
        padded = [
            cell.rjust(width) if name in RIGHT_ALIGNED else cell.ljust(width)
            for name, cell, width in zip(TABLE, row, widths, strict=True)
        ]
        out.write("  ".join(padded).rstrip() + "\n")


def _table_row(v: StoredVerdict) -> tuple[str, ...]:
    d = v.verdict
    if v.image_key is None:
        image = "-"
    elif v.image_expired_ns is not None:
        image = "expired"
    else:
        image = v.image_key
    return (
        local_time(d.t_decision_ns).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        d.camera_id,
        str(d.frame_id),
        "-" if d.trigger is None else str(d.trigger),
        v.run,
        str(v.seq),
        d.verdict,
        "-" if d.score is None else f"{d.score:.4g}",
        f"{d.threshold:.4g}",
        image,
    )


def write_history(rows: Sequence[StoredVerdict], form: str, out: TextIO) -> None:
    """`form`: table, csv or json (one object a line)."""
    {"table": write_table, "csv": write_csv, "json": write_json_lines}[form](rows, out)


def export_run(store: VerdictStore, images: Path | None, run: str, out: Path) -> ExportSummary:
    """Write `run` into the new or empty folder `out`; ValueError naming the flag for an unknown run, an
    `out` in use, or archived images without a known archive folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder (export writes into a new one)")
    run_row = store.run_record(run)
    rows = store.range(run, 0, LAST_SEQ)
    if run_row is None and not rows:
        known = [r["run_id"] for r in store.runs_list()[:5]]
        latest = f"; the latest are {', '.join(known)}" if known else "; it has no runs"
        raise ValueError(f"--run {run}: no such run in {store.where}{latest}")
    kept = [v for v in rows if v.image_key is not None and v.image_expired_ns is None]
    if kept and images is None:
        raise ValueError(f"--data: run {run} has archived images but no data folder is known (give --data DIR)")
    out.mkdir(parents=True, exist_ok=True)
    copied = 0 if images is None else sum(_copy_images(images, out / "images", v) for v in kept)
    with (out / "verdicts.csv").open("w", newline="") as f:
        write_csv(rows, f)
    expired = sum(v.image_expired_ns is not None for v in rows)
    summary = ExportSummary(len(rows), copied, expired, len(kept) - copied)
    (out / "run.json").write_text(json.dumps(_run_document(run, run_row, summary), indent=2) + "\n")
    return summary


def _copy_images(archive: Path, target: Path, v: StoredVerdict) -> bool:
    """Copy a row's frame and overlay (when it has one); False, logged, when its frame is not there."""
    key = v.image_key or ""
    if not image_path(archive, key, "frame").is_file():
        log.warning("run %s seq %d: image %s is not in the archive %s", v.run, v.seq, key, archive)
        return False
    for kind in KINDS:
        source = image_path(archive, key, kind)
        if source.is_file():
            destination = image_path(target, key, kind)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    return True


def _run_document(run: str, row: dict[str, Any] | None, summary: ExportSummary) -> dict[str, Any]:
    """run.json: the run's record with readable times and its configuration as an object."""
    row = row or {}
    started, stopped = row.get("started_ns"), row.get("stopped_ns")
    return {
        "run": run,
        "started_ns": started,
        "started": None if started is None else local_time(started).isoformat(),
        "stopped_ns": stopped,
        "stopped": None if stopped is None else local_time(stopped).isoformat(),
        "bundle_hash": row.get("bundle_hash"),
        "bundle_path": row.get("bundle_path"),
        "config": None if row.get("config_json") is None else json.loads(row["config_json"]),
        "verdicts": summary.rows,
        "images": summary.images,
        "images_expired": summary.expired,
        "images_missing": summary.missing,
    }
