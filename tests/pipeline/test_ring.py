"""The ring's doorbell: a reader sleeps until a writer, in any process, commits."""

import multiprocessing as mp
import time

from pipeline.ring import WRITTEN, Doorbell, FrameRing, RingSpec


def _commit_after(spec: RingSpec, delay_s: float) -> None:  # runs in a spawned writer process
    time.sleep(delay_s)
    ring = FrameRing.attach(spec)
    ring.payloads[0] = 7
    ring.commit(0)
    ring.close()


def test_doorbell_counts_commits_and_times_out_without_one() -> None:
    bell = Doorbell(mp.get_context("spawn"))
    ring = FrameRing.create(3, (2,), doorbell=bell)
    try:
        assert not bell.wait(0.01)  # nothing committed: the wait runs out
        ring.commit(0)
        ring.commit(1)
        assert bell.wait(0) and bell.wait(0)  # one post per commit
        assert not bell.wait(0.01)
    finally:
        ring.close()


def test_a_batch_of_commits_and_releases_rings_each_bell_once() -> None:
    ctx = mp.get_context("spawn")
    ring = FrameRing.create(3, (2,), doorbell=Doorbell(ctx), room=Doorbell(ctx))
    reader, room = ring.spec.doorbell, ring.spec.room
    assert reader is not None and room is not None
    try:
        ring.commit(0, notify=False)
        ring.commit(1, notify=False)
        assert [int(s) for s in ring.written()] == [0, 1]  # published at once, only nobody woken yet
        assert not reader.wait(0.01)
        ring.notify_reader()
        assert reader.wait(0) and not reader.wait(0.01)  # one wake-up for the batch
        ring.release(0, notify=False)
        ring.release(1, notify=False)
        assert ring.free_slot() == 0 and not room.wait(0.01)
        ring.notify_writer()
        assert room.wait(0) and not room.wait(0.01)
    finally:
        ring.close()


def test_waiting_on_the_other_side_first_rings_for_what_was_deferred() -> None:
    ctx = mp.get_context("spawn")
    ring = FrameRing.create(1, (2,), doorbell=Doorbell(ctx), room=Doorbell(ctx))
    reader, room = ring.spec.doorbell, ring.spec.room
    assert reader is not None and room is not None
    try:
        ring.commit(0, notify=False)  # the only slot, committed quietly: the writer is now short of room
        assert ring.wait_free_slot(lambda: True) is None  # gives up at once, but rang the reader first
        assert reader.wait(0) and not reader.wait(0.01)
        assert ring.wait_free_slot(lambda: True) is None  # nothing deferred any more: no second ring
        assert not reader.wait(0.01)
        ring.release(0, notify=False)
        ring.wait_for_commit(0.01)  # a reader that waits for the next commit first rings for the room it made
        assert room.wait(0) and not room.wait(0.01)
    finally:
        ring.close()


def test_a_commit_in_another_process_wakes_the_reader() -> None:
    ctx = mp.get_context("spawn")
    ring = FrameRing.create(2, (4,), doorbell=Doorbell(ctx))
    writer = ctx.Process(target=_commit_after, args=(ring.spec, 0.5))
    try:
        writer.start()
        assert ring.spec.doorbell is not None
        woken = ring.spec.doorbell.wait(60.0)  # returns on the commit, not after the timeout
        assert woken and ring.headers[0]["state"] == WRITTEN and int(ring.payloads[0][0]) == 7
        assert [int(s) for s in ring.written()] == [0]
    finally:
        writer.join(30)
        ring.close()


def _release_after(spec: RingSpec, delay_s: float) -> None:  # runs in a spawned reader process
    time.sleep(delay_s)
    ring = FrameRing.attach(spec)
    ring.release(0)
    ring.close()


def test_a_release_in_another_process_wakes_the_writer_waiting_for_room() -> None:
    ctx = mp.get_context("spawn")
    ring = FrameRing.create(1, (4,), doorbell=Doorbell(ctx), room=Doorbell(ctx, most=1))
    ring.commit(0)  # the only slot is taken: the writer is short of room
    reader = ctx.Process(target=_release_after, args=(ring.spec, 0.5))
    try:
        reader.start()
        assert ring.free_slot() is None and ring.spec.room is not None
        assert ring.spec.room.wait(60.0)  # returns on the release, not after the timeout
        assert ring.wait_free_slot(lambda: False) == 0
    finally:
        reader.join(30)
        ring.close()


def test_a_bounded_bell_keeps_at_most_its_limit_of_posts() -> None:
    bell = Doorbell(mp.get_context("spawn"), most=2)
    for _ in range(5):  # nobody waiting: posts beyond two are dropped
        bell.ring()
    assert bell.wait(0) and bell.wait(0)
    assert not bell.wait(0.01)
