"""The stage processes: capture (one per source), preprocess, infer (one per device), decide, and the
recorder and operator page when the store is on.

Each `*_main` runs in its own spawned process and talks only through rings and the shared run
state (`StageContext`). Stages ignore SIGINT/SIGTERM: the supervisor owns shutdown and tells them
through the stop flags, so a Ctrl-C drains the pipeline instead of killing it mid-frame.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from pipeline.bundles import BundleTable, BundleTableSpec
from pipeline.logs import LogSettings, configure_logging
from pipeline.ring import (
    NO_TRIGGER,
    RECORD,
    VERDICT_ERROR,
    VERDICT_PASS,
    WRITTEN,
    FrameRing,
    RingSpec,
    verdict_at,
    verdict_of_record,
)
from pipeline.settings import SourceConfig
from pipeline.shadow import shadow_of_record
from pipeline.state import (
    FLAG_SELFTEST_FAILED,
    SPOOL_LOST,
    SPOOLED,
    STORE_ARCHIVE_BYTES,
    STORE_ERRORS,
    STORE_EXPIRED,
    STORE_FAILING,
    STORE_UNSPOOLED,
    STORE_WRITTEN,
    RunState,
    StateSpec,
)
from pipeline.store.spool import SpoolWriter

if TYPE_CHECKING:
    from edge.preprocessing import Preprocessing
    from pipeline.publisher import RejectPublisher
    from pipeline.station.health import StageSlot
    from pipeline.station.settings import StationSettings
    from pipeline.store.feed import StoredFeed

# A frame in hand when its stage died is retried once; if the retry dies too it becomes an `error` verdict.
MAX_ATTEMPTS = 2
RESUBSCRIBE_GRACE_S = 0.5
# Added to a paced replay's read lead (twice the recent read time): scheduling slack.
READ_LEAD_NS = 1_000_000
# Longest an idle reader sleeps on its doorbell before it heartbeats and looks at the stop flags again.
WAIT_S = 0.05

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What every stage process gets at spawn: small and picklable."""

    state: StateSpec
    process_index: int
    log: LogSettings = LogSettings()


@dataclass(frozen=True)
class CaptureArgs:
    camera: int  # index into the run's cameras
    source: SourceConfig
    policy: str  # block | drop_oldest
    ring: RingSpec  # this camera's frame ring


@dataclass(frozen=True)
class PreprocessArgs:
    inputs: tuple[RingSpec, ...]  # one frame ring per camera
    policies: tuple[str, ...]  # each camera's backpressure policy
    output: RingSpec  # the tensor ring (uint8 at model size)
    bundles: BundleTableSpec  # which bundle decides each camera's next frame, and its preprocessing
    golden: RingSpec | None = None  # the self-test's golden frames, at model size already (shares the doorbell)


@dataclass(frozen=True)
class InferArgs:
    input: RingSpec
    output: RingSpec
    bundles: BundleTableSpec
    backbone_weights: str | None
    device: str
    max_batch: int
    max_wait_ms: float
    backend: str
    backend_fallback: bool
    engine_cache: str | None  # pipeline.engine_cache; None: an `engines` folder beside each bundle
    keep_pass_fraction: float = 0.0
    keep_images: bool = False  # carry the frame and map of kept frames in the output ring's payload


@dataclass(frozen=True)
class RecorderFeed:
    """Where decide leaves each verdict after publishing it, for the recorder."""

    records: RingSpec  # header-only: one slot per verdict
    images: RingSpec  # (H, W, 4) payloads of kept frames
    spool: str  # folder taking what the rings have no room for
    spool_max_bytes: int


@dataclass(frozen=True)
class DecideArgs:
    input: RingSpec
    output: RingSpec
    cameras: tuple[str, ...]
    bundles: BundleTableSpec
    run_id: str
    address: str
    send_hwm: int
    priority: int = 0  # SCHED_FIFO priority; 0 = normal scheduling
    heartbeat_ms: float = 200.0
    feed: RecorderFeed | None = None  # None: no store


@dataclass(frozen=True)
class RecorderArgs:
    records: RingSpec
    images: RingSpec
    url: str
    archive: str  # image archive folder
    spool: str
    spool_max_bytes: int
    max_bytes: int  # image archive
    max_days: float
    replay_address: str
    run: str
    cameras: tuple[str, ...]
    bundles: BundleTableSpec
    feed_address: str | None = None  # where committed rows are announced (the operator station); None: nowhere
    line: str = ""  # store.line: written into every row


@dataclass(frozen=True)
class StationArgs:
    settings: StationSettings
    stages: tuple[StageSlot, ...]  # every stage, for the page's health panel
    cameras: tuple[str, ...]


