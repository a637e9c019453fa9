"""The supervisor: builds the rings, spawns and watches the stages, serves metrics, accounts for frames.

It runs in the `linewatch run` process. It restarts a stage that crashed or stopped sending
heartbeats, counts restarts, and on exhaustion of the finite sources, `--duration` or SIGINT/SIGTERM
stops the capture first, lets every frame in flight reach a verdict, then stops the other stages,
unlinks all shared memory and returns a `RunSummary` whose counts reconcile exactly:
captured = verdicts + drops, per camera.

A run is a sequence of steps, one method each: build the rings, plan the stages, start the metrics
server, start the stages, supervise, drain, summarise.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from edge.backends import check_backend
from edge.settings import to_dict
from linewatch_plc.wire import VERDICT_NAMES
from pipeline.bundles import NO_BUNDLE, BundleTable, RunBundle
from pipeline.changeover import Changeover, ControlServer, SelfTestOutcome, SelfTestRequest, SwitchOutcome
from pipeline.drift import DriftReference, DriftWatch, alarm_level
from pipeline.endpoints import RunProbe
from pipeline.logs import LogSettings
from pipeline.metrics import PipelineMetrics
from pipeline.restarts import RestartSchedule
from pipeline.ring import Doorbell, FrameRing
from pipeline.selftest import SelfTest, SelfTestResult
from pipeline.service import ServiceNotifier
from pipeline.settings import PipelineConfig, RuntimeConfig, SourceConfig
from pipeline.sources import default_policy, parse_spec
from pipeline.stages import (
    FINAL_DRAIN_S,
    CaptureArgs,
    DecideArgs,
    InferArgs,
    PreprocessArgs,
    RecorderArgs,
    RecorderFeed,
    StageContext,
    StationArgs,
    capture_main,
    decide_main,
    freeze_startup_heap,
    infer_main,
    preprocess_main,
    recorder_main,
    station_main,
)
from pipeline.state import (
    DROP_REASONS,
    FLAG_SELFTEST_FAILED,
    FLAG_STOP_ALL,
    FLAG_STOP_SOURCES,
    SPOOL_LOST,
    SPOOLED,
    STORE_FAILING,
    PipelineError,
    RunState,
)
from pipeline.station.health import StageSlot
from pipeline.station.settings import StationSettings, bundle_summary
from pipeline.store.paths import StorePaths
from pipeline.store.selftests import SelfTestLog
from pipeline.store.switches import BundleSwitch, SwitchLog
from pipeline.store.verdicts import StoreError, VerdictStore

PASS, ERROR = VERDICT_NAMES.index("pass"), VERDICT_NAMES.index("error")

DRAIN_TIMEOUT_S = 30.0
DRAIN_AFTER_FAILURE_S = 5.0  # a run ended by a stage that keeps failing: frames in flight get this long
JOIN_TIMEOUT_S = 5.0
RECORDER_JOIN_TIMEOUT_S = FINAL_DRAIN_S + 10.0  # it stores what is left (or spools it) before it exits
# Longest the supervisor sleeps on the verdict ring between its checks (restarts, metrics, stop requests).
SUPERVISOR_WAIT_S = 0.05
SYNC_EVERY_S = 0.25  # restarts checked and gauges synced this often
BACKGROUND_STAGES = ("recorder", "station")  # off the verdict path: pipeline.background_heartbeat_timeout_s
GOLDEN_SLOTS = 8  # golden frames in flight at once (a bundle holds up to 6)
LATENCY_WINDOW = 100_000  # frames behind the summary's latency percentiles (Prometheus has the full history)

log = logging.getLogger(__name__)


def detail(**kwargs: Any) -> Any:
    """A result field left out of the record's headline (the one-line JSON of `run --json`, `bench --json`)."""
    return field(metadata={"detail": True}, **kwargs)


