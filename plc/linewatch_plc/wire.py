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

Every `publisher.heartbeat_ms` a `heartbeat` message goes out on the same socket (topic `heartbeat`,
`Heartbeat`): the last seq and topic_seqs published, and the pipeline's health. A subscriber that hears
no heartbeat knows linewatch (or the path to it) is down, and one that subscribes to rejects only still
learns from the topic_seqs that it missed one.

A subscriber slower than the publisher's high-water mark loses messages, which it sees as a gap in
`seq` / `topic_seq` (`GapTracker`). The replay endpoint (REQ/REP) sends missed messages again, as the
same bytes, from the verdict store: a `ReplayRequest` (run, from_seq, to_seq) is answered by a header
and the [topic, body] pairs (`encode_replay_reply`, `decode_replay_reply`); `reply_holes` names the seqs
of a reply's window that the store did not (yet) hold, to ask for again later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

VERDICT_NAMES = ("pass", "reject", "error")  # topics; a verdict's index is its code in the rings
HEARTBEAT_TOPIC = "heartbeat"
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


@dataclass(frozen=True)
class Heartbeat:
    """Sent every `interval_ms` on topic `heartbeat`: what was published so far, and how the pipeline is."""

    run: str
    seq: int  # last seq published (0: none yet)
    topic_seqs: dict[str, int]  # last topic_seq per verdict name
    t_ns: int  # when sent, ns since the epoch
    interval_ms: float  # the next one is due this much later
    health: str  # ok | degraded
    problems: tuple[str, ...] = ()  # why degraded: e.g. "camera cam1 disconnected", "stage infer not ready"

    def encode(self) -> list[bytes]:
        body = {"v": MESSAGE_VERSION, **vars(self), "problems": list(self.problems)}
        return [HEARTBEAT_TOPIC.encode(), json.dumps(body, separators=(",", ":")).encode()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Heartbeat:
        """ValueError for another topic, schema version or a malformed body."""
        if len(frames) != 2 or frames[0] != HEARTBEAT_TOPIC.encode():
            raise ValueError("not a heartbeat message")
        body = json.loads(frames[1])
        if body.get("v") != MESSAGE_VERSION:
            raise ValueError(f"heartbeat schema version {body.get('v')!r}, this reader understands {MESSAGE_VERSION}")
        try:
            return cls(
                run=str(body["run"]),
                seq=int(body["seq"]),
                topic_seqs={str(k): int(v) for k, v in body["topic_seqs"].items()},
                t_ns=int(body["t_ns"]),
                interval_ms=float(body["interval_ms"]),
                health=str(body["health"]),
                problems=tuple(str(p) for p in body.get("problems", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed heartbeat: {exc!r}") from None


@dataclass(frozen=True)
class ReplayRequest:
    """Ask the replay endpoint (a ZeroMQ REP socket) for the messages of `run` with from_seq <= seq <= to_seq."""

    run: str
    from_seq: int
    to_seq: int

    def encode(self) -> list[bytes]:
        return [json.dumps({"v": MESSAGE_VERSION, **vars(self)}, separators=(",", ":")).encode()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> ReplayRequest:
        """ValueError, naming the field, for anything but one JSON object of this version with whole numbers."""
        if len(frames) != 1:
            raise ValueError(f"replay request: expected one frame, got {len(frames)}")
        try:
            body = json.loads(frames[0])
        except ValueError:
            raise ValueError("replay request: not JSON") from None
        if not isinstance(body, dict) or body.get("v") != MESSAGE_VERSION:
            raise ValueError(f"replay request: expected a JSON object with v = {MESSAGE_VERSION}")
        run, first, last = body.get("run"), body.get("from_seq"), body.get("to_seq")
        if not isinstance(run, str):
            raise ValueError(f"replay request run = {run!r}: expected a run id")
        for name, value in (("from_seq", first), ("to_seq", last)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"replay request {name} = {value!r}: expected a whole number >= 1")
        if last < first:
            raise ValueError(f"replay request to_seq = {last}: expected a value >= from_seq ({first})")
        return cls(run, first, last)


def encode_replay_reply(
    request: ReplayRequest | None, messages: list[list[bytes]], error: str | None = None
) -> list[bytes]:
    """[header, topic, body, topic, body, ...]; `request` is the window of seqs the reply covers. A reply holds
    at most the endpoint's limit, so a `to_seq` below the one asked for means "ask again from to_seq + 1"; a
    seq of the window without a message was never stored. A refused request (`error`; `request` None when
    it could not be read) carries no messages."""
    header: dict[str, Any] = {"v": MESSAGE_VERSION, "run": None, "from_seq": None, "to_seq": None}
    if request is not None:
        header |= {"run": request.run, "from_seq": request.from_seq, "to_seq": request.to_seq}
    header |= {"count": len(messages), "error": error}
    return [json.dumps(header, separators=(",", ":")).encode(), *(frame for m in messages for frame in m)]


def decode_replay_reply(frames: list[bytes]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, messages) of a reply; ValueError for a malformed one or one that reports an error."""
    if not frames or len(frames) % 2 != 1:
        raise ValueError(f"replay reply: expected a header and [topic, body] pairs, got {len(frames)} frames")
    header = json.loads(frames[0])
    if header.get("v") != MESSAGE_VERSION:
        raise ValueError(f"replay reply schema version {header.get('v')!r}, this reader understands {MESSAGE_VERSION}")
    if header.get("error"):
        raise ValueError(f"replay refused: {header['error']}")
    return header, [decode(list(frames[i : i + 2])) for i in range(1, len(frames), 2)]


def reply_holes(header: dict[str, Any], messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The stretches (first, last), inclusive, of a reply's window that came back without a message: seqs the
    store does not hold, or not yet (the recorder stores a little behind publishing). A reply for 1..10 with
    messages 1..4 and 7 has the holes [(5, 6), (8, 10)]."""
    holes, expected = [], int(header["from_seq"])
    for seq in [*sorted({int(m["seq"]) for m in messages}), int(header["to_seq"]) + 1]:
        if seq > expected:
            holes.append((expected, seq - 1))
        expected = max(expected, seq + 1)
    return holes


class GapTracker:
    """Consumer side, the simplest check: which sequence numbers of one stream were missed, per run."""

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