def _enter(ctx: StageContext) -> RunState:
    configure_logging(ctx.log, multiprocessing.current_process().name)
    # One OpenCV thread per light stage: the cores belong to inference; oversubscribing them costs throughput.
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = RunState.attach(ctx.state)
    state.heartbeat_ns[ctx.process_index] = time.monotonic_ns()
    return state


def run_realtime(priority: int) -> str | None:
    """Put the calling thread, and every thread it starts from here on, under SCHED_FIFO at `priority`.

    Returns why not when the box refuses (no CAP_SYS_NICE and an RLIMIT_RTPRIO below `priority`), else
    None. A real-time thread preempts inference's threads the moment it wakes, instead of queueing
    behind them for a scheduler slice (2-10 ms on the dev box).
    """
    if not hasattr(os, "sched_setscheduler"):
        return "this OS has no SCHED_FIFO"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        return (
            f"cannot run at real-time priority {priority} ({exc.strerror}): grant CAP_SYS_NICE or an rtprio "
            f"limit of at least {priority} (systemd LimitRTPRIO=, docker --ulimit rtprio=)"
        )
    return None


def freeze_startup_heap() -> None:
    """Put every object alive now out of the cyclic collector's reach; call once start-up is done.

    A process that has imported torch and loaded a model holds ~190k tracked objects, and a full
    collection over them took ~60 ms on the dev box: a stall that the line would see as a late verdict,
    and on two cores one that also takes a core from inference. Frozen, they are never traversed again;
    refcounting still frees them as usual.
    """
    gc.collect()
    gc.freeze()


class ConveyorPace:
    """When a paced replay reads and releases its frames: one part every `period_ns`, never in a burst.

    A frame is read (decoded) just before its release, with a lead of twice the recent read time plus
    a millisecond. Read right after the previous release, its decode ran during that frame's inference
    and took a core from it; a camera's frame arrives ready and never does that. A read that overruns
    its lead releases its frame late, and the schedule goes on from then.
    """

    def __init__(
        self,
        period_ns: int,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.period_ns = period_ns
        self.next_release_ns = clock()
        self.read_ns = 0  # running mean of one read's duration
        self._sleep, self._clock = sleep, clock

    def before_read(self) -> int:
        """Wait until the next frame is due to be read; returns the time the read starts."""
        self._sleep_until(self.next_release_ns - 2 * self.read_ns - READ_LEAD_NS)
        return self._clock()

    def release(self, read_started_ns: int) -> None:
        """After a frame is read: wait for its release time and schedule the next part."""
        now = self._clock()
        took = now - read_started_ns
        self.read_ns = took if not self.read_ns else self.read_ns + (took - self.read_ns) // 4
        self._sleep_until(self.next_release_ns)
        self.next_release_ns = max(self.next_release_ns, now) + self.period_ns

    def _sleep_until(self, t_ns: int) -> None:
        wait_ns = t_ns - self._clock()
        if wait_ns > 0:
            self._sleep(wait_ns / 1e9)


def fit_into(image: np.ndarray, max_h: int, max_w: int) -> np.ndarray:
    """Downscale (keeping the aspect ratio) when a frame is larger than a ring slot."""
    h, w = image.shape[:2]
    if h <= max_h and w <= max_w:
        return image
    scale = min(max_h / h, max_w / w)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def capture_main(
    ctx: StageContext, args: CaptureArgs
) -> None:  # pragma: no cover - runs in a child process; covered by the pipeline tests
    from pipeline.sources import FrameUnreadable, SourceDisconnected, SourceUnavailable, open_source

    state = _enter(ctx)
    # OpenCV's own warnings repeat each failed open in its words; the backoff line below says it once.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    ring = FrameRing.attach(args.ring)
    camera, config, policy = args.camera, args.source, args.policy
    max_h, max_w = ring.payloads.shape[1:3]
    pace = None
    if config.rate_ppm > 0:
        pace = ConveyorPace(int(60e9 / config.rate_ppm), lambda seconds: _sleep_unless_stopped(state, seconds))
    backoff = 0.25
    source = None
    opened_before = False
    freeze_startup_heap()
    while not state.stopping_sources():
        state.heartbeat_ns[ctx.process_index] = time.monotonic_ns()
        if source is None:
            if opened_before or state.position[camera] or state.reconnects[camera]:
                state.reconnects[camera] += 1  # every attempt after the first open (also after a restart)
            opened_before = True
            try:
                source = open_source(config, start=int(state.position[camera]))
                state.connected[camera] = 1
                backoff = 0.25
            except SourceUnavailable as exc:
                state.connected[camera] = 0
                # A camera may come later; a folder or video that delivered before may come back (a share
                # remounted). One that never opened is a wrong path: said once, and that source is done.
                if config.spec.startswith("camera:") or state.position[camera] > 0:
                    log.warning("%s; retrying in %.2fs", exc, backoff)
                    _sleep_unless_stopped(state, backoff)
                    backoff = min(backoff * 2, config.reconnect_max_s)
                    continue
                log.error("%s", exc)
                state.done[camera] = 1
                break
        read_started_ns = pace.before_read() if pace is not None else 0
        try:
            frame = source.read()
        except FrameUnreadable as exc:
            log.warning("%s (counted as an unreadable drop)", exc)
            state.captured[camera] += 1
            state.drop(camera, "unreadable")
            state.position[camera] = exc.index + 1
            continue
        except SourceDisconnected as exc:
            log.warning("%s; reconnecting", exc)
            state.connected[camera] = 0
            source.close()
            source = None
            continue
        if frame is None:
            state.done[camera] = 1
            break
        if pace is not None:  # conveyor pace: release parts on a fixed schedule, never in a burst
            pace.release(read_started_ns)  # cut short by a stop: the frame in hand still goes through
        # Stamped before any wait for a slot: time spent held back by backpressure is latency too.
        t_capture_ns, m_capture_ns = time.time_ns(), time.monotonic_ns()
        image = fit_into(frame.image, max_h, max_w)
        if policy == "block":
            slot = ring.wait_free_slot(state.stopping)
            if slot is None:
                break
        else:
            slot = ring.free_slot()
        rec = np.zeros((), dtype=RECORD)
        rec["camera"] = camera
        rec["frame_id"] = state.next_frame_id[camera]
        rec["source_index"] = frame.index
        rec["label"] = frame.label
        rec["trigger"] = NO_TRIGGER if frame.trigger is None else frame.trigger
        rec["t_capture_ns"] = t_capture_ns
        rec["m_capture_ns"] = m_capture_ns
        rec["h"], rec["w"] = image.shape[:2]
        state.next_frame_id[camera] += 1
        state.position[camera] = frame.index + 1
        state.captured[camera] += 1
        if slot is None:
            state.drop(camera, "ring_full")
            continue
        ring.payloads[slot, : image.shape[0], : image.shape[1]] = image
        ring.commit(slot, rec)
    if source is not None:
        source.close()


def waiting_for_room(state: RunState, index: int) -> Callable[[], bool]:
    """The stop test a writer asks while it waits for room downstream. It also beats: a stage held up by a
    slow or restarting reader is alive, and the reader, if silent, is the one to restart."""

    def stop() -> bool:
        state.heartbeat_ns[index] = time.monotonic_ns()
        return state.stopping()

    return stop


def _sleep_unless_stopped(state: RunState, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not state.stopping_sources():
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))


