"""Stored verdicts as records for people and other programs: the CSV and JSON-lines fields, local times.

One form for every export (`linewatch history`, `linewatch export`, the operator page's downloads), so a
file from one reads like a file from another.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from pipeline.store.verdicts import StoredVerdict

_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The history CSV's and JSON's fields: the published message's, the image's, the decision time as text, and the
# shadow bundle's verdict when the camera had one.
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
    "shadow_bundle",
    "shadow_score",
    "shadow_verdict",
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
        "shadow_bundle": v.shadow.bundle if v.shadow else None,
        "shadow_score": v.shadow.score if v.shadow else None,
        "shadow_verdict": v.shadow.verdict if v.shadow else None,
    }
    return {name: values[name] for name in FIELDS}


def write_csv(rows: Iterable[StoredVerdict], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(record(v) for v in rows)


def write_json_lines(rows: Iterable[StoredVerdict], out: TextIO) -> None:
    for v in rows:
        out.write(json.dumps(record(v)) + "\n")


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
