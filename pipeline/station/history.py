"""The history view's query: a search of the store from a page's URL parameters, and its export."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from pipeline.store.keys import KINDS, image_path
from pipeline.store.records import local_time, parse_time, write_csv
from pipeline.store.verdicts import HistoryFilter, StoredVerdict

PAGE_ROWS = 100
EXPORT_ROWS = 100_000  # CSV rows of one export
EXPORT_IMAGES = 5_000  # rows whose images go into one zip
VERDICTS = ("pass", "reject", "error")


class QueryError(ValueError):
    """A URL parameter that is not what the history accepts; the message names it."""


def time_param(name: str, text: str) -> int:
    """ns since the epoch of a time parameter (a browser's datetime-local is the box's local time)."""
    try:
        return parse_time(text, name, time.time_ns())
    except ValueError as exc:
        raise QueryError(str(exc)) from None


def parse_number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise QueryError(f"{name}: expected a number, got {text!r}") from None


def history_filter(params: Mapping[str, str], limit: int | None = PAGE_ROWS) -> tuple[HistoryFilter, int]:
    """The search a history URL asks for, and its page number (from 1)."""
    p = {k: v.strip() for k, v in params.items() if v.strip()}
    verdict = p.get("verdict")
    if verdict is not None and verdict not in VERDICTS:
        raise QueryError(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")
    page = p.get("page", "1")
    if not page.isdigit() or int(page) < 1:
        raise QueryError(f"page: expected a whole number from 1, got {page!r}")
    offset = (int(page) - 1) * (limit or 0)
    f = HistoryFilter(
        since_ns=time_param("since", p["since"]) if "since" in p else None,
        until_ns=time_param("until", p["until"]) if "until" in p else None,
        camera=p.get("camera"),
        verdict=verdict,
        min_score=parse_number("min_score", p["min_score"]) if "min_score" in p else None,
        max_score=parse_number("max_score", p["max_score"]) if "max_score" in p else None,
        run=p.get("run"),
        limit=limit,
        offset=offset,
        disagreements=p.get("disagreements") in ("1", "on", "true"),
    )
    return f, int(page)


def iso(t_ns: int | None) -> str:
    """A time as the page shows it: the box's local time to the millisecond, with its offset."""
    return "" if t_ns is None else local_time(t_ns).isoformat(timespec="milliseconds")


def write_zip(rows: list[StoredVerdict], archive: Path, out: IO[bytes]) -> None:
    """verdicts.csv and, for the first EXPORT_IMAGES rows with images still kept, images/KEY.jpg and
    images/KEY.overlay.jpg."""
    text = io.StringIO()
    write_csv(rows, text)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:  # JPEGs do not compress further
        z.writestr("verdicts.csv", text.getvalue())
        kept = [r for r in rows if r.images_kept][:EXPORT_IMAGES]
        for r in kept:
            assert r.image_key is not None
            for kind in KINDS:
                path = image_path(archive, r.image_key, kind)
                if path.is_file():
                    z.write(path, "images/" + path.relative_to(archive).as_posix())
