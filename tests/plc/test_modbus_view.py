"""The Modbus register image over time, driven by a clock of our own: one rising edge per reject, live and
recovered rejects on their own coils, the fail-safe, and the gateway's checkpoints that wait for the pulses."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from linewatch_plc import modbus as mb
from linewatch_plc.follower import FollowSettings, StateFile
from linewatch_plc.gateway import Checkpoint, Done, FailSafe, Part, consume, shows_newer
from linewatch_plc.modbus import ModbusView

PULSE_S = 0.02
STEP_S = 0.001


def message(seq: int, verdict: str = "reject", run: str = "r1", capture_ns: int = 1_700_000_000_123_000_000) -> dict:
    score = None if verdict == "error" else (9.0 if verdict == "reject" else 1.0)
    return {
        "run": run,
        "seq": seq,
        "camera_id": "top",
        "frame_id": seq,
        "trigger": None,
        "score": score,
        "threshold": 5.0,
        "verdict": verdict,
        "t_capture_ns": capture_ns,
        "t_decision_ns": capture_ns + 1,
        "bundle": "h",
    }


class Clock:
    """Ticks the view every STEP_S and records each coil's rising edges: (time, seq register at that moment)."""

    def __init__(self, view: ModbusView) -> None:
        self.view, self.now = view, 0.0
        self.edges: dict[int, list[tuple[float, int]]] = {mb.COIL_REJECT: [], mb.COIL_LATE_REJECT: []}
        self.on: dict[int, bool] = dict.fromkeys(self.edges, False)
        self.falls: dict[int, list[float]] = {c: [] for c in self.edges}

    def run(self, seconds: float) -> None:
        base = mb.CAMERA_BASE
        registers = {mb.COIL_REJECT: base + mb.CAM_PULSE_SEQ, mb.COIL_LATE_REJECT: base + mb.CAM_LATE_PULSE_SEQ}
        for _ in range(round(seconds / STEP_S)):
            asyncio.run(self.view.tick(self.now))
            for coil, register in registers.items():
                on = self.view.image.coil(coil)
                if on and not self.on[coil]:
                    self.edges[coil].append((self.now, self.view.image.u32(register)))
                if self.on[coil] and not on:
                    self.falls[coil].append(self.now)
                self.on[coil] = on
            self.now += STEP_S

    def apply(self, event: Any) -> None:
        asyncio.run(self.view.apply(event))


def test_each_live_reject_is_its_own_pulse_with_its_seq_and_capture_time() -> None:
    view = ModbusView(["top"], PULSE_S, "hold")
    clock = Clock(view)
    for seq in (3, 4, 7):
        clock.apply(Part(message(seq), replayed=False))
    clock.apply(Part(message(8, "pass"), replayed=False))
    given = view.mark()
    assert view.image.words[mb.CAMERA_BASE + mb.CAM_QUEUED] == 3 and not view.reached(given)
    clock.run(0.2)
    edges = clock.edges[mb.COIL_REJECT]
    assert [seq for _, seq in edges] == [3, 4, 7]
    gaps = [b - a for (a, _), (b, _) in zip(edges, edges[1:], strict=False)]
    assert all(g >= 2 * PULSE_S - 2 * STEP_S for g in gaps)  # on for a pulse, off as long
    assert view.image.u32(mb.CAMERA_BASE + mb.CAM_REJECTS) == 3 and clock.edges[mb.COIL_LATE_REJECT] == []
    words = view.image.words[mb.CAMERA_BASE + mb.CAM_PULSE_CAPTURE_MS : mb.CAMERA_BASE + mb.CAM_PULSE_CAPTURE_MS + 4]
    assert words[0] << 48 | words[1] << 32 | words[2] << 16 | words[3] == 1_700_000_000_123
    assert view.image.u32(mb.CAMERA_BASE + mb.CAM_SEQ) == 8 and view.reached(given)


def test_recovered_rejects_pulse_the_late_coil_and_never_hold_up_a_live_one() -> None:
    view = ModbusView(["top"], PULSE_S, "hold")
    clock = Clock(view)
    clock.apply(Part(message(20, "pass"), replayed=False))
    for seq in range(1, 11):  # a late start: the run's first rejects come back from the replay endpoint
        clock.apply(Part(message(seq), replayed=True))
    clock.apply(Part(message(21), replayed=False))
    clock.run(0.005)
    assert clock.edges[mb.COIL_REJECT] == [(0.0, 21)]  # at once, not after ten late pulses
    clock.run(0.6)
    assert [seq for _, seq in clock.edges[mb.COIL_LATE_REJECT]] == list(range(1, 11))
    assert view.image.u32(mb.CAMERA_BASE + mb.CAM_LATE_REJECTS) == 10
    assert view.image.u32(mb.CAMERA_BASE + mb.CAM_SEQ) == 21  # the recovered older parts did not replace it
    clock.apply(Part(message(22, "pass"), replayed=True))  # a recovered newer one of the same run does
    assert view.image.u32(mb.CAMERA_BASE + mb.CAM_SEQ) == 22