def headline(record: Any) -> dict[str, Any]:
    """A result dataclass's fields, without those marked `detail`."""
    return {f.name: getattr(record, f.name) for f in fields(record) if not f.metadata.get("detail")}


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
    failure: str | None = None  # why the run ended as a failure (a stage that kept failing, no frame at all)
    cameras: dict[str, dict[str, int]] = detail(default_factory=dict)
    drops_by_reason: dict[str, int] = detail(default_factory=dict)
    restarts_by_stage: dict[str, int] = detail(default_factory=dict)
    metrics_port: int | None = detail(default=None)
    run_id: str = detail(default="")
    stored: int | None = detail(default=None)  # rows of this run in the verdict store after the run
    spooled: int = detail(default=0)  # verdicts the recorder's buffer had no room for (kept on disk)
    store_lost: int = detail(default=0)  # verdicts neither buffered nor spooled (spool full or unwritable)
    # per camera scored in shadow: frames the shadow bundle scored, and those it decided otherwise
    shadow: dict[str, dict[str, int]] = detail(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def headline(self) -> dict[str, Any]:
        """The run's totals without the per-camera, per-reason and per-stage breakdowns."""
        return headline(self)


@dataclass
class StageProcess:
    name: str
    kind: str  # capture | preprocess | infer | decide | recorder | station
    target: Callable[..., None]
    args: CaptureArgs | PreprocessArgs | InferArgs | DecideArgs | RecorderArgs | StationArgs
    camera: int | None = None
    process: BaseProcess | None = None


@dataclass(frozen=True)
class Rings:
    frames: tuple[FrameRing, ...]  # one per camera, sharing one commit doorbell
    tensor: FrameRing  # preprocessed frames, uint8 at model size (infer normalises)
    score: FrameRing  # with the frame and map of kept frames as payload when the store is on
    verdict: FrameRing  # the supervisor drains it
    records: FrameRing | None = None  # decide -> recorder: every verdict, after publishing
    images: FrameRing | None = None  # decide -> recorder: kept frames with their maps
    golden: FrameRing | None = None  # supervisor -> preprocess: the self-test's golden frames

    def occupancy(self, cameras: list[str]) -> dict[str, int]:
        named = {"tensor": self.tensor, "score": self.score, "verdict": self.verdict}
        if self.records is not None:
            named["records"] = self.records
        named.update({f"frames_{cam}": r for cam, r in zip(cameras, self.frames, strict=True)})
        return {k: r.occupancy() for k, r in named.items()}


class VerdictTally:
    """Verdicts counted per camera, with the latencies and times the summary reports."""

    def __init__(self, cameras: int) -> None:
        self.counts = np.zeros((cameras, len(VERDICT_NAMES)), dtype=np.int64)
        # The summary's percentiles cover the most recent frames: a run lasting days must not grow a list forever.
        self.latencies_ns: deque[int] = deque(maxlen=LATENCY_WINDOW)
        self.t_first: float | None = None
        self.t_last: float | None = None
        # Newest frame id counted per camera: decide killed between forwarding a verdict and recording it in
        # `state.last_decided` forwards it again; the repeat must not be counted twice (same rule as decide's).
        self.last_counted = np.full(cameras, -1, dtype=np.int64)
        self.shadow = np.zeros((cameras, 2), dtype=np.int64)  # per camera: frames scored in shadow, disagreements

    def add(self, rec: np.void) -> bool:
        """Count one verdict record; False for a repeat of one already counted."""
        camera = int(rec["camera"])
        if rec["frame_id"] <= self.last_counted[camera]:
            return False
        self.last_counted[camera] = rec["frame_id"]
        self.counts[camera, int(rec["verdict"])] += 1
        if rec["shadow"] > 0 and rec["verdict"] != ERROR:
            self.shadow[camera] += (1, int(rec["shadow_verdict"] != rec["verdict"]))
        self.latencies_ns.append(int(rec["m_decide_ns"]) - int(rec["m_capture_ns"]))
        now = time.monotonic()
        self.t_first = now if self.t_first is None else self.t_first
        self.t_last = now
        return True


@dataclass(frozen=True)
class RunBundles:
    """The distinct bundles of a run, read and checked, and the index of each source's live and shadow bundle."""

    bundles: list[RunBundle]
    live: list[int]
    shadow: list[int | None]

    @classmethod
    def of(cls, default: Path | None, sources: tuple[SourceConfig, ...]) -> RunBundles:
        bundles: list[RunBundle] = []
        by_path: dict[Path, int] = {}

        def index(path: str | Path) -> int:
            key = Path(path).resolve()
            if key not in by_path:
                by_path[key] = len(bundles)
                bundles.append(RunBundle.read(path, bundles[0].manifest.input_size if bundles else None))
            return by_path[key]

        live, shadow = [], []
        for i, source in enumerate(sources):
            path = source.bundle or default
            if path is None:
                raise ValueError(f"pipeline.sources[{i}].bundle: not set and no pipeline.bundle (give --bundle)")
            live.append(index(path))
            shadow.append(None if source.shadow_bundle is None else index(source.shadow_bundle))
            if (s := shadow[-1]) is not None and not bundles[s].cuts_like(bundles[live[-1]]):
                raise ValueError(
                    f"pipeline.sources[{i}].shadow_bundle: {bundles[s].path} resizes or crops unlike the camera's "
                    f"bundle {bundles[live[-1]].path}; a shadow bundle scores the frames as the live one cuts them"
                )
        return cls(bundles, live, shadow)

    def of_path(self, path: str | Path) -> RunBundle | None:
        """The bundle read from `path` already, if any."""
        return next((b for b in self.bundles if b.path == Path(path).resolve()), None)


class Pipeline:
    def __init__(
        self,
        config: RuntimeConfig,
        bundle_path: Path | None,
        sources: tuple[SourceConfig, ...],
        on_verdict: Callable[[np.void], None] | None = None,
        backbone_weights: str | None = None,
        log_settings: LogSettings | None = None,
    ) -> None:
        if not sources:
            raise ValueError(
                "pipeline.sources: no sources configured (give --source folder:PATH, video:PATH or camera:N)"
            )
        for s in sources:
            parse_spec(s.spec)
        self.config = config
        self.run_bundles = RunBundles.of(bundle_path, sources)
        self.bundles, self.source_bundles = self.run_bundles.bundles, self.run_bundles.live
        # The run's own bundle (its record, the data folder beside it): pipeline.bundle, else the first camera's.
        primary = self.bundles[0]
        if bundle_path is not None:
            primary = self.run_bundles.of_path(bundle_path) or RunBundle.read(bundle_path)
        self.bundle_path, self.manifest, self.bundle_hash = primary.path, primary.manifest, primary.hash
        self.table: BundleTable | None = None  # set when the run starts
        self.slot_bundles: dict[int, RunBundle] = {}  # the bundle in each slot of the table
        self.sources = sources
        self.cameras = [s.id or f"cam{i}" for i, s in enumerate(sources)]
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"pipeline.sources: camera ids must be unique, got {self.cameras}")
        self.policies = [default_policy(s) for s in sources]
        pc = config.pipeline
        check_backend(pc.backend, pc.device, pc.backend_fallback)  # refuse now, not after spawning every stage
        self.on_verdict = on_verdict
        self.backbone_weights = backbone_weights
        self.log_settings = log_settings or LogSettings()
        self.run_id = uuid.uuid4().hex[:12]
        self._stop_requested = False
        self.stages: list[StageProcess] = []
        self.metrics_port: int | None = None
        self.probe = RunProbe(config.metrics.stall_s)  # what /healthz and /readyz answer
        self.service = ServiceNotifier()  # systemd's READY / WATCHDOG, when run as a Type=notify unit
        self.store_paths: StorePaths | None = None
        self.store: VerdictStore | None = None
        if config.store.enabled:
            self.store_paths, self.store = _open_store(config, self.bundle_path)

    def drift_reference(self, bundle: RunBundle) -> DriftReference | None:
        """The pass scores a camera on `bundle` is watched against; None when the watch is off for it."""
        dc, scores = self.config.drift, bundle.manifest.holdout_scores()
        if not dc.enabled:
            return None
        reference = None
        if scores is not None:
            reference = DriftReference.from_holdout(scores, bundle.threshold, dc.quantile, dc.confidence)
        if reference is None:
            log.warning("drift watch off for %s: it holds too few held-out scores (calibrate it again)", bundle.path)
        return reference

    def _bundle_table(self, cleanup: contextlib.ExitStack) -> BundleTable:
        table = BundleTable.create(len(self.sources))
        cleanup.callback(table.close)
        slots = [table.add(b) for b in self.bundles]
        self.slot_bundles = {slot: b for slot, b in zip(slots, self.bundles, strict=True)}
        table.live[:] = [slots[b] for b in self.source_bundles]
        table.shadow[:] = [NO_BUNDLE if b is None else slots[b] for b in self.run_bundles.shadow]
        return table

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def run(self, duration_s: float | None = None, install_signals: bool = True) -> RunSummary:
        """Run until the finite sources are through, `duration_s` passes or a stop is requested."""
        with contextlib.ExitStack() as cleanup:  # shared memory is unlinked however the run ends
            ctx = mp.get_context("spawn")  # CUDA-safe: no forked copies of an initialised CUDA context
            self.table = self._bundle_table(cleanup)
            rings = self._build_rings(ctx, cleanup)
            self.stages = self._plan_stages(rings)
            state = RunState.create(len(self.sources), len(self.stages))
            cleanup.callback(state.close)
            metrics = self._start_metrics(cleanup)
            if install_signals:  # restored after the stages are killed: a Ctrl-C then cannot cut the kill short
                cleanup.enter_context(self._stop_on_signals())
            live = _LiveRun(self, ctx, state, rings, metrics)
            cleanup.callback(live.kill_all)  # before the rings and state go, however the run ends
            live.control = self._control(cleanup, live)
            cleanup.callback(self.service.close)
            self._record_run_start(cleanup)
            self._start_stages(live)
            self.service.ready()
            self._supervise(live, duration_s)
            self.service.stopping()
            self._drain(live)
            return self._summarise(live)

    def _control(self, cleanup: contextlib.ExitStack, live: _LiveRun) -> RunControl | None:
        """The changeover endpoint and its bookkeeping; None when `pipeline.control_address` is off."""
        pc = self.config.pipeline
        if pc.control_address is None:
            return None
        assert self.table is not None
        server = ControlServer(pc.control_address)
        cleanup.callback(server.close)

        def on_switch(camera: int, bundle: RunBundle) -> None:
            live.metrics.set_bundle(self.cameras[camera], bundle)
            if live.selftest is not None and self.table is not None:  # a new bundle in charge: check it at once
                live.selftest.start(int(self.table.live[camera]), bundle, "changeover")

        log_switch = SwitchLog(self.store) if self.store is not None else None

        def record(switch: BundleSwitch) -> None:
            if log_switch is None:
                return
            try:
                log_switch.record(switch)
            except StoreError as exc:
                log.error("%s; the switch of camera %s is not recorded", exc, switch.camera_id)

        changeover = Changeover(
            self.run_id, self.table, self.slot_bundles, self.cameras, dict(pc.recipes), on_switch, record
        )
        return RunControl(server, changeover, live.selftest, live.live_bundles)

    def _record_run_start(self, cleanup: contextlib.ExitStack) -> None:
        """The run's row (bundle, the settings that ran); its stop time is written however the run ends."""
        if self.store is None:
            return
        store = self.store
        cleanup.callback(store.close)
        try:
            store.start_run(self.run_id, self.bundle_hash, str(self.bundle_path), to_dict(self.config), time.time_ns())
        except StoreError as exc:
            log.error("%s; the run's record is written by nobody, its verdicts still are", exc)

        def record_stop() -> None:
            try:
                store.stop_run(self.run_id, time.time_ns())
            except StoreError as exc:
                log.error("%s; the run's stop time is not recorded", exc)

        cleanup.callback(record_stop)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _build_rings(self, ctx: SpawnContext, cleanup: contextlib.ExitStack) -> Rings:
        pc = self.config.pipeline

        def make(slots: int, shape: tuple[int, ...] = (), doorbell: Doorbell | None = None) -> FrameRing:
            # Every writer that waits for room sleeps on its ring's `room` bell; one post wakes it.
            ring = FrameRing.create(slots, shape, "uint8", doorbell or Doorbell(ctx, most=slots), Doorbell(ctx, most=1))
            cleanup.callback(ring.close)
            return ring

        # One commit bell for all cameras: preprocess waits on any of them.
        frames_bell = Doorbell(ctx, most=pc.ring_slots * len(self.sources) + GOLDEN_SLOTS)
        frame_shape = (pc.max_frame_height, pc.max_frame_width, 3)
        input_h, input_w = self.bundles[0].manifest.input_size  # the cameras' bundles share it (RunBundles)
        kept_shape = (input_h, input_w, 4)  # a kept frame (RGB) and its quantised anomaly map
        store = self.config.store if self.store is not None else None
        return Rings(
            frames=tuple(make(pc.ring_slots, frame_shape, frames_bell) for _ in self.sources),
            tensor=make(pc.tensor_slots, (input_h, input_w, 3)),
            score=make(max(pc.tensor_slots, 2 * pc.max_batch), kept_shape if store else ()),
            verdict=make(256),  # the supervisor waits on it between its other duties
            records=make(store.buffer_slots) if store else None,
            images=make(store.image_slots, kept_shape) if store else None,
            golden=make(GOLDEN_SLOTS, (input_h, input_w, 3), frames_bell) if self.config.golden.enabled else None,
        )

    def _plan_stages(self, rings: Rings) -> list[StageProcess]:
        pc, pub = self.config.pipeline, self.config.publisher
        stages = [
            StageProcess(f"capture:{cam}", "capture", capture_main, CaptureArgs(i, src, policy, ring.spec), camera=i)
            for i, (cam, src, policy, ring) in enumerate(
                zip(self.cameras, self.sources, self.policies, rings.frames, strict=True)
            )
        ]
        assert self.table is not None
        table = self.table.spec
        golden = None if rings.golden is None else rings.golden.spec
        frames = tuple(r.spec for r in rings.frames)
        pre = PreprocessArgs(frames, tuple(self.policies), rings.tensor.spec, table, golden)
        infer = InferArgs(
            rings.tensor.spec,
            rings.score.spec,
            table,
            self.backbone_weights,
            pc.device,
            pc.max_batch,
            pc.max_wait_ms,
            pc.backend,
            pc.backend_fallback,
            pc.engine_cache,
            self.config.store.keep_pass_fraction,
            keep_images=rings.records is not None,
        )
        decide = DecideArgs(
            rings.score.spec,
            rings.verdict.spec,
            tuple(self.cameras),
            table,
            self.run_id,
            pub.address,
            pub.send_hwm,
            pc.decide_priority,
            pub.heartbeat_ms,
            self._recorder_feed(rings),
        )
        stages.append(StageProcess("preprocess", "preprocess", preprocess_main, pre))
        stages.append(StageProcess("infer", "infer", infer_main, infer))
        stages.append(StageProcess("decide", "decide", decide_main, decide))
        if (recorder := self._recorder_args(rings)) is not None:
            stages.append(StageProcess("recorder", "recorder", recorder_main, recorder))
            if self.config.ui.enabled:
                stages.append(StageProcess("station", "station", station_main, self._station_args(stages)))
        return stages

    def _station_args(self, stages: list[StageProcess]) -> StationArgs:
        """The operator page's settings; `stages` are those before it (it is the last)."""
        assert self.store_paths is not None
        ui, paths = self.config.ui, self.store_paths
        pc = self.config.pipeline
        slots = tuple(StageSlot(st.name, i, heartbeat_timeout_s(pc, st.kind), st.camera) for i, st in enumerate(stages))
        slots += (StageSlot("station", len(stages), timeout_s=heartbeat_timeout_s(pc, "station")),)
        settings = StationSettings(
            store_url=paths.url,
            store_line=paths.line,
            archive=str(paths.images),
            data=str(paths.root),
            host=ui.host,
            port=ui.port,
            feed_address=ui.feed_address,
            heartbeat_address=self.config.publisher.address,
            window_min=ui.window_min,
            bundle=bundle_summary(self.bundle_path, self.manifest, self.bundle_hash),
            cameras=tuple(self.cameras),
            run=self.run_id,
            camera_bundles={
                cam: bundle_summary(b.path, b.manifest, b.hash)
                for cam, b in zip(self.cameras, (self.bundles[i] for i in self.source_bundles), strict=True)
            },
            control_address=pc.control_address,
            recipes=tuple(sorted(pc.recipes)),
        )
        return StationArgs(settings, slots, tuple(self.cameras))

    def _recorder_feed(self, rings: Rings) -> RecorderFeed | None:
        if rings.records is None or rings.images is None or self.store_paths is None:
            return None
        spool_bytes = int(self.config.store.spool_max_gb * 1e9)
        return RecorderFeed(rings.records.spec, rings.images.spec, str(self.store_paths.spool), spool_bytes)

    def _recorder_args(self, rings: Rings) -> RecorderArgs | None:
        if rings.records is None or rings.images is None or self.store_paths is None or self.table is None:
            return None
        store, paths = self.config.store, self.store_paths
        return RecorderArgs(
            rings.records.spec,
            rings.images.spec,
            paths.url,
            str(paths.images),
            str(paths.spool),
            int(store.spool_max_gb * 1e9),
            int(store.max_gb * 1e9),
            store.max_days,
            self.config.publisher.replay_address,
            self.run_id,
            tuple(self.cameras),
            self.table.spec,
            self.config.ui.feed_address if self.config.ui.enabled else None,
            paths.line,
        )

    def _start_metrics(self, cleanup: contextlib.ExitStack) -> PipelineMetrics:
        metrics = PipelineMetrics(self.cameras, sorted({s.kind for s in self.stages}), self.probe)
        for cam, b in zip(self.cameras, self.source_bundles, strict=True):
            metrics.set_bundle(cam, self.bundles[b])
        if self.config.drift.enabled:
            dc = self.config.drift
            metrics.drift_alarm_level.set(alarm_level(dc.horizon_parts, dc.false_alarm))
        m = self.config.metrics
        self.metrics_port = metrics.serve(m.host, m.port) if m.enabled else None
        cleanup.callback(metrics.close)
        return metrics

    def _start_stages(self, live: _LiveRun) -> None:
        """Model-side stages first; sources once the model is loaded, so the first frames' latency is the
        line's, not start-up's."""
        for i, st in enumerate(self.stages):
            if st.kind != "capture":
                live.start(i)
        while not all(live.state.ready[i] for i, st in enumerate(self.stages) if st.kind != "capture"):
            for st in self.stages:
                p = st.process
                if p is not None and not p.is_alive():
                    raise PipelineError(f"stage {st.name} failed to start (exit code {p.exitcode}); see its log above")
            if self._stop_requested:
                break
            self.probe.passed()  # loading a model (or building an engine) is the loop at work, not a stall
            self.service.watchdog()
            time.sleep(0.01)
        freeze_startup_heap()  # this process drains every verdict: no collector stalls here either
        self._start_selftest(live)
        for i, st in enumerate(self.stages):
            if st.kind == "capture":
                live.start(i)

    def _start_selftest(self, live: _LiveRun) -> None:
        """Every live bundle's golden frames through the pipeline before the cameras start (or a stop)."""
        if live.selftest is None:
            return
        for slot, bundle in live.live_bundles():
            live.selftest.start(slot, bundle, "start")
        while live.selftest.running and not self._stop_requested:
            live.drain_verdicts()
            live.tick_selftest()
            live.restart_failed()
            if live.failure is not None:
                return
            self.probe.passed()
            self.service.watchdog()
            live.rings.verdict.wait_for_commit(SUPERVISOR_WAIT_S)

    def _supervise(self, live: _LiveRun, duration_s: float | None) -> None:
        """Count verdicts, restart failed stages and sync metrics until the sources are through or a stop."""
        t_start = time.monotonic()
        last_sync = 0.0
        while True:
            busy = live.drain_verdicts()
            live.tick_selftest()
            if live.control is not None:
                live.control.serve()
            now = time.monotonic()
            self.probe.passed()
            if now - last_sync > SYNC_EVERY_S:
                live.restart_failed()
                live.sync_metrics()
                last_sync = now
            if live.failure is not None:
                log.error("%s", live.failure)
                return
            if live.sources_done() and live.all_accounted():
                return
            if self._stop_requested or (duration_s is not None and now - t_start >= duration_s):
                return
            if not busy:  # accounting only (latency is stamped by the stages): woken by decide's commits
                live.rings.verdict.wait_for_commit(SUPERVISOR_WAIT_S)

    def _drain(self, live: _LiveRun) -> None:
        """Stop capture, let frames in flight reach a verdict, then stop the rest; count what never did."""
        state = live.state
        state.flags[FLAG_STOP_SOURCES] = 1
        live.sync_metrics()  # /readyz says it is stopping from now on
        if live.control is not None:
            live.control.refuse_pending("the run is stopping")
        live.join(kind="capture")
        deadline = time.monotonic() + (DRAIN_TIMEOUT_S if live.failure is None else DRAIN_AFTER_FAILURE_S)
        while not live.all_accounted() and time.monotonic() < deadline:
            self.probe.passed()
            self.service.watchdog()
            if not live.drain_verdicts():
                live.restart_failed()
                time.sleep(0.002)
        state.flags[FLAG_STOP_ALL] = 1
        live.join()
        live.drain_verdicts()
        missing = state.captured - live.accounted()
        for c in range(len(self.cameras)):
            if missing[c] > 0:  # in flight when a forced stop (timeout) ended the run
                state.drop(c, "shutdown", int(missing[c]))
        live.sync_metrics()

    def _summarise(self, live: _LiveRun) -> RunSummary:
        state, tally = live.state, live.tally
        lat = np.asarray(tally.latencies_ns, dtype=np.float64) / 1e6
        verdicts = tally.counts
        n_verdicts = int(verdicts.sum())
        span = (tally.t_last - tally.t_first) if tally.t_first is not None and tally.t_last is not None else 0.0
        cameras = {}
        for c, cam in enumerate(self.cameras):
            cameras[cam] = {
                "frames": int(state.captured[c]),
                **{name: int(verdicts[c, j]) for j, name in enumerate(VERDICT_NAMES)},
                "drops": int(state.drops[c].sum()),
                "reconnects": int(state.reconnects[c]),
            }
        restarts = live.restarts()
        return RunSummary(
            frames=int(state.captured.sum()),
            verdicts=n_verdicts,
            rejects=int(verdicts[:, VERDICT_NAMES.index("reject")].sum()),
            errors=int(verdicts[:, VERDICT_NAMES.index("error")].sum()),
            drops=int(state.drops.sum()),
            restarts=sum(restarts.values()),
            latency_ms_p50=float(np.percentile(lat, 50)) if lat.size else None,
            latency_ms_p99=float(np.percentile(lat, 99)) if lat.size else None,
            fps=(n_verdicts - 1) / span if span > 0 else 0.0,
            cameras=cameras,
            drops_by_reason={r: int(state.drops[:, j].sum()) for j, r in enumerate(DROP_REASONS)},
            failure=live.failure or self._no_frame(state),
            restarts_by_stage=restarts,
            metrics_port=self.metrics_port,
            run_id=self.run_id,
            stored=self._stored(),
            spooled=int(state.spool[SPOOLED]),
            store_lost=int(state.spool[SPOOL_LOST]),
            shadow={
                cam: {"scored": int(tally.shadow[c, 0]), "disagreements": int(tally.shadow[c, 1])}
                for c, cam in enumerate(self.cameras)
                if tally.shadow[c, 0]
            },
        )

    def _no_frame(self, state: RunState) -> str | None:
        """Why a run that saw no frame at all (and was not stopped by a signal) failed."""
        if state.captured.sum() or self._stop_requested:
            return None
        cameras = "; ".join(
            f"{cam} ({self.sources[c].spec}): {'connected, no frame' if state.connected[c] else 'not connected'}, "
            f"{int(state.reconnects[c]) + 1} attempts"
            for c, cam in enumerate(self.cameras)
        )
        return f"no frame arrived from any source during the run: {cameras}"

    def _stored(self) -> int | None:
        if self.store is None:
            return None
        try:
            return self.store.count(self.run_id)
        except StoreError as exc:
            log.error("%s; cannot count the run's stored verdicts", exc)
            return None


