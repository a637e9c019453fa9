"""The recorder's work: verdicts from the decide stage's buffer (and the spool) to the store and the archive.

The decide stage publishes first and then leaves each verdict in the record ring (a bounded buffer in
shared memory), with the kept frame and its anomaly map in the image ring. The recorder takes a batch,
archives the kept frames, writes the rows in one transaction and only then frees the slots: a
recorder killed at any point leaves the batch in the rings, and its successor writes it again, which
the store's (run, seq) key turns into exactly once. While the store is unreachable the batch stays in
hand and is retried; the buffer fills and the decide stage spools to disk, which the recorder takes
back once the store is there again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.bundles import BundleLookup
from pipeline.ring import FrameRing, verdict_of_record
from pipeline.shadow import shadow_of_record
from pipeline.store.archive import ImageArchive
from pipeline.store.spool import SpooledVerdict, SpoolReader, SpoolWriter
from pipeline.store.verdicts import StoredVerdict, StoreError, VerdictStore

BATCH = 512  # rows per transaction at most
RETENTION_EVERY_S = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunIdentity:
    """What turns a ring record into the message that was published for it."""

    run: str
    cameras: tuple[str, ...]
    bundles: BundleLookup  # each record's bundle slot -> hash and threshold


@dataclass
class Batch:
    """Verdicts in hand: their rows, and where they came from (to free once stored)."""

    rows: list[StoredVerdict] = field(default_factory=list)
    record_slots: list[int] = field(default_factory=list)
    image_slots: list[int] = field(default_factory=list)
    segments: list[tuple[Any, list[SpooledVerdict]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def free_slots(self, records: FrameRing, images: FrameRing) -> None:
        """Give the ring slots it came from back to decide (its spool segments are the caller's)."""
        for slot in self.image_slots:
            images.release(slot, notify=False)
        for slot in self.record_slots:
            records.release(slot, notify=False)
        records.notify_writer()


class Recorder:
    def __init__(
        self,
        store: VerdictStore,
        archive: ImageArchive | None,
        spool: SpoolReader,
        identity: RunIdentity,
        on_stored: Callable[[Sequence[StoredVerdict]], None] | None = None,
    ) -> None:
        """`on_stored` is told of each batch once it is committed (the live feed)."""
        self.store, self.archive, self.spool, self.identity = store, archive, spool, identity
        self.on_stored = on_stored
        self.written = 0  # rows new to the store
        self.unspooled = 0  # verdicts taken back from the spool and stored
        self.errors = 0
        self.expired = 0
        self._expired_unmarked: list[str] = []
        self._next_retention = 0.0
        self._failing_since: float | None = None

    def take(self, records: FrameRing, images: FrameRing, spooled: bool = True) -> Batch:
        """The next batch: waiting ring records first, then sealed spool segments."""
        batch = Batch()
        for slot in records.written()[:BATCH]:
            rec = records.headers[int(slot)].copy()
            image = None
            if rec["image_slot"] >= 0:
                image = images.payloads[int(rec["image_slot"])]
                batch.image_slots.append(int(rec["image_slot"]))
            bundle, bundles = int(rec["bundle"]), self.identity.bundles
            verdict = verdict_of_record(rec, self.identity.cameras, bundles.threshold(bundle))
            row = StoredVerdict(
                self.identity.run, int(rec["pub_seq"]), int(rec["topic_seq"]), verdict, bundles.hash(bundle),
                shadow=shadow_of_record(rec, bundles),
            )  # fmt: skip
            batch.rows.append(self._archived(row, image))
            batch.record_slots.append(int(slot))
        if spooled:
            for segment in self.spool.segments():
                if len(batch) >= BATCH:
                    break
                entries = self.spool.read(segment)
                batch.rows += [self._archived(StoredVerdict.from_message(e.message), e.image) for e in entries]
                batch.segments.append((segment, entries))
        return batch

    def write(self, batch: Batch, records: FrameRing, images: FrameRing) -> bool:
        """Store the batch and free what it came from; False (kept in hand) while the store fails."""
        if not batch:
            return True
        try:
            self.written += self.store.write(batch.rows)
        except StoreError as exc:
            self.errors += 1
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error("%s; keeping %d verdicts in hand and retrying", exc, len(batch))
            return False
        if self._failing_since is not None:
            log.warning("verdict store back after %.1fs", time.monotonic() - self._failing_since)
            self._failing_since = None
        batch.free_slots(records, images)
        for segment, entries in batch.segments:
            self.spool.remove(segment, entries)
            self.unspooled += len(entries)
        if self.on_stored is not None:
            self.on_stored(batch.rows)
        return True

    def retention(self, now_ns: int, force: bool = False) -> None:
        """Every RETENTION_EVERY_S: delete archived images past max_days / max_gb and mark their rows."""
        if self.archive is None or (not force and time.monotonic() < self._next_retention):
            return
        self._next_retention = time.monotonic() + RETENTION_EVERY_S
        try:
            self._expired_unmarked += self.archive.enforce_retention(now_ns)
        except OSError as exc:
            log.error("image archive retention: %s", exc)
        if not self._expired_unmarked:
            return
        try:
            self.store.mark_expired(self._expired_unmarked, now_ns)
        except StoreError as exc:
            log.error("%s; marking %d expired images later", exc, len(self._expired_unmarked))
            return
        self.expired += len(self._expired_unmarked)
        self._expired_unmarked = []

    def spill(self, batch: Batch, records: FrameRing, images: FrameRing, spool: SpoolWriter) -> int:
        """Move what the rings hold (the batch in hand first) to the spool, for a later recorder; returns how
        many. For a recorder that must stop while the store is unreachable."""
        rows = batch.rows[: len(batch.record_slots)]  # the rest came from spool segments, still on disk
        while True:
            more = self.take(records, images, spooled=False)
            if not more:
                break
            rows += more.rows
            more.free_slots(records, images)
        for row in rows:
            body = json.loads(row.message()[1])
            spool.append(json.dumps({**body, "image_key": row.image_key}).encode(), row.run, row.seq, None)
        spool.seal()
        if rows:
            log.warning("verdict store unreachable at stop: %d verdicts spooled to %s", len(rows), spool.root)
        return len(rows)

    @property
    def failing(self) -> bool:
        return self._failing_since is not None

    def _archived(self, row: StoredVerdict, image: np.ndarray | None) -> StoredVerdict:
        """`row` with the key of its archived frame and overlay, when it has one to keep."""
        if image is None or self.archive is None:
            return row
        v = row.verdict
        try:
            key = self.archive.save(row.run, row.seq, v.camera_id, v.t_capture_ns, image[..., :3], image[..., 3])
        except OSError as exc:  # a full disk loses the image, never the row
            self.errors += 1
            log.error("image archive: %s (verdict %s/%d stored without its image)", exc, row.run, row.seq)
            return row
        return replace(row, image_key=key)
