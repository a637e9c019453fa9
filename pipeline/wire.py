"""The reject message's wire format: one two-frame ZeroMQ message per verdict, and the reader's side.

Plain JSON and the standard library only (no numpy, torch or zmq), so a PLC bridge imports this module
without installing linewatch's runtime.

Wire format (version 1): a two-frame message [topic, body]. The topic is the verdict (`pass`,
`reject`, `error`) so a bridge can subscribe to rejects only. The body is UTF-8 JSON:

    v               1 (this schema)
    run             id of this linewatch run (changes when linewatch restarts)
    seq             1, 2, 3, ... over all messages of the run: a gap means messages were missed
    topic_seq       1, 2, 3, ... per verdict: a reject-only subscriber checks this one
    camera_id       configured camera id
    frame_id        per-camera frame counter
    t_capture_ns    capture time, ns since the epoch (shift by conveyor transit to time the gate)
    t_decision_ns   when the verdict was taken, ns since the epoch
    score           anomaly score (null for error)
    threshold       reject when score > threshold
    verdict         pass | reject | error (error: the frame could not be scored: treat as reject)
    bundle          content hash of the model bundle
    trigger         the part's trigger / encoder value when the source has one, else null

A subscriber slower than the publisher's high-water mark loses messages, which it sees as a gap in
`seq` / `topic_seq` (`GapTracker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERDICT_NAMES = ("pass", "reject", "error")  # topics; a verdict's index is its code in the rings
MESSAGE_VERSION = 1


@dataclass(frozen=True)
class Verdict:
    camera_id: str
    frame_id: int
    t_capture_ns: int
    t_decision_ns: int
    score: float | None
    threshold: float
    verdict: str
    trigger: int | None


def encode(run: str, seq: int, topic_seq: int, v: Verdict, bundle: str) -> list[bytes]:
    body = {"v": MESSAGE_VERSION, "run": run, "seq": seq, "topic_seq": topic_seq, **vars(v), "bundle": bundle}
    return [v.verdict.encode(), json.dumps(body, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> dict[str, Any]:
    """Parse a message; ValueError for another schema version or a malformed message."""
    if len(frames) != 2:
        raise ValueError(f"expected [topic, body], got {len(frames)} frames")
    body = json.loads(frames[1])
    if body.get("v") != MESSAGE_VERSION:
        raise ValueError(f"message schema version {body.get('v')!r}, this reader understands {MESSAGE_VERSION}")
    return body


class GapTracker:
    """Consumer side: which sequence numbers were missed, per run (used by deploy/plc_bridge.py)."""

    def __init__(self, key: str = "seq", last: int | None = None, run: str | None = None) -> None:
        self.key, self.last, self.run = key, last, run

    def see(self, message: dict[str, Any]) -> tuple[int, int] | None:
        """Record a message; returns the missed range (first, last) inclusive, or None."""
        seq = int(message[self.key])
        if message["run"] != self.run:  # linewatch restarted: a new sequence
            missed = (1, seq - 1) if seq > 1 and self.run is not None else None
            self.run, self.last = message["run"], seq
            return missed
        gap = (self.last + 1, seq - 1) if self.last is not None and seq > self.last + 1 else None
        self.last = seq if self.last is None else max(self.last, seq)
        return gap
