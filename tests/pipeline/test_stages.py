"""Stage processes run on their own: decide over hand-made score records."""

import multiprocessing as mp
import time

import numpy as np

from pipeline.bench import free_port
from pipeline.ring import RECORD, VERDICT_PASS, Doorbell, FrameRing
from pipeline.stages import StageContext, decide_main
from pipeline.state import FLAG_STOP_ALL, RunState


def test_decide_publishes_and_forwards_a_retried_frame_once() -> None:
    ctx = mp.get_context("spawn")
    state = RunState.create(cameras=1, processes=1)
    scores = FrameRing.create(8, doorbell=Doorbell(ctx))
    verdicts = FrameRing.create(8)
    # Frame 0 arrives twice: the stage before decide died after forwarding it but before releasing it,
    # and its restarted successor forwarded it again.
    for frame_id in (0, 0, 1):
        rec = np.zeros((), dtype=RECORD)
        rec["frame_id"], rec["score"], rec["verdict"] = frame_id, 5.0, VERDICT_PASS
        slot = scores.free_slot()
        assert slot is not None
        scores.commit(slot, rec)
    args = (StageContext(state.spec, 0), scores.spec, verdicts.spec, ["cam0"], 1.0, "hash", "run")
    decide = ctx.Process(target=decide_main, args=(*args, f"tcp://127.0.0.1:{free_port()}", 100))
    try:
        decide.start()
        deadline = time.monotonic() + 60
        while scores.written().size and time.monotonic() < deadline:  # all three taken off the ring
            time.sleep(0.01)
        assert not scores.written().size
        assert [int(verdicts.headers[s]["frame_id"]) for s in verdicts.written()] == [0, 1]
        assert int(state.publisher[0]) == 2  # two messages published, not three
        assert int(state.last_decided[0]) == 1
    finally:
        state.flags[FLAG_STOP_ALL] = 1
        decide.join(30)
        scores.close()
        verdicts.close()
        state.close()
