"""`linewatch history` and `linewatch export`: the verdict store and the image archive read from the shell.

history lists stored verdicts, filtered by decision time, camera, verdict, score and run, as an aligned
table, CSV or one JSON object a line. export writes one run into a new folder: verdicts.csv (every row,
in seq order), run.json (the run's record: start, stop, bundle, the configuration that ran) and the
run's archived frames and overlays under images/<key>. Both only read: a store that is not where it
is looked for is an error naming the place, never created empty.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.settings import StoreConfig
from pipeline.store.keys import KINDS, image_path
from pipeline.store.paths import DATABASE_FILE, StorePaths
from pipeline.store.records import local_time, parse_time, write_csv, write_json_lines
from pipeline.store.verdicts import HistoryFilter, StoredVerdict, VerdictStore, sqlite_url

TABLE = ("time", "camera", "frame", "trigger", "run", "seq", "verdict", "score", "threshold", "image")
RIGHT_ALIGNED = frozenset({"frame", "trigger", "seq", "score", "threshold"})
LAST_SEQ = 2**63 - 1  # the largest seq a BIGINT holds: "to the end of the run"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreLocation:
    """The store's database URL and the image archive's folder (None when only a URL was given)."""

    url: str
    images: Path | None
    line: str = ""  # store.line: the line whose rows are read


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
        paths = StorePaths(data, sqlite_url(data / DATABASE_FILE), store.line)
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
        return StoreLocation(store_url, None, store.line)
    return StoreLocation(store_url or paths.url, paths.images, store.line)


def open_store(location: StoreLocation) -> VerdictStore:
    """The store at `location`, for reading: StoreError naming the place when there is none."""
    return VerdictStore(location.url, create=False, line=location.line)


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
    disagreements: bool = False,
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
        disagreements=disagreements,
    )


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
    kept = [v for v in rows if v.images_kept]
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
