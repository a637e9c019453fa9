"""Stage processes run on their own: decide over hand-made score records."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.app.ports import free_port
from pipeline.bundles import ACTIVE, BundleTable
from pipeline.ring import RECORD, VERDICT_PASS, Doorbell, FrameRing
from pipeline.stages import ConveyorPace, DecideArgs, StageContext, decide_main, run_realtime
from pipeline.state import FLAG_STOP_ALL, RunState


class _DecideRig:
    """One decide stage process on rings of its own; on leaving the `with`, it is stopped and they are freed."""

    def __init__(self, priority: int = 0) -> None:
        ctx = mp.get_context("spawn")
        self.state = RunState.create(cameras=1, processes=1)
        self.scores = FrameRing.create(8, doorbell=Doorbell(ctx))
        self.verdicts = FrameRing.create(8)
        self.bundles = BundleTable.create(cameras=1)
        slot = self.bundles.slots[0]  # one bundle, threshold 1.0, deciding cam0: all decide needs of it
        slot["threshold"], slot["hash"], slot["state"] = 1.0, b"hash", ACTIVE
        self.bundles.live[0] = 0
        address = f"tcp://127.0.0.1:{free_port()}"
        args = DecideArgs(self.scores.spec, self.verdicts.spec, ("cam0",), self.bundles.spec, "run", address, 100,
                          priority)  # fmt: skip
        self.process = ctx.Process(target=decide_main, args=(StageContext(self.state.spec, 0), args))

    def __enter__(self) -> _DecideRig:
        return self

    def __exit__(self, *_: object) -> None:
        self.state.flags[FLAG_STOP_ALL] = 1
        if self.process.pid is not None:
            self.process.join(30)
        self.scores.close()
        self.verdicts.close()
        self.bundles.close()
        self.state.close()


def test_decide_publishes_and_forwards_a_retried_frame_once() -> None:
    with _DecideRig() as rig:
        # Frame 0 arrives twice: the stage before decide died after forwarding it but before releasing it,
        # and its restarted successor forwarded it again.
        for frame_id in (0, 0, 1):
            rec = np.zeros((), dtype=RECORD)
            rec["frame_id"], rec["score"], rec["verdict"] = frame_id, 5.0, VERDICT_PASS
            slot = rig.scores.free_slot()
            assert slot is not None
            rig.scores.commit(slot, rec)
        rig.process.start()
        deadline = time.monotonic() + 60
        while rig.scores.written().size and time.monotonic() < deadline:  # all three taken off the ring
            time.sleep(0.01)
        assert not rig.scores.written().size
        assert [int(rig.verdicts.headers[s]["frame_id"]) for s in rig.verdicts.written()] == [0, 1]
        assert int(rig.state.publisher[0]) == 2  # two messages published, not three
        assert int(rig.state.last_decided[0]) == 1


def _may_run_realtime(priority: int) -> bool:
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    return bool(cap_eff & (1 << 23)) or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= priority  # CAP_SYS_NICE


def _policies(pid: int) -> dict[str, tuple[int, int]]:
    """(scheduling policy, real-time priority) of the threads of process `pid` that carry a verdict: its
    main thread ("main") and ZeroMQ's ("ZMQbg/..."). Idle pools started at import (numpy's) are left out."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
        if name == "main" or name.startswith("ZMQbg/"):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[38]), int(fields[37]))  # stat fields 41 (policy) and 40 (rt_priority)
    return out


