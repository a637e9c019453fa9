"""The follower (linewatch_plc.follower): its decisions fed with real wire messages, then `linewatch-plc log`
as a real process against a real publisher, verdict store, replay endpoint and heartbeats."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from linewatch_plc.follower import FIRST_ASK_S, Follower, StateFile, Watchdog
from linewatch_plc.wire import VERDICT_NAMES, Heartbeat, ReplayRequest, Verdict, encode, encode_replay_reply
from pipeline.app.ports import free_port
from pipeline.publisher import RejectPublisher
from pipeline.store.replay import ReplayServer
from pipeline.store.verdicts import StoredVerdict, VerdictStore, sqlite_url

REPO = Path(__file__).resolve().parents[2]

LOGGED = re.compile(r"^(REJECT|ERROR) run (\S+) seq (\d+):")


class Published:
    """One linewatch run's messages, numbered as its publisher numbers them (the bridge sees only some)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.frames: dict[int, list[bytes]] = {}
        self.counts: Counter[str] = Counter()

    def add(self, verdict: str) -> list[bytes]:
        seq = len(self.frames) + 1
        self.counts[verdict] += 1
        score = None if verdict == "error" else (9.5 if verdict == "reject" else 1.0)
        v = Verdict("cam0", seq, 1_000_000, 3_000_000, score, 5.0, verdict, seq * 10)
        self.frames[seq] = encode(self.run, seq, self.counts[verdict], v, "hash")
        return self.frames[seq]

    def heartbeat(self, interval_ms: float = 200.0, health: str = "ok", problems: tuple[str, ...] = ()) -> list[bytes]:
        return Heartbeat(self.run, len(self.frames), dict(self.counts), 0, interval_ms, health, problems).encode()

    def reply(self, request: ReplayRequest, stored_up_to: int | None = None, max_messages: int = 1000) -> list[bytes]:
        """The replay endpoint's answer when the store holds this run up to `stored_up_to`."""
        assert request.run == self.run
        window = ReplayRequest(self.run, request.from_seq, min(request.to_seq, request.from_seq + max_messages - 1))
        last = len(self.frames) if stored_up_to is None else stored_up_to
        seqs = range(window.from_seq, min(window.to_seq, last) + 1)
        return encode_replay_reply(window, [self.frames[s] for s in seqs])

    def wanted(self) -> list[tuple[str, int]]:
        """(run, seq) of every reject and error: what the bridge must end up having handled once each."""
        return [(self.run, s) for s, f in self.frames.items() if f[0] in (b"reject", b"error")]


def new_bridge(follow_all: bool = False, replay: bool = True, give_up_s: float = 60.0) -> Follower:
    return Follower(follow_all, replay, Watchdog(5, "hold", now=0.0), give_up_s)


def logged(lines: list[str]) -> list[tuple[str, int]]:
    return [(m.group(2), int(m.group(3))) for m in map(LOGGED.match, lines) if m]


def recover(bridge: Follower, runs: dict[str, Published], now: float) -> list[str]:
    """Answer the bridge's replay requests from the runs' stores until it asks for nothing more now."""
    lines: list[str] = []
    while (request := bridge.next_request(now)) is not None:
        lines += bridge.on_reply(request, runs[request.run].reply(request, max_messages=4), now)
    return lines


