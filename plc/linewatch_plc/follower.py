"""Follow linewatch's verdicts: recover every missed one, and go fail-safe on silence. The PLC side's core,
shared by the log bridge and the OPC UA and Modbus gateways (`Gate` is where its decisions go).

What it follows: topics `reject` and `error` (an error is a part that could not be scored: treat it as a
reject), or every verdict (`follow_all`, as the gateways do: they show each camera's last verdict), plus
`heartbeat`.

Missed messages. PUB/SUB loses messages (a full queue, a follower that was down or started late, linewatch
restarted), so the follower checks its streams: the `topic_seq` of each verdict it follows (`seq` when it
follows all), against the next message and against every heartbeat, whose topic_seqs say how many were
published even when no later reject comes. A jump means the stretch of `seq` between what it had checked and
the new message (or the heartbeat's seq) holds messages it missed; it asks the replay endpoint for that
stretch, window by window, and hands the verdicts that come back to the gate exactly like live ones, marked
replayed. A message seen twice (live and replayed) is handled once, by (run, seq). Requests go out one at a
time beside the subscription and never hold up live messages: one unanswered after REPLAY_TIMEOUT_S is
dropped with its REQ socket. Seqs the store does not hold yet (the recorder writes ~100 ms behind
publishing) and refused or unanswered requests stay pending and are asked again every heartbeat interval,
backing off to RETRY_MAX_S; after GIVE_UP_S a stretch is logged as LOST. A new run id means linewatch
restarted: the old run's tail is asked for too, up to what the store holds, and the new run from seq 1. A
replayed reject usually comes after its part has passed the gate: the PLC compares t_capture_ns + transit
with its clock and diverts the part further down, or flags it, when it is too late to kick it out.

Position. A `StateFile` (JSON, replaced atomically after every change) keeps the run, the seq up to which
every message followed is handled ("complete"), the last topic_seq per verdict, what each stream has
checked, the stretches still pending and the seqs above "complete" already handled, so a restarted follower
goes on exactly where it stopped. Delivery is at least once across a crash: a follower killed between
handling a message and saving its state handles that message again (the PLC keys its command by part).

Fail-safe. A heartbeat is due every `interval_ms` (it says so itself; 1 s is assumed before the first).
After `after` intervals without one, linewatch or the path to it is down: silence must never read as "all
parts good", so the gate is told (it holds the line, or treats every part as a reject) until heartbeats
come back. A degraded linewatch (its heartbeat's health) is logged and passed on.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq

from linewatch_plc.wire import (
    HEARTBEAT_TOPIC,
    VERDICT_NAMES,
    Heartbeat,
    ReplayRequest,
    decode,
    decode_replay_reply,
    reply_holes,
)

REJECT_TOPICS = ("reject", "error")  # what a reject-only follower follows: an error is treated as a reject
ALL = "seq"  # the one stream of a follower that follows every verdict: gaps are checked on seq
STATE_VERSION = 1
FIRST_INTERVAL_MS = 1000.0  # heartbeat interval assumed until the first heartbeat states its own
REPLAY_TIMEOUT_S = 1.0  # an unanswered request is dropped after this: live messages wait for nothing
FIRST_ASK_S = 0.15  # a new gap is asked for this much later: the recorder stores ~50-100 ms behind publishing
RETRY_MAX_S = 5.0  # the longest wait between two requests for a stretch still pending
GIVE_UP_S = 60.0  # a stretch not replayed by then is logged as lost
TAIL_WINDOW = 10_000  # seqs asked at once for a finished run's tail (the endpoint may answer fewer)
POLL_MS = 50  # the loop's longest sleep: watchdog and retries are checked this often
FAILSAFE_ACTIONS = {"hold": "hold the gate", "reject": "treating parts as rejects"}


class Gate(Protocol):
    """Where the follower's decisions go: a log, OPC UA nodes, Modbus coils. Called from the follower's thread,
    in order; each (run, seq) reaches `part` once (at least once across a crash of the follower)."""

    def part(self, message: dict[str, Any], replayed: bool) -> None:
        """A verdict followed: live, or recovered from the replay endpoint (`replayed`)."""

    def heartbeat(self, hb: Heartbeat) -> None:
        """linewatch's heartbeat: what it published so far, and its health."""

    def failsafe(self, active: bool) -> None:
        """Heartbeats stopped (True) or came back (False)."""


