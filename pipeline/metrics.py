"""Prometheus metrics of a run, served by the supervisor process.

Stages do not touch Prometheus: the supervisor sees every verdict record (with the stage timestamps
it carries) and reads the shared counters, so one registry in one process covers all processes.
Names and buckets follow the design notes; base units (seconds); never a frame id in a label. Scores
are recorded as score / threshold, so that histograms of boxes running different bundles add up. The
registry also carries the box's liveness (`linewatch_up`, from the supervisor loop's last pass), its
readiness, a build info and the standard `process_*` series.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector

from edge.bundle import versions
from linewatch_plc.wire import VERDICT_NAMES
from pipeline.bundles import RunBundle
from pipeline.endpoints import EndpointServer, RunProbe
from pipeline.state import (
    DROP_REASONS,
    SPOOL_LOST,
    SPOOLED,
    STORE_ARCHIVE_BYTES,
    STORE_ERRORS,
    STORE_EXPIRED,
    STORE_UNSPOOLED,
    STORE_WRITTEN,
    RunState,
)

LATENCY_BUCKETS = tuple(ms / 1000.0 for ms in (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# score / threshold: fine around 1 (the reject boundary), the same on every box whatever its bundle.
SCORE_RATIO_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


class PipelineMetrics:
    def __init__(self, cameras: list[str], stages: list[str], probe: RunProbe) -> None:
        """`stages`: stage kinds (capture, preprocess, infer, decide), the label of restarts."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.cameras, self.stages, self.probe = cameras, stages, probe
        self.e2e = Histogram(
            "linewatch_e2e_latency_seconds", "Capture to verdict published", buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "linewatch_stage_latency_seconds", "Time spent per stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.frames = Counter("linewatch_frames", "Verdicts published", ["camera", "verdict"], registry=r)
        self.dropped = Counter(
            "linewatch_dropped_frames", "Frames dropped, by reason", ["camera", "reason"], registry=r
        )
        self.occupancy = Gauge("linewatch_ring_occupancy", "Frames waiting in a ring", ["ring"], registry=r)
        self.batch = Histogram("linewatch_batch_size", "Inference batch size", buckets=BATCH_BUCKETS, registry=r)
        self.score_ratio = Histogram(
            "linewatch_score_ratio", "Anomaly score / reject threshold", buckets=SCORE_RATIO_BUCKETS, registry=r
        )
        self.threshold = Gauge("linewatch_threshold", "Reject threshold of the camera's bundle", ["camera"], registry=r)
        self.false_reject_bound = Gauge(
            "linewatch_false_reject_bound", "False-reject rate the camera's bundle was calibrated to stay under",
            ["camera"], registry=r,
        )  # fmt: skip
        self.restarts = Counter("linewatch_stage_restarts", "Stage process restarts", ["stage"], registry=r)
        self.connected = Gauge("linewatch_camera_connected", "1 while the camera delivers", ["camera"], registry=r)
        self.reconnects = Counter("linewatch_camera_reconnects", "Camera reconnect attempts", ["camera"], registry=r)
        self.bundle = Info("linewatch_bundle", "Model bundle deciding the camera's frames", ["camera"], registry=r)
        self.store_writes = Counter("linewatch_store_writes", "Verdict rows written to the store", registry=r)
        self.store_errors = Counter(
            "linewatch_store_errors", "Failed store writes and image archive errors", registry=r
        )
        self.store_backlog = Gauge(
            "linewatch_store_backlog", "Verdicts published but not yet stored (buffer + spool)", registry=r
        )
        self.store_lost = Counter(
            "linewatch_store_lost", "Verdicts not recorded: buffer and spool both full", registry=r
        )
        self.archive_bytes = Gauge("linewatch_archive_bytes", "Size of the image archive", registry=r)
        self.images_expired = Counter(
            "linewatch_images_expired", "Archived images deleted by retention (rows kept)", registry=r
        )
        self.drift = Gauge(
            "linewatch_drift_statistic", "Shiryaev-Roberts drift statistic of pass scores", ["camera"], registry=r
        )
        self.drift_alarm_level = Gauge(
            "linewatch_drift_alarm_level", "Drift statistic at which the drift alert fires", registry=r
        )
        self.shadow_frames = Counter(
            "linewatch_shadow_frames", "Frames the camera's shadow bundle scored too", ["camera"], registry=r
        )
        self.shadow_disagreements = Counter(
            "linewatch_shadow_disagreements", "Frames the shadow bundle decided otherwise (live: published verdict)",
            ["camera", "live"], registry=r,
        )  # fmt: skip
        self.selftest_passed = Gauge(
            "linewatch_selftest_passed", "1: the camera's bundle passed its last golden self-test, 0: it failed",
            ["camera"], registry=r,
        )  # fmt: skip
        self.heartbeat_age = Gauge(
            "linewatch_stage_heartbeat_age_seconds", "Time since the stage's last heartbeat", ["stage"], registry=r
        )
        self._health_gauges(r)
        for stage in stages:  # zero series from the start, so dashboards show 0 rather than "no data"
            self.restarts.labels(stage)
        for cam in cameras:
            # unknown until set: a 0 would make every reject look excessive
            self.false_reject_bound.labels(cam).set(float("nan"))
            self.selftest_passed.labels(cam).set(float("nan"))  # not run (yet, or the bundle holds no golden frames)
            self.connected.labels(cam)
            self.reconnects.labels(cam)
            for verdict in VERDICT_NAMES:
                self.frames.labels(cam, verdict)
            for reason in DROP_REASONS:
                self.dropped.labels(cam, reason)
        self._seen_drops = np.zeros((len(cameras), len(DROP_REASONS)), dtype=np.int64)
        self._seen_restarts: dict[str, int] = {}
        self._seen_reconnects = np.zeros(len(cameras), dtype=np.int64)
        self._seen_store = np.zeros(4, dtype=np.int64)  # written, errors, expired, lost
        self._server = EndpointServer(self.registry, probe)

    def _health_gauges(self, r: CollectorRegistry) -> None:
        probe = self.probe
        up = Gauge("linewatch_up", "1 while the supervisor loop runs (what /healthz answers)", registry=r)
        up.set_function(lambda: float(probe.live()[0]))
        ready = Gauge("linewatch_ready", "1 while the run can inspect parts (what /readyz answers)", registry=r)
        ready.set_function(lambda: float(probe.ready()[0]))
        age = Gauge("linewatch_supervisor_loop_age_seconds", "Time since the supervisor loop's last pass", registry=r)
        age.set_function(probe.loop_age_s)
        build = Info("linewatch_build", "linewatch and the versions it runs on", registry=r)
        v = versions()
        build.info({"version": v["linewatch"], "python": v["python"], "torch": v["torch"]})
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics, /healthz and /readyz; returns the bound port (useful with port 0)."""
        try:
            return self._server.serve(host, port)
        except OSError as exc:
            raise OSError(f"metrics.port = {port}: cannot serve /metrics on {host}:{port} ({exc.strerror})") from None

    def close(self) -> None:
        self._server.close()

    def set_bundle(self, camera: str, bundle: RunBundle) -> None:
        """The bundle now deciding `camera`'s frames: its identity, threshold and false-reject bound."""
        manifest, record = bundle.manifest, bundle.manifest.threshold
        self.bundle.labels(camera).info(
            {"hash": bundle.hash[:16], "model": manifest.model, "backbone": manifest.feature_extractor}
        )
        self.threshold.labels(camera).set(bundle.threshold)
        bound = None if record is None else record.false_reject_bound()
        self.false_reject_bound.labels(camera).set(float("nan") if bound is None else bound)

    def observe(self, rec: np.void, threshold: float) -> None:
        """One verdict record (RECORD) with its stage timestamps; `threshold`: its bundle's."""
        cam = self.cameras[int(rec["camera"])]
        verdict = VERDICT_NAMES[int(rec["verdict"])]
        self.frames.labels(cam, verdict).inc()
        self.e2e.observe((int(rec["m_decide_ns"]) - int(rec["m_capture_ns"])) / 1e9)
        stamps = ("m_capture_ns", "m_pre_ns", "m_infer_ns", "m_decide_ns")
        for stage, (a, b) in zip(("preprocess", "infer", "decide"), zip(stamps, stamps[1:], strict=False), strict=True):
            if rec[a] and rec[b]:
                self.stage.labels(stage).observe(max(0, int(rec[b]) - int(rec[a])) / 1e9)
        if verdict != "error" and threshold > 0:
            self.score_ratio.observe(float(rec["score"]) / threshold)
        if rec["shadow"] > 0 and verdict != "error":
            self.shadow_frames.labels(cam).inc()
            if rec["shadow_verdict"] != rec["verdict"]:
                self.shadow_disagreements.labels(cam, verdict).inc()
        if rec["batch"] > 0:  # set on the first record of each inference batch only
            self.batch.observe(int(rec["batch"]))

    def sync(
        self, state: RunState, rings: dict[str, int], restarts: dict[str, int], heartbeat_ages: dict[str, float]
    ) -> None:
        """Bring counters and gauges up to date with the shared state (counters move by their deltas)."""
        for stage, age in heartbeat_ages.items():
            self.heartbeat_age.labels(stage).set(age)
        drops = state.drops.copy()
        for c, cam in enumerate(self.cameras):
            for j, reason in enumerate(DROP_REASONS):
                delta = int(drops[c, j] - self._seen_drops[c, j])
                if delta > 0:
                    self.dropped.labels(cam, reason).inc(delta)
            self.connected.labels(cam).set(int(state.connected[c]))
            delta = int(state.reconnects[c] - self._seen_reconnects[c])
            if delta > 0:
                self.reconnects.labels(cam).inc(delta)
        self._seen_drops = drops
        self._seen_reconnects = state.reconnects.copy()
        for ring, occupied in rings.items():
            self.occupancy.labels(ring).set(occupied)
        for stage, n in restarts.items():
            delta = n - self._seen_restarts.get(stage, 0)
            if delta > 0:
                self.restarts.labels(stage).inc(delta)
            self._seen_restarts[stage] = n
        self._sync_store(state, rings.get("records", 0))

    def _sync_store(self, state: RunState, buffered: int) -> None:
        store = state.store
        now = np.array([store[STORE_WRITTEN], store[STORE_ERRORS], store[STORE_EXPIRED], state.spool[SPOOL_LOST]])
        for counter, delta in zip(
            (self.store_writes, self.store_errors, self.images_expired, self.store_lost),
            now - self._seen_store,
            strict=True,
        ):
            if delta > 0:
                counter.inc(int(delta))
        self._seen_store = now
        spooled = max(0, int(state.spool[SPOOLED]) - int(store[STORE_UNSPOOLED]))
        self.store_backlog.set(buffered + spooled)
        self.archive_bytes.set(int(store[STORE_ARCHIVE_BYTES]))