def test_a_jump_in_topic_seq_is_asked_for_and_the_missed_rejects_are_handled_as_replayed() -> None:
    bridge, r1 = new_bridge(), Published("r1")
    assert bridge.on_frames(r1.add("reject"), 0.1)[1].startswith(
        "REJECT run r1 seq 1: camera cam0 frame 1 trigger 10, score 9.5 > 5, decided 2.0 ms after capture"
    )
    r1.add("pass"), r1.add("reject"), r1.add("error")  # the reject and the error are lost on the way
    lines = bridge.on_frames(r1.add("reject"), 1.0)
    assert lines[0] == "GAP: missed 1 reject message in seqs 2..4 of run r1; asking the replay endpoint"
    assert logged(lines) == [("r1", 5)]
    assert bridge.next_request(1.0) is None  # the recorder stores a little behind: asked a moment later
    request = bridge.next_request(1.0 + FIRST_ASK_S)
    assert request == ReplayRequest("r1", 2, 4)
    lines = bridge.on_reply(request, r1.reply(request), 1.2)
    assert lines == [
        "REJECT run r1 seq 3: camera cam0 frame 3 trigger 30, score 9.5 > 5, decided 2.0 ms after capture (replayed)",
        "ERROR run r1 seq 4: camera cam0 frame 4 trigger 40, not scored: treated as a reject, "
        "decided 2.0 ms after capture (replayed)",
    ]
    assert bridge.on_frames(r1.heartbeat(), 1.3) == [] and bridge.next_request(10.0) is None
    assert bridge.complete() == 5


def test_a_heartbeat_shows_a_trailing_missed_reject_which_is_asked_for_until_it_is_stored() -> None:
    bridge, r1 = new_bridge(), Published("r1")
    bridge.on_frames(r1.add("reject"), 0.0)
    bridge.on_frames(r1.heartbeat(), 0.1)
    r1.add("pass"), r1.add("reject")  # lost, and no reject follows
    lines = bridge.on_frames(r1.heartbeat(), 0.3)
    assert lines == ["GAP: missed 1 reject message in seqs 2..3 of run r1; asking the replay endpoint"]
    request = bridge.next_request(0.5)
    assert request == ReplayRequest("r1", 2, 3)
    lines = bridge.on_reply(request, r1.reply(request, stored_up_to=2), 0.5)  # the recorder is behind
    assert lines == ["replay: seqs 3..3 of run r1 not stored yet; asking again"]
    assert bridge.next_request(0.6) is None  # again one heartbeat interval later
    request = bridge.next_request(0.7)
    assert request == ReplayRequest("r1", 3, 3)
    assert bridge.on_reply(request, r1.reply(request, stored_up_to=2), 0.7) == []  # said once per stretch
    assert bridge.next_request(1.0) is None and bridge.complete() == 2  # backing off: 0.4 s now
    request = bridge.next_request(1.1)
    assert request is not None and logged(bridge.on_reply(request, r1.reply(request), 1.1)) == [("r1", 3)]
    assert bridge.complete() == 3 and bridge.next_request(100.0) is None


def test_a_late_bridge_recovers_the_whole_run_window_by_window() -> None:
    bridge, r1 = new_bridge(), Published("r1")
    for verdict in ["pass", "reject", "error", "reject", "pass", "pass", "reject", "reject", "error", "pass"]:
        r1.add(verdict)
    lines = bridge.on_frames(r1.heartbeat(), 0.0)
    assert lines == [
        "following run r1",
        "GAP: missed 4 reject messages in seqs 1..10 of run r1; asking the replay endpoint",
        "GAP: missed 2 error messages in seqs 1..10 of run r1; asking the replay endpoint",
    ]
    assert logged(recover(bridge, {"r1": r1}, 1.0)) == r1.wanted()  # three windows of at most 4
    assert bridge.complete() == 10


def test_a_new_run_recovers_the_old_runs_tail_as_far_as_it_is_stored_and_the_new_run_from_1() -> None:
    bridge, r1, r2 = new_bridge(), Published("r1"), Published("r2")
    bridge.on_frames(r1.add("reject"), 0.0)
    bridge.on_frames(r1.heartbeat(), 0.1)
    for verdict in ["pass", "reject", "error", "pass", "pass", "pass", "reject"]:
        r1.add(verdict)  # lost: the bridge's link was down while linewatch stopped
    r2.add("reject"), r2.add("pass")
    lines = bridge.on_frames(r2.add("reject"), 1.0)
    assert lines[:2] == [
        "NEW RUN r2: linewatch restarted; asking for run r1 after seq 1",
        "GAP: missed 1 reject message in seqs 1..2 of run r2; asking the replay endpoint",
    ]
    assert logged(lines) == [("r2", 3)]
    lines = recover(bridge, {"r1": r1, "r2": r2}, 2.0)
    assert sorted(logged(lines)) == sorted(r1.wanted()[1:] + [("r2", 1)])
    assert bridge.next_request(100.0) is None  # the old run's tail ended where its stored messages end
    bridge.on_frames(r2.heartbeat(), 2.1)
    assert bridge.state()["run"] == "r2" and bridge.complete() == 3 and bridge.state()["handled"] == {}