class NoGate:
    """A follower whose decisions are only logged."""

    def part(self, message: dict[str, Any], replayed: bool) -> None:
        pass

    def heartbeat(self, hb: Heartbeat) -> None:
        pass

    def failsafe(self, active: bool) -> None:
        pass


@dataclass
class Gap:
    """Seqs first..last of `run` that may hold messages the follower has not handled."""

    run: str
    first: int
    last: int | None  # None: a finished run's tail, up to whatever the store holds
    since: float  # when it was noticed (monotonic s): given up GIVE_UP_S later
    ask_at: float  # when to ask the replay endpoint next
    backoff: float = 0.0  # the wait after its last unsuccessful request
    told: bool = False  # its "not stored yet" / "failed" line was logged: once per stretch

    def text(self) -> str:
        return f"seqs {self.first}..{'end' if self.last is None else self.last} of run {self.run}"

    def request(self) -> ReplayRequest:
        return ReplayRequest(self.run, self.first, self.first + TAIL_WINDOW - 1 if self.last is None else self.last)

    def overlaps(self, run: str, first: int, last: int) -> bool:
        return run == self.run and self.first <= last and (self.last is None or first <= self.last)

    def piece(self, first: int, last: int | None) -> Gap:
        """Part of this gap, keeping its age and retry state."""
        return Gap(self.run, first, last, self.since, self.ask_at, self.backoff, self.told)


class Gaps:
    """The stretches still to recover, disjoint per run, in the order they were noticed."""

    def __init__(self) -> None:
        self.items: list[Gap] = []

    def add(self, run: str, first: int, last: int | None, now: float) -> None:
        """Add first..last, merged with the stretches of `run` it overlaps or touches."""
        merged = Gap(run, first, last, now, now + FIRST_ASK_S)
        kept = []
        for gap in self.items:
            end = math.inf if merged.last is None else merged.last
            if gap.run == run and gap.first <= end + 1 and (gap.last is None or merged.first <= gap.last + 1):
                last_seq = None if merged.last is None or gap.last is None else max(merged.last, gap.last)
                merged = Gap(
                    run,
                    min(merged.first, gap.first),
                    last_seq,
                    min(merged.since, gap.since),
                    min(merged.ask_at, gap.ask_at),
                    gap.backoff,
                    gap.told,
                )
            else:
                kept.append(gap)
        self.items = sorted([*kept, merged], key=lambda g: g.since)

    def due(self, now: float) -> Gap | None:
        return next((g for g in self.items if g.ask_at <= now), None)

    def floor(self, run: str) -> int | None:
        """The lowest seq of `run` still pending, None when none is."""
        return min((g.first for g in self.items if g.run == run), default=None)

    def holds(self, run: str, seq: int) -> bool:
        return any(g.overlaps(run, seq, seq) for g in self.items)

    def answered(self, window: ReplayRequest, holes: list[tuple[int, int]], now: float, retry_s: float) -> list[str]:
        """A reply covered `window` and lacked `holes`: the rest of the window is recovered, the holes are asked
        for again later; what lies beyond the window is asked for next. A finished run's tail ends where the
        store's messages end."""
        lines: list[str] = []
        kept: list[Gap] = []
        for gap in self.items:
            if not gap.overlaps(window.run, window.from_seq, window.to_seq):
                kept.append(gap)
                continue
            before = [gap.piece(gap.first, window.from_seq - 1)] if gap.first < window.from_seq else []
            if gap.last is None:  # the tail: its holes up to the last stored message, then on from there
                stored_to = _last_stored(window, holes)
                inside = [(a, b) for a, b in holes if stored_to is not None and b <= stored_to]
                after = [] if stored_to is None else [gap.piece(stored_to + 1, None)]
            else:
                inside = holes
                after = [gap.piece(window.to_seq + 1, gap.last)] if gap.last > window.to_seq else []
            missing = [_clip(gap, a, b) for a, b in inside]
            missing = [gap.piece(a, b) for a, b in (m for m in missing if m is not None)]
            for piece in missing:
                _retry_later(piece, now, retry_s)
            for piece in after:
                piece.ask_at = now
            if missing and not gap.told:
                stretches = ", ".join(f"{p.first}..{p.last}" for p in missing)
                lines.append(f"replay: seqs {stretches} of run {gap.run} not stored yet; asking again")
                for piece in missing:
                    piece.told = True
            kept += before + missing + after
        self.items = sorted(kept, key=lambda g: g.since)
        return lines

    def failed(self, request: ReplayRequest, reason: str, now: float, retry_s: float) -> list[str]:
        """The request was refused or not answered: its stretches are asked for again later."""
        lines = []
        for gap in self.items:
            if gap.overlaps(request.run, request.from_seq, request.to_seq):
                _retry_later(gap, now, retry_s)
                if not gap.told:
                    lines.append(f"replay of {gap.text()} failed ({reason}); asking again")
                    gap.told = True
        return lines

    def expire(self, now: float, give_up_s: float) -> list[Gap]:
        """Remove and return the stretches pending longer than `give_up_s`."""
        old = [g for g in self.items if now - g.since > give_up_s]
        self.items = [g for g in self.items if now - g.since <= give_up_s]
        return old


