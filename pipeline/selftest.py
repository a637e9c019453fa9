"""The golden-sample self-test: each bundle's golden frames through the real pipeline, compared with calibration.

The supervisor writes a bundle's golden frames (already at the model's size) into the golden ring, which
preprocess reads beside the cameras' rings; infer scores them with that bundle and decide thresholds
them, but publishes and records nothing for them: it passes them on to the supervisor, which compares
each verdict with the recorded one and each score with the recorded score. A bundle passes when every
frame does; otherwise its cameras are not ready, the heartbeat says degraded, and the metric and alert
say so until a later self-test passes. Each outcome is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from linewatch_plc.wire import VERDICT_NAMES
from pipeline.bundles import RunBundle
from pipeline.ring import RECORD, FrameRing

log = logging.getLogger(__name__)

EXPECTED = ("pass", "reject")  # by golden label: good, defect


@dataclass(frozen=True)
class SelfTestResult:
    bundle: str  # hash
    path: str
    t_ns: int
    frames: int
    failures: tuple[str, ...]  # one line per frame that failed; empty: passed
    why: str = "start"  # start | changeover | on demand | scheduled

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class _Round:
    number: int
    slot: int
    bundle: RunBundle
    why: str
    deadline: float  # time.monotonic()
    to_send: list[int]  # golden indices not yet in the ring
    results: dict[int, tuple[str, float]] = field(default_factory=dict)  # index -> (verdict, score)


class SelfTest:
    """The supervisor's side: sends rounds, collects their verdicts, judges them."""

    def __init__(
        self, ring: FrameRing, tolerance: float, timeout_s: float, on_result: Callable[[SelfTestResult], None]
    ) -> None:
        self.ring, self.tolerance, self.timeout_s, self.on_result = ring, tolerance, timeout_s, on_result
        self.rounds: dict[int, _Round] = {}
        self.latest: dict[str, SelfTestResult] = {}  # by bundle hash: its last finished self-test
        self._next = 1

    def start(self, slot: int, bundle: RunBundle, why: str) -> bool:
        """Send `bundle`'s golden frames (it decides with table slot `slot`); False when it holds none."""
        if bundle.golden is None or not len(bundle.golden):
            log.warning("%s holds no golden frames: no self-test for it (calibrate it again)", bundle.path)
            return False
        if any(r.slot == slot for r in self.rounds.values()):
            return True  # one under way already
        number, self._next = self._next, self._next + 1
        deadline = time.monotonic() + self.timeout_s
        self.rounds[number] = _Round(number, slot, bundle, why, deadline, list(range(len(bundle.golden))))
        self.pump()
        return True

    @property
    def running(self) -> bool:
        return bool(self.rounds)

    def pump(self) -> None:
        """Put waiting golden frames into the ring as it has room (never blocks)."""
        for r in self.rounds.values():
            assert r.bundle.golden is not None
            while r.to_send and (slot := self.ring.free_slot()) is not None:
                index = r.to_send.pop(0)
                image = r.bundle.golden.frames[index]
                rec = np.zeros((), dtype=RECORD)
                rec["golden"], rec["camera"], rec["bundle"] = 1, -1, r.slot
                rec["frame_id"], rec["source_index"] = index, r.number
                rec["h"], rec["w"] = image.shape[:2]
                rec["m_capture_ns"], rec["t_capture_ns"] = time.monotonic_ns(), time.time_ns()
                self.ring.payloads[slot, : image.shape[0], : image.shape[1]] = image
                self.ring.commit(slot, rec)

    def observe(self, rec: np.void) -> None:
        """A golden frame's verdict, from the verdict ring."""
        r = self.rounds.get(int(rec["source_index"]))
        if r is not None:
            r.results[int(rec["frame_id"])] = (VERDICT_NAMES[int(rec["verdict"])], float(rec["score"]))

    def poll(self) -> list[SelfTestResult]:
        """Judge the rounds that are complete or past their deadline."""
        done = []
        for number, r in list(self.rounds.items()):
            assert r.bundle.golden is not None
            if len(r.results) < len(r.bundle.golden) and time.monotonic() < r.deadline:
                continue
            del self.rounds[number]
            result = self._judge(r)
            self.latest[r.bundle.hash] = result
            if result.passed:
                log.info("golden self-test of %s passed (%d frames)", r.bundle.path, result.frames)
            else:
                log.error("golden self-test of %s FAILED: %s", r.bundle.path, "; ".join(result.failures))
            self.on_result(result)
            done.append(result)
        return done

    def _judge(self, r: _Round) -> SelfTestResult:
        golden = r.bundle.golden
        assert golden is not None
        failures = []
        for i, (label, recorded) in enumerate(zip(golden.labels, golden.scores, strict=True)):
            what = f"frame {i} ({golden.captions[i] if i < len(golden.captions) else 'golden'})"
            if i not in r.results:
                failures.append(f"{what}: no verdict within {self.timeout_s:g} s")
                continue
            verdict, score = r.results[i]
            if verdict != EXPECTED[label]:
                failures.append(f"{what}: {verdict} at score {score:.4g}, recorded {EXPECTED[label]} at {recorded:.4g}")
            elif abs(score - recorded) > self.tolerance * max(abs(recorded), 1e-12):
                failures.append(
                    f"{what}: score {score:.4g}, recorded {recorded:.4g} (more than {self.tolerance:.0%} apart)"
                )
        return SelfTestResult(r.bundle.hash, str(r.bundle.path), time.time_ns(), len(golden), tuple(failures), r.why)

    def failed(self, bundle: str) -> SelfTestResult | None:
        """The bundle's last self-test when it failed; None when it passed or never ran."""
        result = self.latest.get(bundle)
        return result if result is not None and not result.passed else None
