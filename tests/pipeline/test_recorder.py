"""The recorder's work on real rings, a real store (SQLite and PostgreSQL) and a real archive and spool."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from linewatch_plc.wire import Verdict, encode
from pipeline.bundles import SingleBundle
from pipeline.ring import RECORD, VERDICT_PASS, VERDICT_REJECT, FrameRing
from pipeline.store.archive import ImageArchive
from pipeline.store.recorder import Recorder, RunIdentity
from pipeline.store.spool import SpoolReader, SpoolWriter
from pipeline.store.verdicts import HistoryFilter, VerdictStore

SHAPE = (32, 48)


def commit(records: FrameRing, images: FrameRing, seq: int, reject: bool) -> None:
    rec = np.zeros((), dtype=RECORD)
    rec["frame_id"], rec["pub_seq"], rec["topic_seq"] = seq, seq, seq
    rec["t_capture_ns"] = rec["t_decision_ns"] = time.time_ns()
    rec["score"], rec["verdict"], rec["image_slot"] = (2.0, VERDICT_REJECT, -1) if reject else (0.5, VERDICT_PASS, -1)
    if reject:
        slot = images.free_slot()
        assert slot is not None
        images.payloads[slot] = np.random.default_rng(seq).integers(0, 256, (*SHAPE, 4), dtype=np.uint8)
        images.commit(slot, notify=False)
        rec["image_slot"] = slot
    slot = records.free_slot()
    assert slot is not None
    records.commit(slot, rec)


def test_a_batch_is_archived_and_stored_and_only_then_its_slots_are_freed(store_url: str, tmp_path: Path) -> None:
    records, images = FrameRing.create(16), FrameRing.create(4, (*SHAPE, 4))
    store = VerdictStore(store_url)
    archive = ImageArchive(tmp_path / "images", 10**9, 30.0)
    recorder = Recorder(
        store, archive, SpoolReader(tmp_path / "spool"), RunIdentity("run1", ("cam0",), SingleBundle("b", 1.0))
    )
    try:
        for seq in range(1, 9):
            commit(records, images, seq, reject=seq % 4 == 0)
        batch = recorder.take(records, images)
        assert len(batch) == 8 and records.occupancy() == 8  # in hand, not yet freed
        assert recorder.write(batch, records, images)
        assert records.occupancy() == 0 and images.free_slot() is not None and recorder.written == 8
        rows = store.range("run1", 1, 8)
        assert [r.seq for r in rows] == list(range(1, 9))
        kept = [r for r in rows if r.image_key]
        assert [r.seq for r in kept] == [4, 8] and all(r.verdict.verdict == "reject" for r in kept)
        assert all(archive.path(r.image_key, "overlay").is_file() for r in kept if r.image_key)
        # The same batch written again (a recorder killed before freeing it) is stored once.
        assert recorder.store.write(batch.rows) == 0 and store.count("run1") == 8
    finally:
        store.close()
        records.close()
        images.close()


def test_spooled_verdicts_are_taken_back_and_their_segment_removed(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    writer = SpoolWriter(spool_dir, 10**9)
    for seq in range(1, 4):
        v = Verdict("cam0", seq, time.time_ns(), time.time_ns(), 2.0, 1.0, "reject", None)
        image = np.full((*SHAPE, 4), seq, dtype=np.uint8)
        assert writer.append(encode("run2", seq, seq, v, "b")[1], "run2", seq, image)
    writer.seal()
    store = VerdictStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    records, images = FrameRing.create(4), FrameRing.create(2, (*SHAPE, 4))
    archive = ImageArchive(tmp_path / "images", 10**9, 30.0)
    recorder = Recorder(store, archive, SpoolReader(spool_dir), RunIdentity("run3", ("cam0",), SingleBundle("b", 1.0)))
    try:
        batch = recorder.take(records, images)
        assert recorder.write(batch, records, images) and recorder.unspooled == 3
        rows = store.range("run2", 1, 3)
        assert [r.seq for r in rows] == [1, 2, 3] and all(r.image_key for r in rows)
        assert not list(spool_dir.glob("*.seg")) and not list((spool_dir / "images").iterdir())
    finally:
        store.close()
        records.close()
        images.close()


def test_retention_deletes_the_oldest_images_and_marks_their_rows_expired(tmp_path: Path) -> None:
    records, images = FrameRing.create(16), FrameRing.create(8, (*SHAPE, 4))
    store = VerdictStore(f"sqlite:///{tmp_path / 'store.sqlite'}")
    archive = ImageArchive(tmp_path / "images", 10**9, 30.0)
    recorder = Recorder(
        store, archive, SpoolReader(tmp_path / "spool"), RunIdentity("run4", ("cam0",), SingleBundle("b", 1.0))
    )
    try:
        for seq in range(1, 7):
            commit(records, images, seq, reject=True)
            assert recorder.write(recorder.take(records, images), records, images)
            time.sleep(0.01)  # distinct file times: the oldest is the first written
        oldest = [r.image_key for r in store.range("run4", 1, 2) if r.image_key]
        two = sum(archive.path(k, kind).stat().st_size for k in oldest for kind in ("frame", "overlay"))
        archive.max_bytes = archive.bytes_used - two  # room for the four newest of the six
        recorder.retention(time.time_ns(), force=True)
        assert recorder.expired == 2 and archive.bytes_used <= archive.max_bytes
        rows = store.range("run4", 1, 6)
        assert [r.image_expired_ns is not None for r in rows] == [True, True, False, False, False, False]
        assert all(r.image_key for r in rows)  # the rows stay, with the key of what they had
        found = store.search(HistoryFilter(run="run4", verdict="reject", limit=None))
        assert len(found) == 6
        assert json.loads(rows[0].message()[1])["seq"] == 1
    finally:
        store.close()
        records.close()
        images.close()