class _LiveRun:
    """The processes, shared state, rings and counts of one run in progress, and the duties on them."""

    def __init__(
        self, pipeline: Pipeline, ctx: SpawnContext, state: RunState, rings: Rings, metrics: PipelineMetrics
    ) -> None:
        self.pipeline, self.ctx, self.state, self.rings, self.metrics = pipeline, ctx, state, rings, metrics
        self.stages = pipeline.stages
        self.tally = VerdictTally(len(pipeline.cameras))
        self.schedule = RestartSchedule.of(pipeline.config.pipeline)
        self.restart_at: dict[int, float] = {}  # failed stages waiting for their restart, by stage index
        # Each camera's pass scores against the held-out scores of the bundle that decided them (by slot).
        self.drift: list[DriftWatch | None] = [None] * len(pipeline.cameras)
        self.drift_slot = [-1] * len(pipeline.cameras)
        self._references: dict[int, DriftReference | None] = {}
        self.failure: str | None = None  # set when a stage failed once too often: the run stops
        self.control: RunControl | None = None  # the changeover endpoint, when on
        self.selftest: SelfTest | None = None
        if rings.golden is not None:
            gc = pipeline.config.golden
            self.selftest = SelfTest(rings.golden, gc.score_tolerance, gc.timeout_s, self._selftest_done)
        self.next_selftest = time.monotonic() + pipeline.config.golden.every_h * 3600.0

    def start(self, index: int) -> None:
        st = self.stages[index]
        context = StageContext(self.state.spec, index, self.pipeline.log_settings)
        st.process = self.ctx.Process(target=st.target, args=(context, st.args), name=st.name, daemon=True)
        st.process.start()

    def restart_failed(self) -> None:
        """Restart stages that died or went silent (capture stages only while capturing), each after its
        backoff; a stage that failed once too often within the window sets `failure` instead."""
        if self.failure is not None:
            return
        state, now = self.state, time.monotonic()
        for i, st in enumerate(self.stages):
            if st.process is None:
                continue  # not started yet (the cameras wait for the start-up self-test)
            if st.kind == "capture" and (state.done[st.camera] or state.stopping_sources()):
                self.restart_at.pop(i, None)
                continue  # finished (or told to): a capture process that ended is not restarted
            if i in self.restart_at:
                if now >= self.restart_at[i]:
                    del self.restart_at[i]
                    self._restart(i)
                continue
            if (why := self._failed(i)) is not None:
                self._schedule_restart(i, why, now)
                if self.failure is not None:
                    return

    def _failed(self, index: int) -> str | None:
        """Why stage `index` needs a restart (it exited, or went silent and was killed); None while it runs."""
        st, state = self.stages[index], self.state
        p = st.process
        assert p is not None
        timeout_s = heartbeat_timeout_s(self.pipeline.config.pipeline, st.kind)
        silent = state.ready[index] and time.monotonic_ns() - int(state.heartbeat_ns[index]) > timeout_s * 1e9
        if p.is_alive() and not silent:
            return None
        if not p.is_alive():
            return f"exited with code {p.exitcode}"
        p.kill()
        p.join(JOIN_TIMEOUT_S)
        return f"sent no heartbeat for {timeout_s:g} s"

    def _schedule_restart(self, index: int, why: str, now: float) -> None:
        st, pc = self.stages[index], self.pipeline.config.pipeline
        self.state.ready[index] = 0  # gone: not ready (for /readyz and its heartbeat age) until restarted
        wait = self.schedule.failed(index, now)
        if wait is None:
            self.failure = (
                f"stage {st.name} {why}, its failure number {self.schedule.failures(index)} within "
                f"{pc.restart_window_s:g} s (pipeline.max_restarts = {pc.max_restarts}): stopping the run"
            )
            return
        log.warning("%s %s; restarting it%s", st.name, why, f" in {wait:g} s" if wait else "")
        if wait:
            self.restart_at[index] = now + wait
        else:
            self._restart(index)

    def _restart(self, index: int) -> None:
        self.state.restarts[index] += 1
        self.state.ready[index] = 0
        self.start(index)

    def drain_verdicts(self) -> int:
        """Count and forward the verdicts waiting in the verdict ring; returns how many slots were read."""
        ring, tally = self.rings.verdict, self.tally
        slots = ring.written()
        if slots.size and tally.t_first is None:
            # The last periodic sync may predate the cameras opening: the first verdicts bring the
            # gauges (camera connected, ring occupancy) up to date at once, not up to 0.25 s later.
            self.sync_metrics()
        for s in slots:
            rec = ring.headers[int(s)].copy()
            ring.release(int(s))
            if rec["golden"]:
                if self.selftest is not None:
                    self.selftest.observe(rec)
                continue
            if not tally.add(rec):
                continue
            bundle = int(rec["bundle"])
            if self.pipeline.config.drift.enabled and int(rec["verdict"]) == PASS:
                self._watch_drift(int(rec["camera"]), bundle, float(rec["score"]))
            self.metrics.observe(rec, self.pipeline.slot_bundles[bundle].threshold)
            if self.pipeline.on_verdict is not None:
                self.pipeline.on_verdict(rec)
        return int(slots.size)

    def _watch_drift(self, camera: int, bundle: int, score: float) -> None:
        if self.drift_slot[camera] != bundle:  # a changeover: the new bundle's scores have their own reference
            self.drift_slot[camera] = bundle
            if bundle not in self._references:
                self._references[bundle] = self.pipeline.drift_reference(self.pipeline.slot_bundles[bundle])
            reference, dc = self._references[bundle], self.pipeline.config.drift
            level = alarm_level(dc.horizon_parts, dc.false_alarm)
            self.drift[camera] = None if reference is None else DriftWatch(reference, level)
        watch = self.drift[camera]
        if watch is None:
            return
        was = watch.alarm
        watch.observe(score)
        if watch.alarm != was:
            cam = self.pipeline.cameras[camera]
            if watch.alarm:
                log.warning(
                    "camera %s: good parts score higher than at calibration (drift statistic %.3g >= %.3g after "
                    "%d passed parts): the false-reject bound may no longer hold", cam, watch.statistic,
                    watch.alarm_level, watch.parts,
                )  # fmt: skip
            else:
                log.info("camera %s: pass scores are back in line with the calibration", cam)

    def live_bundles(self) -> list[tuple[int, RunBundle]]:
        """(slot, bundle) of each bundle deciding some camera now."""
        table = self.pipeline.table
        assert table is not None
        slots = sorted({int(s) for s in table.live})
        return [(s, self.pipeline.slot_bundles[s]) for s in slots]

    def tick_selftest(self) -> None:
        """Send waiting golden frames, judge finished rounds, start the scheduled one when due."""
        if self.selftest is None:
            return
        self.selftest.pump()
        self.selftest.poll()
        every_h = self.pipeline.config.golden.every_h
        if every_h > 0 and time.monotonic() >= self.next_selftest and not self.state.stopping_sources():
            self.next_selftest = time.monotonic() + every_h * 3600.0
            for slot, bundle in self.live_bundles():
                self.selftest.start(slot, bundle, "scheduled")

    def _selftest_done(self, result: SelfTestResult) -> None:
        """Store the outcome and say on the heartbeat whether any bundle in charge failed its last self-test."""
        self._flag_selftest()
        if self.control is not None:
            self.control.selftest_finished(result)
        store = self.pipeline.store
        if store is not None:
            try:
                SelfTestLog(store).record(self.pipeline.run_id, result)
            except StoreError as exc:
                log.error("%s; the self-test of %s is not recorded", exc, result.path)

    def accounted(self) -> np.ndarray:
        return self.tally.counts.sum(axis=1) + self.state.drops.sum(axis=1)

    def all_accounted(self) -> bool:
        return bool(np.array_equal(self.accounted(), self.state.captured))

    def sources_done(self) -> bool:
        return all(self.state.done[c] for c in range(len(self.pipeline.cameras)))

    def sync_metrics(self) -> None:
        """Metrics, readiness and the service manager's watchdog, brought up to date."""
        now_ns = time.monotonic_ns()
        ages = {  # of stages up and taking frames: a stage loading its model beats only once it is ready
            st.name: (now_ns - int(self.state.heartbeat_ns[i])) / 1e9
            for i, st in enumerate(self.stages)
            if self.state.ready[i]
        }
        self.metrics.sync(self.state, self.rings.occupancy(self.pipeline.cameras), self.restarts(), ages)
        for cam, watch in zip(self.pipeline.cameras, self.drift, strict=True):
            if watch is not None:
                self.metrics.drift.labels(cam).set(watch.statistic)
        self._sync_selftest()
        problems = self.readiness_problems(ages)
        self.pipeline.probe.set_problems(problems)
        service = self.pipeline.service
        service.status("; ".join(problems) if problems else f"inspecting: {int(self.tally.counts.sum())} verdicts")
        service.watchdog()

    def readiness_problems(self, heartbeat_ages: dict[str, float]) -> list[str]:
        """Why the run cannot inspect parts now (what /readyz answers); empty when it can."""
        state, pc, problems = self.state, self.pipeline.config.pipeline, []
        if state.stopping_sources():
            return ["stopping: the frames in flight get their verdicts"]
        for i, st in enumerate(self.stages):
            if st.kind == "capture":
                continue
            if i in self.restart_at or not state.ready[i]:
                problems.append(f"{st.name} not ready")
            elif heartbeat_ages.get(st.name, 0.0) > heartbeat_timeout_s(pc, st.kind):
                problems.append(f"{st.name} silent for {heartbeat_ages[st.name]:.0f} s")
        for c, cam in enumerate(self.pipeline.cameras):
            if not state.connected[c] and not state.done[c]:
                problems.append(f"camera {cam} ({self.pipeline.sources[c].spec}) not connected")
        problems += self.selftest_problems()
        if state.store[STORE_FAILING]:
            problems.append("verdict store not writable")
        return problems

    def _sync_selftest(self) -> None:
        table = self.pipeline.table
        if self.selftest is None or table is None:
            return
        self._flag_selftest()  # a camera switched away from a bundle that failed clears the heartbeat's complaint
        for c, cam in enumerate(self.pipeline.cameras):
            last = self.selftest.latest.get(table.hash(int(table.live[c])))
            self.metrics.selftest_passed.labels(cam).set(float("nan") if last is None else float(last.passed))

    def _flag_selftest(self) -> None:
        """Tell the heartbeat (decide) whether a bundle in charge failed its last self-test."""
        assert self.selftest is not None
        failing = any(self.selftest.failed(b.hash) for _, b in self.live_bundles())
        self.state.flags[FLAG_SELFTEST_FAILED] = int(failing)

    def selftest_problems(self) -> list[str]:
        """Each camera whose bundle failed its last golden self-test, with the first failure."""
        table = self.pipeline.table
        if self.selftest is None or table is None:
            return []
        out = []
        for c, cam in enumerate(self.pipeline.cameras):
            if (failed := self.selftest.failed(table.hash(int(table.live[c])))) is not None:
                more = f" (and {len(failed.failures) - 1} more)" if len(failed.failures) > 1 else ""
                name = Path(failed.path).name
                out.append(f"camera {cam}: golden self-test of {name} failed: {failed.failures[0]}{more}")
        return out

    def restarts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, st in enumerate(self.stages):
            out[st.kind] = out.get(st.kind, 0) + int(self.state.restarts[i])
        return out

    def join(self, kind: str | None = None) -> None:
        """Wait for the stages (of one kind) to exit; one that does not in time is killed."""
        for st in self.stages:
            if st.process is None or (kind is not None and st.kind != kind):
                continue
            st.process.join(RECORDER_JOIN_TIMEOUT_S if st.kind == "recorder" else JOIN_TIMEOUT_S)
            if kind is None and st.process.is_alive():
                st.process.kill()
                st.process.join(JOIN_TIMEOUT_S)

    def kill_all(self) -> None:
        self.state.flags[FLAG_STOP_ALL] = 1
        for st in self.stages:
            if st.process is not None and st.process.is_alive():
                st.process.kill()
                st.process.join(JOIN_TIMEOUT_S)