def _last_stored(window: ReplayRequest, holes: list[tuple[int, int]]) -> int | None:
    """The highest seq of the window that came back; None when nothing did."""
    if not holes or holes[-1][1] < window.to_seq:
        return window.to_seq
    return holes[-1][0] - 1 if holes[-1][0] > window.from_seq else None


def _clip(gap: Gap, first: int, last: int) -> tuple[int, int] | None:
    a, b = max(first, gap.first), last if gap.last is None else min(last, gap.last)
    return (a, b) if a <= b else None


def _retry_later(gap: Gap, now: float, retry_s: float) -> None:
    """Next try one heartbeat interval later, then twice as long each time, up to RETRY_MAX_S."""
    gap.backoff = min(max(2 * gap.backoff, retry_s), RETRY_MAX_S)
    gap.ask_at = now + gap.backoff


@dataclass(frozen=True)
class Missed:
    """A jump in one stream: `count` messages of it lie somewhere in seqs first..last."""

    stream: str
    count: int
    first: int
    last: int


class Position:
    """Where the follower is in the current run, per stream (`seq`, or one verdict's `topic_seq`): the seq up
    to which every message of the stream is handled or inside a pending gap (`checked`), and how many of the
    stream's messages were published up to there (the verdict's topic_seq; for `seq`, the seq itself)."""

    def __init__(self, run: str, streams: Iterable[str], checked: int = 0) -> None:
        self.run = run
        self.checked = {s: checked for s in streams}
        self.topic_seqs: dict[str, int] = {}  # last topic_seq per verdict followed, as published

    def count(self, stream: str) -> int:
        return self.checked[stream] if stream == ALL else self.topic_seqs.get(stream, 0)

    def message(self, stream: str, seq: int, verdict: str, topic_seq: int) -> Missed | None:
        """A message of `stream` (live, or replayed beyond what was checked)."""
        before, last = self.checked[stream], self.count(stream)
        if seq <= before:
            return None  # a repeat or a replayed one: nothing new about the stream
        self.checked[stream] = seq
        self.topic_seqs[verdict] = max(self.topic_seqs.get(verdict, 0), topic_seq)
        count = seq if stream == ALL else topic_seq
        return Missed(stream, count - last - 1, before + 1, seq - 1) if count > last + 1 else None

    def heartbeat(self, hb: Heartbeat) -> list[Missed]:
        """A heartbeat: how many messages of each stream were published up to its seq."""
        missed = []
        for stream, before in self.checked.items():
            if hb.seq <= before:
                continue
            last, count = self.count(stream), hb.seq if stream == ALL else hb.topic_seqs.get(stream, 0)
            self.checked[stream] = hb.seq
            if count > last:
                missed.append(Missed(stream, count - last, before + 1, hb.seq))
        followed = VERDICT_NAMES if ALL in self.checked else self.checked
        for verdict in followed:  # every stream is checked up to hb.seq now: its counts are theirs
            self.topic_seqs[verdict] = max(self.topic_seqs.get(verdict, 0), hb.topic_seqs.get(verdict, 0))
        return missed

    def complete(self) -> int:
        return min(self.checked.values())