def preprocess_main(ctx: StageContext, args: PreprocessArgs) -> None:  # pragma: no cover - child process
    state = _enter(ctx)
    rings = [FrameRing.attach(s) for s in args.inputs]
    policies = args.policies
    out = FrameRing.attach(args.output)
    bundles = BundleTable.attach(args.bundles)
    geometry = GeometryBySlot(bundles)
    golden = None if args.golden is None else FrameRing.attach(args.golden)
    room_wait = waiting_for_room(state, ctx.process_index)
    freeze_startup_heap()
    state.ready[ctx.process_index] = 1
    while not state.stopping():
        state.heartbeat_ns[ctx.process_index] = time.monotonic_ns()
        busy = False
        for camera, ring in enumerate(rings):  # round robin: one frame per camera per pass
            slots = ring.written()
            if not slots.size:
                continue
            if policies[camera] == "drop_oldest" and slots.size > 1:
                for stale in slots[:-1]:  # stay current: only the newest waiting frame is worth processing
                    ring.release(int(stale))
                    state.drop(camera, "stale")
                slots = slots[-1:]
            slot = int(slots[0])
            target = out.wait_free_slot(room_wait)
            if target is None:
                return
            busy = True
            rec = ring.headers[slot].copy()
            rec["verdict"] = VERDICT_PASS
            # The frame boundary of a changeover: the bundle is chosen once, here, and rides with the frame.
            rec["bundle"] = bundles.live[camera]
            rec["shadow"] = bundles.shadow[camera] + 1  # NO_BUNDLE (-1): 0, no shadow
            if ring.headers[slot]["attempts"] >= MAX_ATTEMPTS:
                rec["verdict"] = VERDICT_ERROR  # this frame was in hand when the stage died: don't retry it
            else:
                ring.headers[slot]["attempts"] += 1
                try:
                    image = ring.payloads[slot, : rec["h"], : rec["w"]]
                    out.payloads[target] = geometry(int(rec["bundle"])).geometry(image)  # normalised in infer
                except Exception as exc:  # a frame the model cannot take must not stop the line
                    log.error("frame %d of camera %d: %s", int(rec["frame_id"]), camera, exc)
                    rec["verdict"] = VERDICT_ERROR
            rec["m_pre_ns"] = time.monotonic_ns()
            out.commit(target, rec)
            ring.release(slot)
        if golden is not None and (slots := golden.written()).size:
            if not _pass_golden(golden, int(slots[0]), out, room_wait):
                return
            busy = True
        if not busy:
            rings[0].wait_for_commit(WAIT_S)  # the cameras' rings share one doorbell


