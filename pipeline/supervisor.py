"""The supervisor: builds the rings, spawns and watches the stages, serves metrics, accounts for frames.

It runs in the `linewatch run` process. It restarts a stage that crashed or stopped sending
heartbeats, counts restarts, and on exhaustion of the finite sources, `--duration` or SIGINT/SIGTERM
stops the capture first, lets every frame in flight reach a verdict, then stops the other stages,
unlinks all shared memory and returns a `RunSummary` whose counts reconcile exactly:
captured = verdicts + drops, per camera.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends import check_backend, engine_cache_dir
from edge.bundle import BundleError, feature_extractor_name, read_bundle_file
from pipeline.config import Config, SourceConfig
from pipeline.metrics import PipelineMetrics
from pipeline.ring import VERDICT_NAMES, Doorbell, FrameRing
from pipeline.sources import default_policy, parse_spec
from pipeline.stages import (
    StageContext,
    capture_main,
    decide_main,
    freeze_startup_heap,
    infer_main,
    preprocess_main,
)
from pipeline.state import DROP_REASONS, FLAG_STOP_ALL, FLAG_STOP_SOURCES, PipelineError, RunState

DRAIN_TIMEOUT_S = 30.0
JOIN_TIMEOUT_S = 5.0
# Longest the supervisor sleeps on the verdict ring between its checks (restarts, metrics, stop requests).
SUPERVISOR_WAIT_S = 0.05
LATENCY_WINDOW = 100_000  # frames behind the summary's latency percentiles (Prometheus has the full history)


@dataclass
class RunSummary:
    frames: int  # captured (including unreadable files)
    verdicts: int
    rejects: int
    errors: int
    drops: int
    restarts: int
    latency_ms_p50: float | None  # p50/p99 over the last LATENCY_WINDOW verdicts
    latency_ms_p99: float | None
    fps: float
    cameras: dict[str, dict[str, int]] = field(default_factory=dict)
    drops_by_reason: dict[str, int] = field(default_factory=dict)
    restarts_by_stage: dict[str, int] = field(default_factory=dict)
    metrics_port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageProcess:
    name: str
    kind: str  # capture | preprocess | infer | decide
    target: Callable[..., None]
    args: tuple
    camera: int | None = None
    process: BaseProcess | None = None


def bundle_threshold(path: Path) -> tuple[dict[str, Any], str, float]:
    manifest, _, digest = read_bundle_file(path)
    threshold = manifest.get("threshold")
    if not threshold:
        raise BundleError(f"{path}: bundle has no threshold; make one with `linewatch calibrate`")
    return manifest, digest, float(threshold["value"])


class Pipeline:
    def __init__(
        self,
        config: Config,
        bundle_path: Path,
        sources: tuple[SourceConfig, ...],
        on_verdict: Callable[[np.void], None] | None = None,
    ) -> None:
        if not sources:
            raise ValueError(
                "pipeline.sources: no sources configured (give --source folder:PATH, video:PATH or camera:N)"
            )
        for s in sources:
            parse_spec(s.spec)
        self.config = config
        self.bundle_path = Path(bundle_path)
        self.manifest, self.bundle_hash, self.threshold = bundle_threshold(self.bundle_path)
        self.sources = sources
        self.cameras = [s.id or f"cam{i}" for i, s in enumerate(sources)]
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"pipeline.sources: camera ids must be unique, got {self.cameras}")
        self.policies = [default_policy(s) for s in sources]
        pc = config.pipeline
        check_backend(pc.backend, pc.device, pc.backend_fallback)  # refuse now, not after spawning every stage
        self.on_verdict = on_verdict
        self.run_id = uuid.uuid4().hex[:12]
        self._stop_requested = False
        self.stages: list[StageProcess] = []
        self.metrics_port: int | None = None

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def run(self, duration_s: float | None = None, install_signals: bool = True) -> RunSummary:
        """Run until the finite sources are through, `duration_s` passes or a stop is requested."""
        with contextlib.ExitStack() as cleanup:  # shared memory is unlinked however the run ends
            return self._run(cleanup, duration_s, install_signals)

    def _run(self, cleanup: contextlib.ExitStack, duration_s: float | None, install_signals: bool) -> RunSummary:
        pc = self.config.pipeline
        n_cam = len(self.sources)
        input_h, input_w = self.manifest["input_size"]

        ctx = mp.get_context("spawn")  # CUDA-safe: no forked copies of an initialised CUDA context

        def make(
            slots: int, shape: tuple[int, ...] = (), dtype: str = "uint8", doorbell: Doorbell | None = None
        ) -> FrameRing:
            # Every writer that waits for room sleeps on its ring's `room` bell; one post wakes it.
            ring = FrameRing.create(slots, shape, dtype, doorbell or Doorbell(ctx, most=slots), Doorbell(ctx, most=1))
            cleanup.callback(ring.close)
            return ring

        # One commit bell for all cameras: preprocess waits on any of them.
        frames_bell = Doorbell(ctx, most=pc.ring_slots * n_cam)
        frame_shape = (pc.max_frame_height, pc.max_frame_width, 3)
        frame_rings = [make(pc.ring_slots, frame_shape, doorbell=frames_bell) for _ in range(n_cam)]
        # uint8 at model size; infer normalises
        tensor_ring = make(pc.tensor_slots, (input_h, input_w, 3))
        score_ring = make(max(pc.tensor_slots, 2 * pc.max_batch))
        verdict_ring = make(256)  # the supervisor waits on it between its other duties
        rings = {"tensor": tensor_ring, "score": score_ring, "verdict": verdict_ring}
        rings.update({f"frames_{cam}": r for cam, r in zip(self.cameras, frame_rings, strict=True)})
        stages: list[StageProcess] = []
        for i, src in enumerate(self.sources):
            stages.append(
                StageProcess(
                    f"capture:{self.cameras[i]}",
                    "capture",
                    capture_main,
                    (i, src, self.policies[i], frame_rings[i].spec),
                    i,
                )
            )
        stages.append(
            StageProcess(
                "preprocess",
                "preprocess",
                preprocess_main,
                ([r.spec for r in frame_rings], self.policies, tensor_ring.spec, self.manifest["preprocessing"]),
            )
        )
        stages.append(
            StageProcess(
                "infer",
                "infer",
                infer_main,
                (
                    tensor_ring.spec,
                    score_ring.spec,
                    str(self.bundle_path),
                    self.config.model.backbone_weights,
                    pc.device,
                    pc.max_batch,
                    pc.max_wait_ms,
                    pc.backend,
                    pc.backend_fallback,
                    str(engine_cache_dir(pc.engine_cache, self.bundle_path)),
                ),
            )
        )
        pub = self.config.publisher
        stages.append(
            StageProcess(
                "decide",
                "decide",
                decide_main,
                (
                    score_ring.spec,
                    verdict_ring.spec,
                    self.cameras,
                    self.threshold,
                    self.bundle_hash,
                    self.run_id,
                    pub.address,
                    pub.send_hwm,
                    pc.decide_priority,
                ),
            )
        )
        self.stages = stages
        state = RunState.create(n_cam, len(stages))
        cleanup.callback(state.close)
        metrics = PipelineMetrics(self.cameras, sorted({s.kind for s in stages}), _score_buckets(self.threshold))
        metrics.threshold.set(self.threshold)
        metrics.bundle.info(
            {
                "hash": self.bundle_hash[:16],
                "model": self.manifest["model"],
                "backbone": feature_extractor_name(self.manifest),
            }
        )
        port = (
            metrics.serve(self.config.metrics.host, self.config.metrics.port) if self.config.metrics.enabled else None
        )
        cleanup.callback(metrics.close)
        self.metrics_port = port
        previous = {}
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.request_stop)
        verdict_counts = np.zeros((n_cam, len(VERDICT_NAMES)), dtype=np.int64)
        # The summary's percentiles cover the most recent frames: a run lasting days must not grow a list forever.
        latencies: deque[int] = deque(maxlen=LATENCY_WINDOW)
        t_start = time.monotonic()
        t_first: float | None = None
        t_last: float | None = None
        # Newest frame id counted per camera: decide killed between forwarding a verdict and recording it in
        # `state.last_decided` forwards it again; the repeat must not be counted twice (same rule as decide's).
        last_counted = np.full(n_cam, -1, dtype=np.int64)

        def start(index: int) -> None:
            st = stages[index]
            st.process = ctx.Process(
                target=st.target, args=(StageContext(state.spec, index), *st.args), name=st.name, daemon=True
            )
            st.process.start()

        def sync_metrics() -> None:
            metrics.sync(state, {k: r.occupancy() for k, r in rings.items()}, self._restarts(stages, state))

        def drain() -> int:
            nonlocal t_first, t_last
            slots = verdict_ring.written()
            if slots.size and t_first is None:
                # The last periodic sync may predate the cameras opening: the first verdicts bring the
                # gauges (camera connected, ring occupancy) up to date at once, not up to 0.25 s later.
                sync_metrics()
            for s in slots:
                rec = verdict_ring.headers[int(s)].copy()
                verdict_ring.release(int(s))
                camera = int(rec["camera"])
                if rec["frame_id"] <= last_counted[camera]:
                    continue
                last_counted[camera] = rec["frame_id"]
                verdict_counts[camera, int(rec["verdict"])] += 1
                latencies.append(int(rec["m_decide_ns"]) - int(rec["m_capture_ns"]))
                now = time.monotonic()
                t_first = now if t_first is None else t_first
                t_last = now
                metrics.observe(rec)
                if self.on_verdict is not None:
                    self.on_verdict(rec)
            return int(slots.size)

        def accounted() -> np.ndarray:
            return verdict_counts.sum(axis=1) + state.drops.sum(axis=1)

        def supervise() -> None:
            """Restart stages that died or went silent (capture stages only while capturing)."""
            now_ns = time.monotonic_ns()
            for i, st in enumerate(stages):
                p = st.process
                assert p is not None
                if st.kind == "capture" and (state.done[st.camera] or state.stopping_sources()):
                    continue  # finished (or told to): a capture process that ended is not restarted
                silent = state.ready[i] and now_ns - int(state.heartbeat_ns[i]) > pc.heartbeat_timeout_s * 1e9
                if p.is_alive() and not silent:
                    continue
                if p.is_alive():
                    _log(f"{st.name} sent no heartbeat for {pc.heartbeat_timeout_s:.0f}s; restarting it")
                    p.kill()
                    p.join(JOIN_TIMEOUT_S)
                else:
                    _log(f"{st.name} exited with code {p.exitcode}; restarting it")
                state.restarts[i] += 1
                state.ready[i] = 0
                start(i)

        try:
            for i, st in enumerate(stages):
                if st.kind != "capture":
                    start(i)
            # Sources start once the model is loaded: the first frames' latency is then the line's, not start-up's.
            while not all(state.ready[i] for i, st in enumerate(stages) if st.kind != "capture"):
                for st in stages:
                    p = st.process
                    if p is not None and not p.is_alive():
                        raise PipelineError(
                            f"stage {st.name} failed to start (exit code {p.exitcode}); see its log above"
                        )
                if self._stop_requested:
                    break
                time.sleep(0.01)
            freeze_startup_heap()  # this process drains every verdict: no collector stalls here either
            for i, st in enumerate(stages):
                if st.kind == "capture":
                    start(i)
            last_sync = 0.0
            while True:
                busy = drain()
                now = time.monotonic()
                if now - last_sync > 0.25:
                    supervise()
                    sync_metrics()
                    last_sync = now
                finite_done = all(state.done[c] for c in range(n_cam))
                if finite_done and np.array_equal(accounted(), state.captured):
                    break
                if self._stop_requested or (duration_s is not None and now - t_start >= duration_s):
                    break
                if not busy:  # accounting only (latency is stamped by the stages): woken by decide's commits
                    verdict_ring.wait_for_commit(SUPERVISOR_WAIT_S)
            # Shutdown: stop capture, let frames in flight reach a verdict, then stop the rest.
            state.flags[FLAG_STOP_SOURCES] = 1
            for st in stages:
                if st.kind == "capture" and st.process is not None:
                    st.process.join(JOIN_TIMEOUT_S)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while not np.array_equal(accounted(), state.captured) and time.monotonic() < deadline:
                if not drain():
                    supervise()
                    time.sleep(0.002)
            state.flags[FLAG_STOP_ALL] = 1
            for st in stages:
                if st.process is not None:
                    st.process.join(JOIN_TIMEOUT_S)
                    if st.process.is_alive():
                        st.process.kill()
                        st.process.join(JOIN_TIMEOUT_S)
            drain()
            missing = state.captured - accounted()
            for c in range(n_cam):
                if missing[c] > 0:  # in flight when a forced stop (timeout) ended the run
                    state.drop(c, "shutdown", int(missing[c]))
            sync_metrics()
            return self._summary(state, stages, verdict_counts, latencies, t_first, t_last, port)
        finally:
            state.flags[FLAG_STOP_ALL] = 1
            for st in stages:
                if st.process is not None and st.process.is_alive():
                    st.process.kill()
                    st.process.join(JOIN_TIMEOUT_S)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @staticmethod
    def _restarts(stages: list[StageProcess], state: RunState) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, st in enumerate(stages):
            out[st.kind] = out.get(st.kind, 0) + int(state.restarts[i])
        return out

    def _summary(
        self,
        state: RunState,
        stages: list[StageProcess],
        verdicts: np.ndarray,
        latencies: deque[int],
        t_first: float | None,
        t_last: float | None,
        port: int | None,
    ) -> RunSummary:
        lat = np.asarray(latencies, dtype=np.float64) / 1e6
        n_verdicts = int(verdicts.sum())
        span = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
        cameras = {}
        for c, cam in enumerate(self.cameras):
            cameras[cam] = {
                "frames": int(state.captured[c]),
                **{name: int(verdicts[c, j]) for j, name in enumerate(VERDICT_NAMES)},
                "drops": int(state.drops[c].sum()),
                "reconnects": int(state.reconnects[c]),
            }
        restarts = self._restarts(stages, state)
        return RunSummary(
            frames=int(state.captured.sum()),
            verdicts=n_verdicts,
            rejects=int(verdicts[:, 1].sum()),
            errors=int(verdicts[:, 2].sum()),
            drops=int(state.drops.sum()),
            restarts=sum(restarts.values()),
            latency_ms_p50=float(np.percentile(lat, 50)) if lat.size else None,
            latency_ms_p99=float(np.percentile(lat, 99)) if lat.size else None,
            fps=(n_verdicts - 1) / span if span > 0 else 0.0,
            cameras=cameras,
            drops_by_reason={r: int(state.drops[:, j].sum()) for j, r in enumerate(DROP_REASONS)},
            restarts_by_stage=restarts,
            metrics_port=port,
        )


def _score_buckets(threshold: float) -> tuple[float, ...]:
    """Score histogram buckets around the threshold, so the reject boundary is resolved."""
    return tuple(
        round(threshold * f, 6) for f in (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 5)
    )


def _log(message: str) -> None:
    print(f"linewatch[supervisor]: {message}", file=sys.stderr, flush=True)