class Watchdog:
    """Fail-safe on a stale heartbeat, and the health linewatch reports in it."""

    def __init__(self, after: int, action: str, now: float) -> None:
        self.after, self.action = after, action
        self.last_beat, self.interval_ms = now, FIRST_INTERVAL_MS
        self.active = False  # in fail-safe
        self.health: tuple[str, tuple[str, ...]] = ("ok", ())

    def beat(self, hb: Heartbeat, now: float) -> list[str]:
        lines = []
        if self.active:
            lines.append(f"heartbeat back after {(now - self.last_beat) * 1000:.0f} ms; leaving fail-safe")
            self.active = False
        self.last_beat, self.interval_ms = now, hb.interval_ms
        health = (hb.health, () if hb.health == "ok" else hb.problems)
        if health != self.health:
            self.health = health
            if hb.health == "ok":
                lines.append("linewatch healthy again")
            else:
                lines.append(f"linewatch {hb.health}: {'; '.join(hb.problems) or 'no reason given'}")
        return lines

    def check(self, now: float) -> list[str]:
        silent_ms = (now - self.last_beat) * 1000
        if self.active or silent_ms < self.after * self.interval_ms:
            return []
        self.active = True
        return [f"FAIL-SAFE: no heartbeat from linewatch for {silent_ms:.0f} ms; {FAILSAFE_ACTIONS[self.action]}"]