def _pass_golden(golden: FrameRing, slot: int, out: FrameRing, room_wait: Callable[[], bool]) -> bool:
    """A golden frame of the self-test to the tensor ring as it is (kept at the model's size, cut already);
    False when told to stop while waiting for room."""
    target = out.wait_free_slot(room_wait)
    if target is None:
        return False
    rec = golden.headers[slot].copy()
    rec["verdict"], rec["shadow"] = VERDICT_PASS, 0
    out.payloads[target] = golden.payloads[slot]
    rec["m_pre_ns"] = time.monotonic_ns()
    out.commit(target, rec)
    golden.release(slot)
    return True


class GeometryBySlot:
    """Each bundle slot's preprocessing, read from the table once per slot."""

    def __init__(self, bundles: BundleTable) -> None:
        self.bundles = bundles
        self._cache: dict[tuple[int, str], Preprocessing] = {}

    def __call__(self, slot: int) -> Preprocessing:
        key = (slot, self.bundles.hash(slot))
        if key not in self._cache:
            self._cache[key] = self.bundles.preprocessing(slot)
        return self._cache[key]


def infer_main(ctx: StageContext, args: InferArgs) -> None:  # pragma: no cover - child process
    import torch

    from edge.backends import BackendError
    from edge.bundle import BundleError
    from pipeline.inference import BundleModels, ModelSettings, one_bundle_batch

    state = _enter(ctx)
    tensors = FrameRing.attach(args.input)
    out = FrameRing.attach(args.output)
    table = BundleTable.attach(args.bundles)
    max_batch = args.max_batch
    h, w = tensors.payloads.shape[1:3]
    example = torch.zeros(max_batch, 3, h, w).contiguous(memory_format=torch.channels_last)
    settings = ModelSettings(
        args.backbone_weights, args.device, args.backend, args.backend_fallback, args.engine_cache, example
    )
    models = BundleModels(table, settings)
    try:
        models.load_current()  # before `ready`: the line's first part gets the steady-state latency
    except (BackendError, BundleError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    room_wait = waiting_for_room(state, ctx.process_index)
    freeze_startup_heap()
    state.ready[ctx.process_index] = 1
    while not state.stopping():
        state.heartbeat_ns[ctx.process_index] = time.monotonic_ns()
        models.poll()
        slots = tensors.written()
        if not slots.size:
            tensors.wait_for_commit(WAIT_S)
            continue
        deadline = time.monotonic() + args.max_wait_ms / 1000.0
        while slots.size < max_batch and (left := deadline - time.monotonic()) > 0:
            tensors.wait_for_commit(left)
            slots = tensors.written()
        batch = one_bundle_batch(tensors.headers, slots, max_batch)
        if not _infer_batch(tensors, out, batch, models, args, room_wait):
            return
        out.notify_reader()
        tensors.notify_writer()


def _infer_batch(
    tensors: FrameRing, out: FrameRing, batch: list[int], models: Any, args: InferArgs, room_wait: Callable[[], bool]
) -> bool:
    """Score one batch of one bundle (and each frame by its camera's shadow bundle, if any) and pass it on;
    False when the stage is told to stop while waiting for room."""
    import torch

    from pipeline.inference import shadow_scores

    model = models.get(int(tensors.headers["bundle"][batch[0]]))  # None: it failed to load (error verdicts)
    good = [
        s
        for s in batch
        if model is not None
        and tensors.headers[s]["verdict"] != VERDICT_ERROR
        and tensors.headers[s]["attempts"] < MAX_ATTEMPTS
    ]
    for s in good:
        tensors.headers[s]["attempts"] += 1
    start = time.monotonic_ns()
    scores: dict[int, float] = {}
    shadows: dict[int, tuple[float, float]] = {}
    maps: dict[int, np.ndarray] = {}
    if good:
        x = model.preprocessing.normalize_batch(torch.from_numpy(tensors.payloads[good]).to(args.device))
        with torch.inference_mode():
            result = model.model(x)
        scores = dict(zip(good, result.scores.float().cpu().tolist(), strict=True))
        shadows = shadow_scores(models, tensors, good, args.device)
        if args.keep_images:
            # A frame on which the shadow disagrees is kept too: people review those before promoting it.
            disagree = {s for s, (score, t) in shadows.items() if (score > t) != (scores[s] > model.threshold)}
            maps = _kept_maps(tensors, good, scores, result.maps, args.keep_pass_fraction, model.threshold, disagree)
    done = time.monotonic_ns()
    for i, s in enumerate(batch):
        target = out.wait_free_slot(room_wait)
        if target is None:
            return False
        rec = tensors.headers[s].copy()
        if s in scores:
            rec["score"] = scores[s]
        else:
            rec["verdict"] = VERDICT_ERROR
        if s in shadows:
            rec["shadow_score"] = shadows[s][0]
        else:
            rec["shadow"] = 0  # not scored in shadow (its bundle not loaded, or no live score to compare)
        rec["keep"] = int(s in maps)
        if s in maps:  # the archive's copy: the frame as the model saw it and its map
            out.payloads[target, ..., :3] = tensors.payloads[s]
            out.payloads[target, ..., 3] = maps[s]
        rec["m_infer_start_ns"], rec["m_infer_ns"] = start, done
        rec["batch"] = len(good) if i == 0 else 0
        out.commit(target, rec, notify=False)
        tensors.release(s, notify=False)
    return True


def kept_pass(camera: int, frame_id: int, fraction: float) -> bool:
    """Whether a passed frame is among the sampled `fraction` archived: spread evenly, the same on every run."""
    return ((frame_id * 2654435761 + camera * 40503) % 2**32) < fraction * 2**32


def _kept_maps(
    tensors: FrameRing,
    good: list[int],
    scores: dict[int, float],
    maps: Any,
    keep_pass_fraction: float,
    threshold: float,
    also: set[int],
) -> dict:
    """The quantised maps of the frames to archive (rejects, sampled passes and the slots `also`), by
    tensor-ring slot."""
    from pipeline.store.archive import quantise_map

    kept = {}
    for i, s in enumerate(good):
        rec = tensors.headers[s]
        sampled = kept_pass(int(rec["camera"]), int(rec["frame_id"]), keep_pass_fraction)
        if not rec["golden"] and (scores[s] > threshold or s in also or sampled):
            anomaly_map = maps[i].float().cpu().numpy()
            # The archive's scale is relative to a positive threshold; a bundle without one gets its map's max.
            scale = threshold if threshold > 0 else max(float(anomaly_map.max()), 1e-12) / 2
            kept[s] = quantise_map(anomaly_map, scale)
    return kept


def decide_main(ctx: StageContext, args: DecideArgs) -> None:  # pragma: no cover - child process
    from pipeline.publisher import RejectPublisher

    state = _enter(ctx)
    # Before the publisher: ZeroMQ's I/O thread, which puts the reject on the wire, inherits the policy.
    if args.priority and (refused := run_realtime(args.priority)) is not None:
        log.warning("%s; publishing at normal priority", refused)
    scores = FrameRing.attach(args.input)
    out = FrameRing.attach(args.output)
    publisher = RejectPublisher(args.address, args.send_hwm, args.run_id, state.publisher)
    bundles, cameras = BundleTable.attach(args.bundles), args.cameras
    feed = None if args.feed is None else VerdictFeed(args.feed, args.run_id, state, bundles)
    pending = PendingVerdict(state.pending)
    pending.finish(state, scores, out, publisher, feed, cameras, bundles)
    die_after_seq = failpoint("decide_after_publish") if not state.restarts[ctx.process_index] else None
    if state.restarts[ctx.process_index]:
        # Subscribers of the crashed publisher reconnect within ZeroMQ's reconnect interval (100 ms);
        # publishing the backlog before they are back would lose it for them.
        time.sleep(RESUBSCRIBE_GRACE_S)
    room_wait = waiting_for_room(state, ctx.process_index)
    freeze_startup_heap()
    state.ready[ctx.process_index] = 1
    beat_every_ns, next_beat_ns = int(args.heartbeat_ms * 1e6), 0
    try:
        while not state.stopping():
            now_ns = time.monotonic_ns()
            state.heartbeat_ns[ctx.process_index] = now_ns
            if now_ns >= next_beat_ns:
                publisher.heartbeat(args.heartbeat_ms, health_problems(state, cameras))
                next_beat_ns = now_ns + beat_every_ns
            slots = scores.written()
            if not slots.size:
                if feed is not None:
                    feed.idle()
                scores.wait_for_commit(min(WAIT_S, args.heartbeat_ms / 1000.0))
                continue
            for s in slots:
                s = int(s)
                rec = scores.headers[s].copy()
                if rec["golden"]:  # the self-test's: judged by the supervisor, never published or recorded
                    if not _decide_golden(rec, scores, s, out, bundles, room_wait):
                        return
                    continue
                camera, frame_id = int(rec["camera"]), int(rec["frame_id"])
                if frame_id <= state.last_decided[camera]:
                    scores.release(s)  # already published and counted: a retry after an upstream crash
                    continue
                target = out.wait_free_slot(room_wait)
                if target is None:
                    return
                bundle = int(rec["bundle"])
                threshold = bundles.threshold(bundle)
                if rec["verdict"] != VERDICT_ERROR:
                    rec["verdict"] = verdict_at(rec["score"], threshold)
                decide_shadow(rec, bundles)
                rec["t_decision_ns"] = time.time_ns()
                verdict = verdict_of_record(rec, cameras, threshold)
                rec["pub_seq"], rec["topic_seq"] = publisher.next_seqs(verdict.verdict)
                pending.begin(s, rec)
                _, _, body = publisher.publish(verdict, bundles.hash(bundle))
                if rec["pub_seq"] == die_after_seq:
                    os.kill(os.getpid(), signal.SIGKILL)
                rec["m_decide_ns"] = time.monotonic_ns()
                if feed is not None:  # after publishing: the record never delays the reject
                    feed.put(rec, scores.payloads[s] if rec["keep"] else None, body)
                out.commit(target, rec)
                state.last_decided[camera] = frame_id
                pending.end()
                scores.release(s)
    finally:
        if feed is not None:
            feed.idle(stopping=True)
        # A last heartbeat with the final seqs: a subscriber learns of a trailing verdict it missed at the end too.
        publisher.heartbeat(args.heartbeat_ms, health_problems(state, cameras))
        publisher.close()


def decide_shadow(rec: np.void, bundles: BundleTable) -> None:
    """The shadow bundle's verdict of a frame it scored, at its own threshold: recorded, never published."""
    if rec["shadow"] > 0:
        rec["shadow_verdict"] = verdict_at(rec["shadow_score"], bundles.threshold(int(rec["shadow"]) - 1))


def _decide_golden(
    rec: np.void, scores: FrameRing, slot: int, out: FrameRing, bundles: BundleTable, room_wait: Callable[[], bool]
) -> bool:
    target = out.wait_free_slot(room_wait)
    if target is None:
        return False
    if rec["verdict"] != VERDICT_ERROR:
        rec["verdict"] = verdict_at(rec["score"], bundles.threshold(int(rec["bundle"])))
    rec["m_decide_ns"] = time.monotonic_ns()
    out.commit(target, rec)
    scores.release(slot)
    return True


def failpoint(name: str) -> int | None:
    """The seq after which a fault test asks this stage to kill itself (LINEWATCH_FAILPOINT=name:seq): the
    window between two steps of one verdict is too short for a signal from outside to hit on purpose."""
    point, _, seq = os.environ.get("LINEWATCH_FAILPOINT", "").partition(":")
    return int(seq) if point == name and seq.isdigit() else None


class PendingVerdict:
    """Decide's write-ahead, in shared memory, of the verdict it is publishing: written before the seq is
    taken, cleared once the verdict is in the recorder's buffer and forwarded. A decide stage killed in
    between leaves it to its successor, which records and forwards the verdict under the seq it was
    published with, instead of deciding the frame again under a new one (and leaving a published seq that
    the store never gets)."""

    def __init__(self, cells: np.ndarray) -> None:
        self.cells = cells

    def begin(self, slot: int, rec: np.void) -> None:
        fields = ("camera", "frame_id", "pub_seq", "topic_seq", "verdict", "t_decision_ns")
        self.cells[1:] = (slot, *(int(rec[f]) for f in fields))
        self.cells[0] = 1

    def end(self) -> None:
        self.cells[0] = 0

    def finish(
        self, state: RunState, scores: FrameRing, out: FrameRing, publisher: RejectPublisher, feed: VerdictFeed | None,
        cameras: tuple[str, ...], bundles: BundleTable,
    ) -> None:  # fmt: skip
        """Complete what a killed predecessor left between publishing and forwarding (nothing if it left none)."""
        if not self.cells[0]:
            return
        slot, camera, frame_id, seq, topic_seq, verdict, t_decision_ns = (int(v) for v in self.cells[1:])
        rec = scores.headers[slot].copy()
        published = int(publisher.counters[0]) >= seq  # else it died before taking the seq: decide it anew
        forwarded = frame_id <= state.last_decided[camera]
        here = rec["state"] == WRITTEN and (int(rec["camera"]), int(rec["frame_id"])) == (camera, frame_id)
        if published and not forwarded and here and (target := out.wait_free_slot(state.stopping)) is not None:
            rec["verdict"], rec["t_decision_ns"] = verdict, t_decision_ns
            decide_shadow(rec, bundles)
            rec["pub_seq"], rec["topic_seq"], rec["m_decide_ns"] = seq, topic_seq, time.monotonic_ns()
            if feed is not None:
                bundle = int(rec["bundle"])
                verdict_rec = verdict_of_record(rec, cameras, bundles.threshold(bundle))
                body = publisher.body(seq, topic_seq, verdict_rec, bundles.hash(bundle))
                feed.put(rec, scores.payloads[slot] if rec["keep"] else None, body)
            out.commit(target, rec)
            state.last_decided[camera] = frame_id
            scores.release(slot)
            log.warning("verdict seq %d (camera %s, frame %d), published before a crash, recorded now", seq,
                        cameras[camera], frame_id)  # fmt: skip
        self.end()


def health_problems(state: RunState, cameras: tuple[str, ...]) -> tuple[str, ...]:
    """What the heartbeat reports as wrong: cameras down, the store refusing writes, verdicts lost to it."""
    problems = [
        f"camera {cam} disconnected"
        for c, cam in enumerate(cameras)
        if not state.connected[c] and not state.done[c] and state.position[c] + state.reconnects[c] > 0
    ]
    if state.store[STORE_FAILING]:
        problems.append("verdict store unreachable (verdicts kept in the buffer and spool)")
    if state.spool[SPOOL_LOST]:
        problems.append(f"{int(state.spool[SPOOL_LOST])} verdicts not recorded (spool full)")
    if state.flags[FLAG_SELFTEST_FAILED]:
        problems.append("golden self-test failed: the box does not score as at calibration")
    return tuple(problems)


class VerdictFeed:
    """Decide's side of the recorder's buffer: a verdict goes to the record ring (its kept frame to the image
    ring), or to the spool on disk when either is full. Never waits for the recorder."""

    def __init__(self, feed: RecorderFeed, run: str, state: RunState, bundles: BundleTable) -> None:
        self.records, self.images = FrameRing.attach(feed.records), FrameRing.attach(feed.images)
        self.bundles = bundles
        self.spool = SpoolWriter(Path(feed.spool), feed.spool_max_bytes)
        self.run, self.state = run, state
        self._warned = False

    def put(self, rec: np.void, image: np.ndarray | None, body: bytes) -> None:
        slot = self.records.free_slot()
        image_slot = -1
        if slot is not None and image is not None:
            image_slot = self.images.free_slot()
        if slot is None or image_slot is None:
            self._spool(rec, image, body)
            return
        if image is not None:
            self.images.payloads[image_slot] = image
            self.images.commit(image_slot, notify=False)  # marks it taken; the recorder finds it by index
        rec["image_slot"] = image_slot
        self.records.commit(slot, rec)

    def idle(self, stopping: bool = False) -> None:
        """Hand the spooled verdicts to the recorder once its buffer has room again (or decide stops): one
        segment per outage, not one per quiet moment between parts."""
        if self.spool.open and (stopping or self.records.free_slot() is not None):
            self.spool.seal()
            self._warned = False

    def _spool(self, rec: np.void, image: np.ndarray | None, body: bytes) -> None:
        if not self._warned:
            log.warning("recorder buffer full: spooling verdicts to %s", self.spool.root)
            self._warned = True
        if (shadow := shadow_of_record(rec, self.bundles)) is not None:  # the spool keeps it beside the message
            body = json.dumps({**json.loads(body), "shadow": shadow.to_json()}, separators=(",", ":")).encode()
        try:
            kept = self.spool.append(body, self.run, int(rec["pub_seq"]), image)
        except OSError as exc:
            log.error("spool %s: %s", self.spool.root, exc)
            kept = False
        self.state.spool[SPOOLED if kept else SPOOL_LOST] += 1


RECORDER_WAIT_S = 0.05  # the recorder writes at most this long after a verdict was published (unless busy)
RECORDER_IDLE_S = 1.0  # longest an idle recorder sleeps before it looks at the spool, retention and stop flags
FINAL_DRAIN_S = 20.0  # at stop, how long the recorder keeps trying to store what it has before spooling it


def recorder_main(ctx: StageContext, args: RecorderArgs) -> None:  # pragma: no cover - child process
    from pipeline.store.archive import ImageArchive
    from pipeline.store.recorder import Recorder, RunIdentity
    from pipeline.store.replay import ReplayServer
    from pipeline.store.spool import SpoolReader
    from pipeline.store.verdicts import VerdictStore

    state = _enter(ctx)
    if hasattr(os, "SCHED_IDLE"):
        # Runs only on a core nothing else wants: on a small box a recorder waking mid-inference would take a
        # core from one of the model's threads, and the whole inference waits for that thread. When it cannot
        # keep up, the buffer and the spool hold the backlog.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    records, images = FrameRing.attach(args.records), FrameRing.attach(args.images)
    store = VerdictStore(args.url, check=False, line=args.line)  # checked at start by the supervisor
    archive = ImageArchive(Path(args.archive), args.max_bytes, args.max_days)
    identity = RunIdentity(args.run, args.cameras, BundleTable.attach(args.bundles))
    feed = _open_feed(args.feed_address)
    recorder = Recorder(store, archive, SpoolReader(Path(args.spool)), identity, feed.announce if feed else None)
    # A restarted recorder goes on counting where its predecessor stopped (the metrics are counters).
    recorder.written, recorder.errors = int(state.store[STORE_WRITTEN]), int(state.store[STORE_ERRORS])
    recorder.unspooled, recorder.expired = int(state.store[STORE_UNSPOOLED]), int(state.store[STORE_EXPIRED])
    replay = ReplayServer(store, args.replay_address).start()
    state.ready[ctx.process_index] = 1
    try:
        _record_until_stopped(ctx, state, recorder, records, images, args.spool_max_bytes)
    finally:
        replay.stop()
        store.close()
        if feed is not None:
            feed.close()


def _open_feed(address: str | None) -> StoredFeed | None:
    """The live feed, or None: a feed that cannot bind costs the operator page its live view, never a verdict."""
    from pipeline.store.feed import StoredFeed

    if address is None:
        return None
    try:
        return StoredFeed(address)
    except OSError as exc:
        log.error("%s; the operator page shows stored verdicts without a live feed", exc)
        return None


def _record_until_stopped(
    ctx: StageContext, state: RunState, recorder: Any, records: FrameRing, images: FrameRing, spool_max_bytes: int
) -> None:
    """Store batches as they come; at stop, everything left (ring and spool) before exiting."""
    from pipeline.store.recorder import BATCH as batch_size

    batch, backoff, final_deadline = None, 0.1, None
    while True:
        state.heartbeat_ns[ctx.process_index] = time.monotonic_ns()
        if final_deadline is None and state.stopping():
            final_deadline = time.monotonic() + FINAL_DRAIN_S
        if batch is None:
            batch = recorder.take(records, images)
        stored = recorder.write(batch, records, images)
        _publish_store_counts(state, recorder)
        if stored:
            backoff, taken, batch = 0.1, len(batch), None
            recorder.retention(time.time_ns())
            if not taken and final_deadline is not None:
                # Done once decide has sealed its last spool segment (or the deadline says it never will).
                if not recorder.spool.segments(include_open=True) or time.monotonic() > final_deadline:
                    return
            if taken < batch_size and final_deadline is None:
                # Let verdicts gather: one transaction per interval, not one per part, costs the line far less CPU.
                time.sleep(RECORDER_WAIT_S)
                if not records.written().size and records.spec.doorbell is not None:
                    # Nothing waiting: sleep until decide commits the next verdict rather than polling.
                    records.spec.doorbell.clear()
                    if not records.written().size:
                        records.wait_for_commit(RECORDER_IDLE_S)
            continue
        if final_deadline is not None and time.monotonic() > final_deadline:
            # The store is still away: the next run's recorder takes what is left from the spool.
            recorder.spill(batch, records, images, SpoolWriter(recorder.spool.root, spool_max_bytes))
            _publish_store_counts(state, recorder)
            return
        time.sleep(backoff)
        backoff = min(backoff * 2, 0.5 if final_deadline is not None else 2.0)


def _publish_store_counts(state: RunState, recorder: Any) -> None:
    state.store[STORE_WRITTEN] = recorder.written
    state.store[STORE_ERRORS] = recorder.errors
    state.store[STORE_UNSPOOLED] = recorder.unspooled
    state.store[STORE_EXPIRED] = recorder.expired
    state.store[STORE_FAILING] = int(recorder.failing)
    if recorder.archive is not None:
        state.store[STORE_ARCHIVE_BYTES] = recorder.archive.bytes_used


STATION_NICE = 10  # the page takes what the line leaves: inference and decide go first on a busy box


def station_main(ctx: StageContext, args: StationArgs) -> None:  # pragma: no cover - child process
    from pipeline.station.health import RunHealth
    from pipeline.station.process import serve

    state = _enter(ctx)
    os.nice(STATION_NICE)
    state.ready[ctx.process_index] = 1
    beating = threading.Event()

    def beat() -> None:  # the process is alive while it serves, whatever a page request is doing
        while not beating.wait(0.5):
            state.heartbeat_ns[ctx.process_index] = time.monotonic_ns()

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    health = RunHealth(ctx.state, args.stages, args.cameras)
    try:
        serve(args.settings, health, state.stopping, lambda port: None)
    finally:
        beating.set()