def test_a_message_is_handled_once_whether_it_comes_live_twice_or_live_and_replayed() -> None:
    bridge, r1 = new_bridge(), Published("r1")
    first = r1.add("reject")
    assert logged(bridge.on_frames(first, 0.0)) == [("r1", 1)]
    assert bridge.on_frames(first, 0.0) == []
    r1.add("error")  # lost: the error stream's gap covers the reject that came live
    r1.add("reject")
    bridge.on_frames(r1.frames[3], 0.1)
    lines = bridge.on_frames(r1.heartbeat(), 0.2)
    assert lines == ["GAP: missed 1 error message in seqs 1..3 of run r1; asking the replay endpoint"]
    assert logged(recover(bridge, {"r1": r1}, 1.0)) == [("r1", 2)]


def test_the_state_goes_on_exactly_where_it_stopped(tmp_path: Path) -> None:
    bridge, r1 = new_bridge(), Published("r1")
    bridge.on_frames(r1.add("reject"), 0.0)
    bridge.on_frames(r1.heartbeat(), 0.0)
    r1.add("reject")  # lost
    bridge.on_frames(r1.add("reject"), 0.1)  # handled, above a pending gap
    state = StateFile(tmp_path / "bridge.json")
    state.save(bridge.state())
    saved = json.loads((tmp_path / "bridge.json").read_text())
    assert saved["run"] == "r1" and saved["complete"] == 1 and saved["topic_seqs"] == {"error": 0, "reject": 3}
    assert saved["gaps"] == [["r1", 2, 2]] and saved["handled"] == {"r1": [3]}
    assert not list(tmp_path.glob("*.tmp"))

    restarted = new_bridge()
    loaded = StateFile(tmp_path / "bridge.json").load()
    assert loaded is not None
    restarted.restore(loaded, 50.0)
    assert restarted.state() == bridge.state()
    assert restarted.on_frames(r1.frames[3], 50.0) == []  # handled before the restart
    r1.add("pass")  # not followed
    r1.add("reject")  # lost while the bridge was away
    lines = restarted.on_frames(r1.add("reject"), 50.1)
    assert lines[0] == "GAP: missed 1 reject message in seqs 4..5 of run r1; asking the replay endpoint"
    assert sorted(logged(lines + recover(restarted, {"r1": r1}, 51.0))) == [("r1", 2), ("r1", 5), ("r1", 6)]


def test_a_state_of_a_bridge_following_other_streams_asks_for_everything_after_complete() -> None:
    reject_only, r1 = new_bridge(), Published("r1")
    reject_only.on_frames(r1.add("reject"), 0.0)
    reject_only.on_frames(r1.heartbeat(), 0.1)
    r1.add("pass"), r1.add("pass")
    every = new_bridge(follow_all=True)
    every.restore(json.loads(json.dumps(reject_only.state())), 1.0)
    lines = every.on_frames(r1.add("pass"), 1.0)
    assert lines == ["GAP: missed 2 messages in seqs 2..3 of run r1; asking the replay endpoint"]
    assert recover(every, {"r1": r1}, 2.0) == [] and every.complete() == 4
    every.on_frames(r1.heartbeat(), 2.1)
    assert every.state()["topic_seqs"] == {"error": 0, "pass": 3, "reject": 1}