class Follower:
    """The follower's decisions, without sockets: feed it messages, heartbeats, replay replies and the clock
    (monotonic seconds); it hands parts, heartbeats and fail-safe to the gate, and returns the lines to log
    and the next replay request to send."""

    def __init__(
        self,
        follow_all: bool,
        replay: bool,
        watchdog: Watchdog,
        give_up_s: float = GIVE_UP_S,
        gate: Gate | None = None,
    ) -> None:
        self.follow_all, self.replay, self.watchdog, self.give_up_s = follow_all, replay, watchdog, give_up_s
        self.gate: Gate = NoGate() if gate is None else gate
        self.streams = (ALL,) if follow_all else REJECT_TOPICS
        self.position: Position | None = None
        self.gaps = Gaps()
        self.handled: dict[str, set[int]] = {}  # per run, seqs above what is complete: handled once

    # --- what comes in ---------------------------------------------------------------------------------

    def on_frames(self, frames: list[bytes], now: float) -> list[str]:
        """One message from the subscription: a heartbeat or a verdict."""
        if frames and frames[0] == HEARTBEAT_TOPIC.encode():
            try:
                return self.on_heartbeat(Heartbeat.decode(frames), now)
            except ValueError as exc:
                return [f"ignored heartbeat: {exc}"]
        try:
            message = decode(frames)
        except ValueError as exc:
            return [f"ignored message: {exc}"]
        return self.on_message(message, now)

    def on_heartbeat(self, hb: Heartbeat, now: float) -> list[str]:
        failsafe = self.watchdog.active
        lines = self.watchdog.beat(hb, now) + self._enter_run(hb.run, now)
        if failsafe:
            self.gate.failsafe(False)
        self.gate.heartbeat(hb)
        assert self.position is not None
        for missed in self.position.heartbeat(hb):
            lines += self._missed(missed, now)
        self._settle()
        return lines

    def on_message(self, message: dict[str, Any], now: float) -> list[str]:
        lines = self._take(message, now, replayed=False)
        self._settle()
        return lines

    def _take(self, message: dict[str, Any], now: float, replayed: bool) -> list[str]:
        """Check a verdict message against the streams, and handle it unless it was already."""
        run, seq, verdict = message["run"], int(message["seq"]), message["verdict"]
        lines = [] if replayed else self._enter_run(run, now)
        # judged before the position moves past it: following all, the one stream's "complete" becomes this seq
        new = (self.follow_all or verdict in REJECT_TOPICS) and self._is_new(run, seq)
        if self.position is not None and run == self.position.run:
            stream = ALL if self.follow_all else verdict
            if stream in self.streams:
                missed = self.position.message(stream, seq, verdict, int(message["topic_seq"]))
                if missed is not None:
                    lines += self._missed(missed, now)
        if new:
            self.handled.setdefault(run, set()).add(seq)
            self.gate.part(message, replayed)
            if verdict != "pass":
                lines.append(describe(message) + (" (replayed)" if replayed else ""))
        return lines

    def on_reply(self, request: ReplayRequest, frames: list[bytes], now: float) -> list[str]:
        """The replay endpoint's answer to `request`."""
        try:
            header, messages = decode_replay_reply(frames)
        except ValueError as exc:
            return self.on_replay_failed(request, str(exc), now)
        if header.get("run") != request.run or header.get("from_seq") != request.from_seq:
            return self.on_replay_failed(request, f"the reply is for another window: {header}", now)
        window = ReplayRequest(request.run, request.from_seq, int(header["to_seq"]))
        lines: list[str] = []
        for message in messages:
            if message["run"] == window.run and window.from_seq <= message["seq"] <= window.to_seq:
                lines += self._take(message, now, replayed=True)
        lines += self.gaps.answered(window, reply_holes(header, messages), now, self._retry_s())
        self._settle()
        return lines

    def on_replay_failed(self, request: ReplayRequest, reason: str, now: float) -> list[str]:
        return self.gaps.failed(request, reason, now, self._retry_s())

    def tick(self, now: float) -> list[str]:
        """The clock: fail-safe on a stale heartbeat, and give up stretches pending too long."""
        lines = self.watchdog.check(now)
        if lines:
            self.gate.failsafe(True)
        for gap in self.gaps.expire(now, self.give_up_s):
            lines.append(f"LOST: {gap.text()} not replayed within {self.give_up_s:.0f} s; rejects among them missed")
        self._settle()
        return lines

    def next_request(self, now: float) -> ReplayRequest | None:
        gap = self.gaps.due(now) if self.replay else None
        return None if gap is None else gap.request()

    # --- bookkeeping -----------------------------------------------------------------------------------

    def complete(self) -> int:
        """Every followed message of the current run with seq <= this is handled (or logged as lost)."""
        if self.position is None:
            return 0
        floor = self.gaps.floor(self.position.run)
        return self.position.complete() if floor is None else min(self.position.complete(), floor - 1)

    def _floor(self, run: str) -> float:
        """Seqs of `run` up to this are done with."""
        if self.position is not None and run == self.position.run:
            return self.complete()
        floor = self.gaps.floor(run)
        return math.inf if floor is None else floor - 1

    def _is_new(self, run: str, seq: int) -> bool:
        return seq > self._floor(run) and seq not in self.handled.get(run, ()) and self._expected(run, seq)

    def _expected(self, run: str, seq: int) -> bool:
        """A message of an earlier run is taken only when it was asked for."""
        return (self.position is not None and run == self.position.run) or self.gaps.holds(run, seq)

    def _settle(self) -> None:
        """Forget handled seqs below what is complete, and runs with nothing left to recover."""
        for run in list(self.handled):
            floor = self._floor(run)
            self.handled[run] = {s for s in self.handled[run] if s > floor}
            if not self.handled[run] and (self.position is None or run != self.position.run):
                del self.handled[run]

    def _enter_run(self, run: str, now: float) -> list[str]:
        """A message or heartbeat of another run: linewatch restarted (or this follower starts out)."""
        if self.position is not None and self.position.run == run:
            return []
        lines = []
        old = self.position
        if old is None:
            lines.append(f"following run {run}")
        elif self.replay:
            self.gaps.add(old.run, old.complete() + 1, None, now)
            lines.append(f"NEW RUN {run}: linewatch restarted; asking for run {old.run} after seq {old.complete()}")
        else:
            lines.append(f"NEW RUN {run}: linewatch restarted; run {old.run} after seq {old.complete()} is unchecked")
        self.position = Position(run, self.streams)
        return lines

    def _missed(self, missed: Missed, now: float) -> list[str]:
        assert self.position is not None
        run = self.position.run
        what = ("" if missed.stream == ALL else f"{missed.stream} ") + ("message" if missed.count == 1 else "messages")
        line = f"GAP: missed {missed.count} {what} in seqs {missed.first}..{missed.last} of run {run}"
        if not self.replay:
            return [f"{line}; no replay endpoint: lost"]
        self.gaps.add(run, missed.first, missed.last, now)
        return [f"{line}; asking the replay endpoint"]

    def _retry_s(self) -> float:
        return self.watchdog.interval_ms / 1000

    # --- state ------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What --state keeps: enough to go on exactly where this follower stopped."""
        p = self.position
        return {
            "v": STATE_VERSION,
            "run": None if p is None else p.run,
            "complete": self.complete(),
            "topic_seqs": {} if p is None else dict(sorted(p.topic_seqs.items())),
            "checked": {} if p is None else dict(p.checked),
            "gaps": [[g.run, g.first, g.last] for g in self.gaps.items],
            "handled": {run: sorted(seqs) for run, seqs in sorted(self.handled.items()) if seqs},
        }

    def restore(self, state: dict[str, Any], now: float) -> None:
        """Go on from a saved state; pending stretches are asked for at once, and given GIVE_UP_S again."""
        if state.get("v") != STATE_VERSION:
            raise ValueError(f"state version {state.get('v')!r}, this follower writes {STATE_VERSION}")
        if state["run"] is not None:
            self.position = Position(state["run"], self.streams, int(state["complete"]))
            saved = state["checked"]
            if set(saved) == set(self.streams):  # same streams (--all or not) as when it was saved: exact
                self.position.checked = {s: int(saved[s]) for s in self.streams}
                self.position.topic_seqs = {k: int(v) for k, v in state["topic_seqs"].items()}
            # otherwise each stream starts at "complete" with no count: its next message or heartbeat shows
            # a jump, and everything after "complete" is asked for again (handled seqs are not repeated)
        for run, first, last in state["gaps"]:
            self.gaps.add(run, int(first), None if last is None else int(last), now - FIRST_ASK_S)
        self.handled = {run: {int(s) for s in seqs} for run, seqs in state["handled"].items()}


