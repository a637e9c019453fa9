"""`linewatch bench`'s store section: how fast the recorder stores verdicts, and what recording costs the line.

- recorder throughput: verdict records (every 50th with a kept frame and map to archive, as rejects are)
  taken from a record ring and written by the real `Recorder`, into SQLite and, given a URL, PostgreSQL;
- the pipeline's end-to-end latency, and the decide stage's, with the store off and on, in the same run, on
  a paced replay at half the pipeline's measured throughput, in rounds of off, on, on, off so drift on a
  noisy box hits both alike (one round per 50 s of `seconds`, at least two; `seconds` of replay per
  setting in all), with a bootstrap interval over the runs for the p99's change.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline.bundles import SingleBundle
from pipeline.ring import RECORD, VERDICT_PASS, VERDICT_REJECT, FrameRing
from pipeline.store.archive import ImageArchive
from pipeline.store.recorder import BATCH, Recorder, RunIdentity
from pipeline.store.spool import SpoolReader
from pipeline.store.verdicts import VerdictStore, sqlite_url

R = TypeVar("R")
IMAGE_EVERY = 50  # one verdict in 50 carries a frame to archive (2 % rejects)
ROUND_S = 50.0  # replay seconds per round of off, on, on, off: more rounds, a truer picture of run-to-run noise
INTERVAL_LEVEL = 0.9


@dataclass
class StoreBench:
    sqlite_verdicts_per_s: float
    postgresql_verdicts_per_s: float | None  # None: no --store-url given
    off_ms_p50: float
    off_ms_p99: float
    on_ms_p50: float
    on_ms_p99: float
    off_decide_ms_p99: float  # inference done to published: the stage the store adds work to
    on_decide_ms_p99: float
    off_p99_spread: float  # |change| of p99 between two halves of the store-off runs: the box's own noise
    p99_change_low: float  # INTERVAL_LEVEL bootstrap interval of p99_change over the runs
    p99_change_high: float
    runs: int  # paced replays per setting

    @property
    def p99_change(self) -> float:
        """Relative change of the p99 latency with the store on (0.03 = 3 % slower)."""
        return self.on_ms_p99 / self.off_ms_p99 - 1.0 if self.off_ms_p99 else 0.0


def _fill(records: FrameRing, images: FrameRing, first_seq: int) -> int:
    """Fill the record ring with verdicts numbered from `first_seq`; returns how many."""
    rng = np.random.default_rng(first_seq)
    n = 0
    for slot in range(records.spec.slots):
        seq = first_seq + n
        rec = np.zeros((), dtype=RECORD)
        rec["frame_id"], rec["pub_seq"], rec["topic_seq"] = seq, seq, seq
        rec["t_capture_ns"] = rec["t_decision_ns"] = time.time_ns()
        rec["score"], rec["image_slot"] = float(rng.random()), -1
        rec["verdict"] = VERDICT_PASS
        if seq % IMAGE_EVERY == 0:
            image_slot = (seq // IMAGE_EVERY) % images.spec.slots
            images.payloads[image_slot] = rng.integers(0, 256, images.payloads.shape[1:], dtype=np.uint8)
            images.commit(image_slot, notify=False)
            rec["image_slot"], rec["verdict"] = image_slot, VERDICT_REJECT
        records.commit(slot, rec, notify=False)
        n += 1
    return n


def recorder_throughput(url: str, input_size: tuple[int, int], seconds: float) -> float:
    """Verdicts per second the recorder takes from its ring and stores (rows + archived images) at `url`."""
    h, w = input_size
    slots = 2 * BATCH
    records = FrameRing.create(slots)
    images = FrameRing.create(slots // IMAGE_EVERY + 1, (h, w, 4))
    store = VerdictStore(url)
    try:
        with tempfile.TemporaryDirectory(prefix="linewatch-bench-store-") as tmp:
            archive = ImageArchive(Path(tmp) / "images", 10**12, 1.0)
            identity = RunIdentity(f"bench-{uuid.uuid4().hex[:8]}", ("cam0",), SingleBundle("bench", 0.5))
            recorder = Recorder(store, archive, SpoolReader(Path(tmp) / "spool"), identity)
            stored, spent, seq = 0, 0.0, 1
            while spent < seconds or stored == 0:
                seq += _fill(records, images, seq)
                start = time.perf_counter()
                while records.written().size:
                    batch = recorder.take(records, images, spooled=False)
                    if not recorder.write(batch, records, images):
                        raise RuntimeError(f"{url}: the store refused the benchmark's writes")
                    stored += len(batch)
                spent += time.perf_counter() - start
        return stored / spent
    finally:
        store.close()
        records.close()
        images.close()


def p99_spread(runs: list[np.ndarray]) -> float:
    """|relative change| of the p99 between two halves of one setting's runs (in time order): runs i and
    n-1-i go to the same half, alternately, so on a symmetric schedule both halves sit at the same mean time.
    Nothing differs between the halves but the box's noise, which moves the store on/off change as much."""
    runs = [r for r in runs if r.size]  # a run too short to see a verdict carries no latency
    halves: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for i, run in enumerate(runs):
        halves[min(i, len(runs) - 1 - i) % 2].append(run)
    if not halves[0] or not halves[1]:
        return 0.0
    first, second = (float(np.percentile(np.concatenate(h), 99)) for h in halves)
    return abs(second / first - 1.0) if first else 0.0


def p99_change_interval(
    off: list[np.ndarray], on: list[np.ndarray], level: float = INTERVAL_LEVEL, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the p99's relative change (on / off - 1): each setting's runs drawn with
    replacement and pooled. Runs, not verdicts, are drawn because the box's stalls come in bursts that
    slow a whole run: that is the noise a change must stand out from. A run too short to see a verdict
    carries no latency and is left out (NaN when a setting has none)."""
    off, on = [r for r in off if r.size], [r for r in on if r.size]
    if not off or not on:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    changes = np.empty(draws)
    for i in range(draws):
        off_p99, on_p99 = (
            np.percentile(np.concatenate([runs[j] for j in rng.integers(0, len(runs), len(runs))]), 99)
            for runs in (off, on)
        )
        changes[i] = on_p99 / off_p99 - 1.0 if off_p99 else 0.0
    tail = (1.0 - level) / 2
    low, high = np.quantile(changes, [tail, 1.0 - tail])
    return float(low), float(high)


def rounds_for(seconds: float) -> int:
    """Rounds of off, on, on, off for `seconds` of replay per setting."""
    return max(2, round(seconds / ROUND_S))


def latency_with_and_without_store(
    replay: Callable[[bool, float], R], rate_ppm: float, rounds: int = 2
) -> tuple[list[R], list[R]]:
    """Paced replays with the store off and on, in `rounds` rounds of off, on, on, off; results as (off, on)."""
    off: list[R] = []
    on: list[R] = []
    for store_on in (False, True, True, False) * rounds:
        (on if store_on else off).append(replay(store_on, rate_ppm))
    return off, on


def sqlite_in(folder: Path) -> str:
    return sqlite_url(folder / "bench.sqlite")