class RecordingGate:
    """A gate that keeps what it was handed, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def part(self, message: dict[str, Any], replayed: bool) -> None:
        self.calls.append(("part", (message["seq"], message["verdict"], replayed)))

    def heartbeat(self, hb: Heartbeat) -> None:
        self.calls.append(("heartbeat", hb.seq))

    def failsafe(self, active: bool) -> None:
        self.calls.append(("failsafe", active))


@pytest.mark.parametrize("follow_all", [True, False], ids=["all", "rejects"])
def test_each_live_and_replayed_verdict_reaches_the_gate_once_in_order(follow_all: bool) -> None:
    gate, r1 = RecordingGate(), Published("r1")
    follower = Follower(follow_all, True, Watchdog(5, "hold", now=0.0), gate=gate)
    for verdict in ["reject", "pass", "error"]:
        follower.on_frames(r1.add(verdict), 0.0)
    follower.on_frames(r1.heartbeat(), 0.1)
    r1.add("reject"), r1.add("pass")  # missed on the way
    follower.on_frames(r1.add("reject"), 0.2)
    recover(follower, {"r1": r1}, 1.0)
    follower.on_frames(r1.add("reject"), 1.1)
    follower.on_frames(r1.frames[6], 1.2)  # the same message again
    follower.on_frames(r1.heartbeat(), 1.3)
    parts = [args for kind, args in gate.calls if kind == "part"]
    expected = [(1, "reject", False), (2, "pass", False), (3, "error", False), (6, "reject", False)]
    expected += [(4, "reject", True), (5, "pass", True), (7, "reject", False)]
    assert parts == [p for p in expected if follow_all or p[1] != "pass"]
    assert [args for kind, args in gate.calls if kind == "heartbeat"] == [3, 7] and follower.complete() == 7


def test_the_gate_is_told_when_heartbeats_stop_and_when_they_come_back() -> None:
    gate, r1 = RecordingGate(), Published("r1")
    follower = Follower(False, True, Watchdog(3, "hold", now=0.0), gate=gate)
    follower.on_frames(r1.heartbeat(interval_ms=100.0), 0.0)
    assert follower.tick(0.29) == [] and ("failsafe", True) not in gate.calls
    assert follower.tick(0.31)[0].startswith("FAIL-SAFE: no heartbeat from linewatch for 310 ms")
    follower.tick(0.5)  # still silent: said once
    follower.on_frames(r1.heartbeat(interval_ms=100.0), 0.6)
    assert gate.calls == [("heartbeat", 0), ("failsafe", True), ("failsafe", False), ("heartbeat", 0)]


def test_without_a_replay_endpoint_a_gap_is_logged_as_lost() -> None:
    bridge, r1 = new_bridge(replay=False), Published("r1")
    bridge.on_frames(r1.add("reject"), 0.0)
    r1.add("reject")
    lines = bridge.on_frames(r1.add("reject"), 0.1)
    assert lines[0] == "GAP: missed 1 reject message in seqs 2..2 of run r1; no replay endpoint: lost"
    assert bridge.next_request(10.0) is None


def test_an_unanswered_request_is_asked_again_later_and_given_up_after_the_limit() -> None:
    bridge, r1 = new_bridge(give_up_s=30.0), Published("r1")
    bridge.on_frames(r1.add("reject"), 0.0)
    bridge.on_frames(r1.heartbeat(interval_ms=200.0), 0.0)
    r1.add("reject")
    bridge.on_frames(r1.add("reject"), 0.1)
    request = bridge.next_request(1.0)
    assert request == ReplayRequest("r1", 2, 2)
    assert bridge.on_replay_failed(request, "no answer within 1 s", 1.0) == [
        "replay of seqs 2..2 of run r1 failed (no answer within 1 s); asking again"
    ]
    refused = encode_replay_reply(request, [], "r1.db: read failed (disk I/O error)")
    assert bridge.on_reply(request, refused, 1.2) == []  # the same stretch: said once
    assert bridge.next_request(1.5) is None and bridge.next_request(1.6) == request  # 0.2 s, then 0.4 s
    assert bridge.on_frames(r1.heartbeat(), 20.0) == [] and bridge.tick(20.0) == [] and bridge.complete() == 1
    bridge.on_frames(r1.heartbeat(), 30.0)
    assert bridge.tick(30.2) == ["LOST: seqs 2..2 of run r1 not replayed within 30 s; rejects among them missed"]
    assert bridge.complete() == 3 and bridge.next_request(100.0) is None


def test_the_watchdog_goes_fail_safe_once_on_silence_and_leaves_on_the_next_heartbeat() -> None:
    r1 = Published("r1")
    watchdog = Watchdog(5, "hold", now=0.0)
    assert watchdog.check(4.9) == []  # 1 s assumed before the first heartbeat
    assert watchdog.check(5.1) == ["FAIL-SAFE: no heartbeat from linewatch for 5100 ms; hold the gate"]
    assert watchdog.check(9.0) == [] and watchdog.active
    beat = Heartbeat.decode(r1.heartbeat(interval_ms=100.0))
    assert watchdog.beat(beat, 9.0) == ["heartbeat back after 9000 ms; leaving fail-safe"]
    assert watchdog.check(9.45) == []  # 5 of the heartbeat's own 100 ms intervals
    rejecting = Watchdog(3, "reject", now=0.0)
    rejecting.beat(beat, 1.0)
    assert rejecting.check(1.35) == ["FAIL-SAFE: no heartbeat from linewatch for 350 ms; treating parts as rejects"]


def test_a_degraded_linewatch_is_logged_when_its_health_changes() -> None:
    r1, watchdog = Published("r1"), Watchdog(5, "hold", now=0.0)
    ok = Heartbeat.decode(r1.heartbeat())
    sick = Heartbeat.decode(r1.heartbeat(health="degraded", problems=("camera cam1 disconnected",)))
    sicker = Heartbeat.decode(
        r1.heartbeat(health="degraded", problems=("camera cam1 disconnected", "stage infer not ready"))
    )
    assert watchdog.beat(ok, 0.1) == []
    assert watchdog.beat(sick, 0.2) == ["linewatch degraded: camera cam1 disconnected"]
    assert watchdog.beat(sick, 0.3) == []
    assert watchdog.beat(sicker, 0.4) == ["linewatch degraded: camera cam1 disconnected; stage infer not ready"]
    assert watchdog.beat(ok, 0.5) == ["linewatch healthy again"]


def test_a_malformed_message_or_heartbeat_is_ignored_with_a_reason() -> None:
    bridge = new_bridge()
    assert bridge.on_frames([b"reject", b'{"v": 99}'], 0.0) == [
        "ignored message: message schema version 99, this reader understands 1"
    ]
    assert bridge.on_frames([b"heartbeat", b'{"v": 1}'], 0.0) == [
        "ignored heartbeat: malformed heartbeat: KeyError('run')"
    ]


# --- the bridge as a process, against a real line ---------------------------------------------------------

HEARTBEAT_MS = 100.0
LAG_S = 0.08  # the recorder stores this far behind publishing
MIXED = ["pass", "reject", "pass", "error", "reject", "pass", "pass", "reject", "pass", "reject"]


class Line:
    """A stand-in for `linewatch run`, in the test's thread: a real RejectPublisher, a real SQLite VerdictStore
    written LAG_S behind publishing (as the recorder does) while `recording`, a real ReplayServer reading it
    (8 messages a reply, so a long gap takes several), and a heartbeat every HEARTBEAT_MS while `beating`."""

    def __init__(self, tmp_path: Path) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.replay_address = f"tcp://127.0.0.1:{free_port()}"
        self.store = VerdictStore(sqlite_url(tmp_path / "store.db"))
        self.server = ReplayServer(self.store, self.replay_address, max_messages=8).start()
        self.publisher: RejectPublisher | None = None
        self.unstored: list[tuple[float, StoredVerdict]] = []
        self.wanted: list[tuple[str, int]] = []  # (run, seq) of every reject and error published
        self.beating, self.recording, self.next_beat = True, True, 0.0
        self.start_run("run-1")

    def start_run(self, run: str) -> None:
        """linewatch (re)starts: a new run id, sequences from 1."""
        if self.publisher is not None:
            self.publisher.close()
        self.run, self.counters = run, np.zeros(1 + len(VERDICT_NAMES), np.int64)
        self.publisher = RejectPublisher(self.address, 1000, run, self.counters)

    def publish(self, verdict: str, lost: bool = False) -> int:
        """One verdict; `lost`: numbered and recorded but dropped on the way, as a full queue drops it."""
        assert self.publisher is not None
        topic = 1 + VERDICT_NAMES.index(verdict)
        score = None if verdict == "error" else 1.0
        v = Verdict("cam0", int(self.counters[0]), time.time_ns(), time.time_ns(), score, 0.5, verdict, None)
        if lost:
            self.counters[[0, topic]] += 1
            seq = int(self.counters[0])
        else:
            seq = self.publisher.publish(v, "hash")[0]
        stored = StoredVerdict(self.run, seq, int(self.counters[topic]), v, "hash")
        self.unstored.append((time.monotonic() + LAG_S, stored))
        if verdict != "pass":
            self.wanted.append((self.run, seq))
        return seq

    def pump(self) -> None:
        """Record what is due, and send the heartbeat when it is due."""
        assert self.publisher is not None
        now = time.monotonic()
        due = [v for t, v in self.unstored if t <= now and self.recording]
        if due:
            self.store.write(due)
            self.unstored = [(t, v) for t, v in self.unstored if t > now]
        if self.beating and now >= self.next_beat:
            counts = {name: int(self.counters[1 + i]) for i, name in enumerate(VERDICT_NAMES)}
            beat = Heartbeat(self.run, int(self.counters[0]), counts, time.time_ns(), HEARTBEAT_MS, "ok")
            self.publisher.sock.send_multipart(beat.encode())
            self.next_beat = now + HEARTBEAT_MS / 1000

    def run_until(self, what: str, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
            self.pump()
            time.sleep(0.01)

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.run_until(f"{seconds} s", lambda: time.monotonic() >= end, timeout_s=seconds + 5)

    def close(self) -> None:
        self.server.stop()
        if self.publisher is not None:
            self.publisher.close()
        self.store.close()


class BridgeProcess:
    """`linewatch-plc log` run as a process against the line; its output goes to a file."""

    def __init__(self, line: Line, log: Path, *args: str) -> None:
        self.log = log
        argv = [sys.executable, "-m", "linewatch_plc.cli", "log", "--address", line.address]
        argv += ["--replay-address", line.replay_address, *args]
        with log.open("w") as out:
            env = {**os.environ, "PYTHONPATH": str(REPO / "plc")}
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def handled(self) -> Counter[tuple[str, int]]:
        return Counter(logged(self.lines()))


@pytest.fixture()
def line(tmp_path: Path) -> Iterator[Line]:
    made = Line(tmp_path)
    yield made
    made.close()


@pytest.fixture()
def bridges() -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        if bridge.proc.poll() is None:
            bridge.proc.kill()
            bridge.proc.wait()


def handled_all(line: Line, *bridges: BridgeProcess) -> Callable[[], bool]:
    return lambda: set(sum((b.handled() for b in bridges), Counter())) >= set(line.wanted)


def test_a_bridge_started_late_ends_with_every_reject_and_error_of_the_run_once(
    tmp_path: Path, line: Line, bridges: list[BridgeProcess]
) -> None:
    for verdict in MIXED * 2:
        line.publish(verdict)  # before the bridge exists
    state = tmp_path / "bridge.json"
    bridges.append(bridge := BridgeProcess(line, tmp_path / "bridge.log", "--state", str(state)))
    line.run_until("catching up on the run", handled_all(line, bridge))
    for verdict, lost in [("reject", False), ("pass", False), ("reject", True), ("error", False), ("pass", True)]:
        line.publish(verdict, lost)  # a reject lost on the way: the next reject's topic_seq jumps
    line.publish("reject")
    line.publish("reject", lost=True)  # a trailing one: only the heartbeats show it

    def complete() -> bool:
        return handled_all(line, bridge)() and json.loads(state.read_text())["complete"] == 27

    line.run_until("every reject and error, and the state complete", complete)
    assert bridge.handled() == Counter(line.wanted)
    replayed = set(logged([x for x in bridge.lines() if x.endswith("(replayed)")]))
    assert {("run-1", 23), ("run-1", 27)} <= replayed and ("run-1", 21) not in replayed
    bridge.proc.send_signal(signal.SIGTERM)
    assert bridge.proc.wait(timeout=10) == 0
    assert json.loads(state.read_text())["complete"] == 27


def test_a_bridge_killed_with_a_gap_pending_goes_on_after_restart_across_a_linewatch_restart_without_repeats(
    tmp_path: Path, line: Line, bridges: list[BridgeProcess]
) -> None:
    state = tmp_path / "bridge.json"
    bridges.append(first := BridgeProcess(line, tmp_path / "first.log", "--state", str(state)))
    line.run_until("the bridge following", lambda: "following run run-1" in first.lines())
    for verdict in MIXED:
        line.publish(verdict)
    line.recording = False  # the store falls behind: the gap below stays pending
    line.publish("reject", lost=True)
    line.publish("reject")

    def pending() -> bool:
        saved = json.loads(state.read_text()) if state.is_file() else {}
        return saved.get("gaps") == [["run-1", 11, 11]] and saved.get("handled") == {"run-1": [12]}

    line.run_until("the gap pending, the reject after it handled", pending)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    line.recording = True
    for verdict in MIXED:
        line.publish(verdict)  # while the bridge is down
    line.start_run("run-2")  # ... and linewatch restarts
    for verdict in MIXED:
        line.publish(verdict)
    bridges.append(second := BridgeProcess(line, tmp_path / "second.log", "--state", str(state)))
    line.run_until("every reject and error of both runs", handled_all(line, first, second))
    assert first.handled() + second.handled() == Counter(line.wanted)
    assert second.lines()[0] == "resuming run run-1, complete up to seq 10"
    assert "NEW RUN run-2: linewatch restarted; asking for run run-1 after seq 12" in second.lines()


def test_a_silent_linewatch_sends_the_bridge_fail_safe_until_heartbeats_come_back(
    tmp_path: Path, line: Line, bridges: list[BridgeProcess]
) -> None:
    args = ("--failsafe-after", "5", "--failsafe", "reject")
    bridges.append(bridge := BridgeProcess(line, tmp_path / "bridge.log", *args))
    line.run_until("the bridge following", lambda: "following run run-1" in bridge.lines())
    line.beating = False
    quiet_from = len(bridge.lines())
    line.run_until("fail-safe", lambda: any(x.startswith("FAIL-SAFE") for x in bridge.lines()[quiet_from:]))
    line.run_for(0.5)  # still silent: it stays in fail-safe, said once
    line.beating = True
    line.run_until("leaving fail-safe", lambda: any("leaving fail-safe" in x for x in bridge.lines()[quiet_from:]))
    after = bridge.lines()[quiet_from:]
    first = next(i for i, x in enumerate(after) if x.startswith("FAIL-SAFE"))
    assert re.fullmatch(r"FAIL-SAFE: no heartbeat from linewatch for \d+ ms; treating parts as rejects", after[first])
    assert re.fullmatch(r"heartbeat back after \d+ ms; leaving fail-safe", after[first + 1])  # said once till then