def describe(message: dict[str, Any]) -> str:
    """The log line for a reject or error: where the PLC drives the gate."""
    where = f"{message['verdict'].upper()} run {message['run']} seq {message['seq']}: camera {message['camera_id']} "
    where += f"frame {message['frame_id']} trigger {message['trigger']}"
    decided = f"decided {(message['t_decision_ns'] - message['t_capture_ns']) / 1e6:.1f} ms after capture"
    if message["score"] is None:
        return f"{where}, not scored: treated as a reject, {decided}"
    return f"{where}, score {message['score']:.4g} > {message['threshold']:.4g}, {decided}"


class StateFile:
    """--state: read once, replaced atomically (write aside, fsync, rename) whenever what it holds changed."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.saved: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            self.saved = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--state {self.path}: cannot be read ({exc}); move it away to start afresh") from None
        return self.saved

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None or state == self.saved:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self.saved = state


class ReplayClient:
    """A REQ socket to the replay endpoint with one request in flight. A request unanswered after
    REPLAY_TIMEOUT_S is dropped together with its socket: a REQ socket cannot send again before a reply."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.ctx, self.address = ctx, address
        self.sock = self._connect()
        self.request: ReplayRequest | None = None
        self.deadline = 0.0

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.address)
        except zmq.ZMQError:
            sock.close()  # an open socket would hold the context's term() forever
            raise
        return sock

    def send(self, request: ReplayRequest, now: float) -> bool:
        """Send `request` (queued, even before the endpoint is up); False when the socket refuses it."""
        try:
            self.sock.send_multipart(request.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.request, self.deadline = request, now + REPLAY_TIMEOUT_S
        return True

    def receive(self) -> tuple[ReplayRequest, list[bytes]]:
        assert self.request is not None
        request, self.request = self.request, None
        return request, self.sock.recv_multipart()

    def abandon(self) -> ReplayRequest:
        assert self.request is not None
        request, self.request = self.request, None
        self.sock.close()
        self.sock = self._connect()
        return request

    def close(self) -> None:
        self.sock.close()


class StateSink(Protocol):
    """Where the follower's state goes after each pass of the socket loop: a `StateFile`, or a gateway's queue
    (which writes it once what came before has reached the PLC)."""

    def save(self, state: dict[str, Any]) -> None: ...


class Stop(Protocol):
    """What ends the socket loop: a threading.Event, set by a signal handler or another thread."""

    def is_set(self) -> bool: ...


def serve(
    follower: Follower, sub: zmq.Socket, replay: ReplayClient | None, state: StateSink, stop: Stop, end: float
) -> None:
    """The socket loop, until `stop` is set or the monotonic clock passes `end`: live messages first, then the
    replay reply, the clock and the next replay request."""
    while not stop.is_set() and time.monotonic() < end:
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        if replay is not None and replay.request is not None:
            poller.register(replay.sock, zmq.POLLIN)
        ready = dict(poller.poll(POLL_MS))
        if sub in ready:
            for _ in range(1000):  # drain, but let replies and the clock in now and then
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                emit(follower.on_frames(frames, time.monotonic()))
        now = time.monotonic()
        if replay is not None and replay.request is not None:
            if replay.sock in ready:
                emit(follower.on_reply(*replay.receive(), now))
            elif now >= replay.deadline:
                emit(follower.on_replay_failed(replay.abandon(), f"no answer within {REPLAY_TIMEOUT_S:g} s", now))
        emit(follower.tick(now))
        if replay is not None and replay.request is None:
            request = follower.next_request(now)
            if request is not None and not replay.send(request, now):
                emit(follower.on_replay_failed(request, "cannot send to the replay endpoint", now))
        state.save(follower.state())


@dataclass(frozen=True)
class FollowSettings:
    """Where linewatch is, and how the follower behaves (the options every command shares)."""

    address: str
    replay_address: str
    state: StateFile
    failsafe_after: int
    failsafe: str  # hold | reject
    duration_s: float | None = None


def prepare(settings: FollowSettings, follow_all: bool, gate: Gate | None = None) -> tuple[Follower, float]:
    """A follower resumed from the state file (its lines logged), and the monotonic time to stop at."""
    now = time.monotonic()
    watchdog = Watchdog(settings.failsafe_after, settings.failsafe, now)
    follower = Follower(follow_all, bool(settings.replay_address), watchdog, gate=gate)
    emit(resume(follower, settings.state, now))
    return follower, now + settings.duration_s if settings.duration_s else math.inf


def follow(
    follower: Follower, address: str, replay_address: str, state: StateSink, stop: Stop, end: float = math.inf
) -> None:
    """Subscribe to linewatch's publisher at `address` (and ask `replay_address` for what was missed, unless
    empty) until `stop` is set or `end` passes; the state is saved on the way out."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in ("",) if follower.follow_all else (*REJECT_TOPICS, HEARTBEAT_TOPIC):
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    replay = None
    try:
        if replay_address:
            replay = connected(lambda: ReplayClient(ctx, replay_address), "--replay-address", replay_address)
        connected(lambda: sub.connect(address), "--address", address)
        serve(follower, sub, replay, state, stop, end)
    finally:
        state.save(follower.state())
        sub.close()
        if replay is not None:
            replay.close()
        ctx.term()


def connected(connect: Any, option: str, address: str) -> Any:
    """`connect()`'s result; ValueError naming the option for an address ZeroMQ cannot use."""
    try:
        return connect()
    except zmq.ZMQError as exc:
        raise ValueError(f"{option} {address!r}: not a ZeroMQ endpoint ({exc}); e.g. tcp://10.0.3.20:5556") from None


def resume(follower: Follower, state: StateFile, now: float) -> list[str]:
    """Go on from the state file when there is one; exit naming the file when it is not a follower's state."""
    saved = state.load()
    if saved is None:
        return []
    try:
        follower.restore(saved, now)
    except (KeyError, TypeError, ValueError) as exc:
        why = f"not a follower state ({exc!r}); move it away to start afresh"
        raise SystemExit(f"--state {state.path}: {why}") from None
    return [] if saved["run"] is None else [f"resuming run {saved['run']}, complete up to seq {saved['complete']}"]


def emit(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)