def test_decide_and_its_publisher_threads_run_at_real_time_priority(capfd: pytest.CaptureFixture) -> None:
    """The verdict must not queue behind the next inference's threads, and neither may ZeroMQ's I/O
    thread that puts it on the wire. Where the box refuses, the stage says so and runs on."""
    with _DecideRig(priority=3) as rig:
        rig.process.start()
        deadline = time.monotonic() + 60
        while not rig.state.ready[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rig.state.ready[0] and rig.process.pid is not None
        policies = _policies(rig.process.pid)
        assert "main" in policies and "ZMQbg/IO/0" in policies
        if _may_run_realtime(3):
            assert set(policies.values()) == {(os.SCHED_FIFO, 3)}, policies
        else:
            assert {policy for policy, _ in policies.values()} == {os.SCHED_OTHER}
            assert "cannot run at real-time priority 3" in capfd.readouterr().err


def test_refused_real_time_priority_says_what_to_grant(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    message = run_realtime(10)
    assert message is not None
    assert "real-time priority 10 (Operation not permitted)" in message
    assert "CAP_SYS_NICE" in message and "LimitRTPRIO" in message and "rtprio" in message


def _supervisor_that_hangs(pids: Any) -> None:
    """A stand-in supervisor: creates the run state, spawns a decide stage, reports its pid and waits."""
    rig = _DecideRig()
    rig.process.start()
    pids.put(rig.process.pid)
    time.sleep(600)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stages_end_when_their_supervisor_is_killed() -> None:
    """Stages ignore SIGTERM (the supervisor runs the stop); a supervisor killed outright must not leave
    them behind, holding the shared memory, the GPU and the publisher's port."""
    ctx = mp.get_context("spawn")
    pids = ctx.Queue()
    supervisor = ctx.Process(target=_supervisor_that_hangs, args=(pids,))
    supervisor.start()
    stage = pids.get(timeout=60)
    try:
        time.sleep(0.5)
        assert _running(stage)  # alive while its supervisor is
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.join(10)
        deadline = time.monotonic() + 20
        while _running(stage) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(stage)
    finally:
        if _running(stage):
            os.kill(stage, signal.SIGKILL)


def test_only_a_stage_of_a_dead_supervisor_sees_it_gone() -> None:
    state = RunState.create(cameras=1, processes=1)
    try:
        assert state.spec.supervisor_pid == os.getpid() and not state.supervisor_gone()
        # Attached as this process's own stage would be (its parent is the supervisor): running on.
        as_child = RunState.attach(dataclasses.replace(state.spec, supervisor_pid=os.getppid()))
        assert not as_child.supervisor_gone() and not as_child.stopping() and not as_child.stopping_sources()
        # Attached with a supervisor that is not its parent (any more): stop.
        orphan = RunState.attach(dataclasses.replace(state.spec, supervisor_pid=os.getppid() + 100_000))
        assert orphan.supervisor_gone() and orphan.stopping() and orphan.stopping_sources()
        as_child.close()
        orphan.close()
    finally:
        state.close()


class _FakeClock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns

    def sleep(self, seconds: float) -> None:
        self.now_ns += round(seconds * 1e9)


def test_paced_replay_reads_just_before_each_release_and_never_bursts() -> None:
    clock = _FakeClock()
    ms = 1_000_000
    pace = ConveyorPace(40 * ms, clock.sleep, clock)
    reads, releases = [], []
    for read_ms in (3, 3, 3, 3, 30, 3, 3):  # the fifth frame's read overruns its lead
        reads.append(pace.before_read())
        clock.now_ns += read_ms * ms
        pace.release(reads[-1])
        releases.append(clock.now_ns)
        clock.now_ns += 20 * ms  # the frame's inference: no reading meanwhile
    gaps = [b - a for a, b in zip(releases, releases[1:], strict=False)]
    assert gaps[:3] == [40 * ms] * 3  # on schedule
    # Reads start a lead of twice the recent read time + 1 ms before the release, not right after the last one.
    leads = [rel - rd for rd, rel in zip(reads, releases, strict=True)]
    assert all(r >= prev + 20 * ms for prev, r in zip(releases, reads[1:], strict=False))
    assert leads[1:4] == [7 * ms] * 3  # reads of 3 ms: a lead of 2 x 3 + 1 ms
    # The slow read releases late; the next part follows a full period later, never in a burst.
    assert gaps[3] > 40 * ms and min(gaps) >= 40 * ms


def _frozen_after_start_up(out: Any) -> None:  # runs in a spawned process: the test runner's heap stays as it is
    import gc

    from pipeline.stages import freeze_startup_heap

    start_up = [[i] for i in range(50_000)]  # tracked containers, like a loaded model's
    freeze_startup_heap()
    later = [[i] for i in range(10)]
    tracked = {id(o) for o in gc.get_objects()}
    out.put((gc.get_freeze_count(), id(start_up[0]) in tracked, id(later[0]) in tracked))


def test_start_up_objects_are_out_of_the_collectors_reach() -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_frozen_after_start_up, args=(out,))
    p.start()
    frozen, start_up_seen, later_seen = out.get(timeout=60)
    p.join(30)
    # A full collection no longer walks what start-up made; what the loop makes later it still does.
    assert frozen >= 50_000 and not start_up_seen and later_seen