def test_the_fail_safe_holds_the_reject_coil_and_the_next_reject_after_it_is_a_new_edge() -> None:
    view = ModbusView(["top"], PULSE_S, "reject")
    clock = Clock(view)
    clock.apply(Part(message(1), replayed=False))
    clock.run(0.01)  # mid-pulse
    clock.apply(FailSafe(True))
    clock.apply(Part(message(2), replayed=False))  # a reject waiting while the coil is held
    clock.run(0.1)
    assert view.image.coil(mb.COIL_REJECT) and view.image.coil(mb.COIL_FAILSAFE)
    assert view.reached(view.mark())  # the held coil rejects the waiting one's part too
    assert len(clock.edges[mb.COIL_REJECT]) == 1 and clock.falls[mb.COIL_REJECT] == []  # held through it
    left_at = clock.now
    clock.apply(FailSafe(False))
    clock.run(0.1)
    (fall,) = clock.falls[mb.COIL_REJECT][:1]
    second = clock.edges[mb.COIL_REJECT][1]
    assert fall == left_at and second[1] == 2 and second[0] - fall >= PULSE_S - STEP_S  # low, then its own edge
    assert view.reached(view.mark()) and not view.image.coil(mb.COIL_FAILSAFE)


def test_hold_mode_leaves_the_reject_coils_alone_in_a_fail_safe() -> None:
    view = ModbusView(["top"], PULSE_S, "hold")
    clock = Clock(view)
    clock.apply(FailSafe(True))
    clock.run(0.05)
    assert view.image.coil(mb.COIL_FAILSAFE) and not view.image.coil(mb.COIL_OK)
    assert not view.image.coil(mb.COIL_REJECT)


def test_the_plc_may_read_but_not_write() -> None:
    view = ModbusView(["top"], PULSE_S, "hold")
    registers = [0] * (len(view.image.words) + 1)
    view.image.set_u32(mb.HR_SEQ, 70_000)
    assert asyncio.run(view.serve_request(3, 0, mb.HR_SEQ, 2, registers, None)) is None
    assert registers[mb.HR_SEQ : mb.HR_SEQ + 2] == [1, 70_000 - 65_536]
    assert asyncio.run(view.serve_request(6, 0, mb.HR_SEQ, 1, registers, [5])) == mb.ILLEGAL_FUNCTION


def run_consumer(view: ModbusView, items: list[Any], tmp_path: Path) -> list[tuple[int, bool, bool]]:
    """Feed `items` to the gateway's consumer, then stop it; returns each state written with, at that moment,
    whether a live pulse was on and whether late rejects were still waiting."""
    written: list[tuple[int, bool, bool]] = []

    class Watched(StateFile):
        def save(self, saved: dict[str, Any]) -> None:
            late_waiting = bool(view.image.words[mb.CAMERA_BASE + mb.CAM_LATE_QUEUED])
            written.append((saved["complete"], view.image.coil(mb.COIL_REJECT), late_waiting))
            super().save(saved)

    settings = FollowSettings("tcp://127.0.0.1:1", "", Watched(tmp_path / "state.json"), 5, "hold")

    async def scenario() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for item in [*items, Done()]:
            queue.put_nowait(item)
        await consume(view, queue, settings)

    asyncio.run(scenario())
    return written


def test_a_checkpoint_is_written_only_once_the_pulses_before_it_ended(tmp_path: Path) -> None:
    """The gateway's consumer: the follower's state reaches the file behind the pulses it owes, so a crash
    hands an unpulsed reject on again instead of losing it, and a stop first finishes them."""
    view = ModbusView(["top"], 0.02, "hold")
    items = [Part(message(seq), replayed=False) for seq in (1, 2, 3)] + [Checkpoint({"complete": 3})]
    written = run_consumer(view, items, tmp_path)
    assert written == [(3, False, False)]  # once, after the third pulse had ended
    assert json.loads((tmp_path / "state.json").read_text()) == {"complete": 3}


def test_a_backlog_after_a_checkpoint_does_not_hold_it_back(tmp_path: Path) -> None:
    view = ModbusView(["top"], 0.02, "hold")
    items: list[Any] = [Part(message(1), replayed=False), Checkpoint({"complete": 1})]
    items += [Part(message(seq), replayed=True) for seq in range(2, 30)]  # a long run of recovered ones
    items.append(Checkpoint({"complete": 29}))
    written = run_consumer(view, items, tmp_path)
    assert written[0] == (1, False, True)  # written while the late backlog was still being pulsed
    assert written[-1] == (29, False, False)


def test_a_recovered_verdict_shows_when_it_is_the_newest_the_gateway_knows() -> None:
    new_run = message(1, "pass", run="r2")
    assert shows_newer(None, message(5, run="r1"), True, None)  # nothing shown yet
    assert not shows_newer(("r1", 9), message(5, run="r1"), True, "r1")  # older, same run
    assert shows_newer(("r1", 9), message(12, run="r1"), True, "r1")
    assert shows_newer(("r1", 9), new_run, True, "r2")  # the run the heartbeat names: linewatch restarted
    assert not shows_newer(("r2", 3), message(40, run="r1"), True, "r2")  # the old run's tail stays behind
    assert shows_newer(("r2", 3), message(1, run="r2"), False, "r2")  # a live one always