@dataclass
class RunControl:
    server: ControlServer
    changeover: Changeover
    selftest: SelfTest | None
    live_bundles: Callable[[], list[tuple[int, RunBundle]]]
    # requesters of an on-demand self-test, with the bundle hashes they wait for
    waiting: list[tuple[bytes, set[str], list[SelfTestResult]]] = field(default_factory=list)

    def serve(self) -> None:
        """Take the waiting switch requests and answer those that are decided (never blocks)."""
        for ticket, request in self.server.requests():
            try:
                if isinstance(request, SelfTestRequest):
                    self._selftest(ticket)
                elif (outcome := self.changeover.request(ticket, request)) is not None:
                    self.server.reply(ticket, outcome)
            except Exception as exc:  # noqa: BLE001 - a request must never stop the line; its asker hears why
                log.exception("control request %s failed", request)
                self.server.reply(ticket, SwitchOutcome(getattr(request, "camera", ""), False, error=repr(exc)))
        for ticket, outcome in self.changeover.poll():
            self.server.reply(ticket, outcome)

    def _selftest(self, ticket: bytes) -> None:
        if self.selftest is None:
            self.server.reply_selftest(ticket, SelfTestOutcome(False, error="golden.enabled is false in this run"))
            return
        started = {b.hash for slot, b in self.live_bundles() if self.selftest.start(slot, b, "on demand")}
        if not started:
            self.server.reply_selftest(ticket, SelfTestOutcome(False, error="no bundle in charge holds golden frames"))
            return
        self.waiting.append((ticket, started, []))

    def selftest_finished(self, result: SelfTestResult) -> None:
        """Answer the requesters once every bundle they wait for has its result."""
        still = []
        for ticket, wanted, results in self.waiting:
            if result.bundle in wanted:
                wanted.discard(result.bundle)
                results.append(result)
            if wanted:
                still.append((ticket, wanted, results))
            else:
                passed = all(r.passed for r in results)
                self.server.reply_selftest(ticket, SelfTestOutcome(passed, [asdict(r) for r in results]))
        self.waiting = still

    def refuse_pending(self, why: str) -> None:
        for ticket, outcome in self.changeover.refuse_pending(why):
            self.server.reply(ticket, outcome)
        for ticket, _, _ in self.waiting:
            self.server.reply_selftest(ticket, SelfTestOutcome(False, error=why))
        self.waiting = []


def heartbeat_timeout_s(config: PipelineConfig, kind: str) -> float:
    """How long a stage of `kind` may stay silent before it is restarted."""
    return config.background_heartbeat_timeout_s if kind in BACKGROUND_STAGES else config.heartbeat_timeout_s


def _open_store(config: RuntimeConfig, bundle_path: Path) -> tuple[StorePaths, VerdictStore]:
    """The run's data folder and store, opened now: a corrupt, foreign or unreachable store stops the start."""
    paths = StorePaths.resolve(config.store, bundle_path)
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"store.path = {str(paths.root)!r}: cannot create the data folder ({exc.strerror})") from None
    return paths, VerdictStore(paths.url, line=paths.line)
