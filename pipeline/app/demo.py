"""`linewatch demo`: the whole story on generated data, with nothing to download.

1. Generates an MVTec-layout dataset from scikit-image texture photos with synthetic defects, fits
   PatchCore and PaDiM on the default backbone per category, evaluates each and prints a table.
2. Calibrates PatchCore on a larger "line" category: a threshold that rejects at most 1 % of good
   parts with 95 % confidence, plus report.html.
3. Replays that category's test set through the streaming pipeline as a conveyor, prints each reject
   as it arrives over ZeroMQ, serves Prometheus metrics, and ends with the run summary.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq

from calibration.calibrate import calibrate
from calibration.datasets import MVTecCategory, normal_frames
from calibration.evaluate import Evaluation, evaluate, format_metric
from calibration.fit import fit
from calibration.report import write_report
from calibration.synthetic import TEXTURES, generate_mvtec_dataset
from edge.bundle import load_bundle, save_bundle
from linewatch_plc.wire import decode
from pipeline.app.config import Config, with_overrides
from pipeline.app.ports import free_port
from pipeline.logs import LogSettings
from pipeline.settings import SourceConfig
from pipeline.supervisor import Pipeline

LINE_CATEGORY = "grass"  # the hardest of the three textures
LINE_NORMAL_FRAMES = 400  # 300 held out: enough for 1 % at 95 % (299 needed)
CONVEYOR_PPM = 300  # 5 parts/s: below what the 2-core dev box scores, so latency is not queueing

log = logging.getLogger(__name__)

COLUMNS = ("category", "model", "fit s", "img AUROC", "px AUROC", "PRO", "F1", "ms/img")


def _row(category: str, model: str, fit_s: float, ev: Evaluation) -> tuple[str, ...]:
    metrics = (ev.image_auroc, ev.pixel_auroc, ev.pro, ev.f1)
    return (category, model, f"{fit_s:.1f}", *map(format_metric, metrics), f"{ev.ms_per_image:.1f}")


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    for r in [COLUMNS, *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def run_demo(
    workdir: Path,
    quiet: bool = False,
    n_train: int = 100,
    models: tuple[str, ...] = ("patchcore", "padim"),
    line_frames: int = LINE_NORMAL_FRAMES,
    log_settings: LogSettings | None = None,
) -> int:
    progress = not quiet
    data_root = workdir / "data"
    log.info("[1/3] fit and evaluate: generating demo dataset in %s ...", data_root)
    categories = generate_mvtec_dataset(data_root, TEXTURES, n_train=n_train)
    rows = []
    for folder in categories:
        for name in models:
            config = with_overrides(Config(), {"model.name": name})
            start = time.perf_counter()
            result = fit(config, normal_frames(folder), progress=progress)
            fit_s = time.perf_counter() - start
            bundle_path = workdir / "bundles" / f"{folder.name}-{name}.pt"
            save_bundle(bundle_path, result.model, result.manifest)
            ev, _ = evaluate(load_bundle(bundle_path), MVTecCategory(folder), progress=progress)
            rows.append(_row(folder.name, name, fit_s, ev))
    print()
    print_table(rows)
    print()
    line = calibrate_line(workdir, line_frames, progress)
    print()
    replay(workdir, line, log_settings)
    return 0


def calibrate_line(workdir: Path, n_frames: int, progress: bool) -> Path:
    """Calibrate PatchCore on a fresh category with enough normal frames for the 1 % / 95 % bound."""
    log.info("[2/3] calibrate: %d good frames of %s, threshold for <= 1 %% false rejects", n_frames, LINE_CATEGORY)
    folder = generate_mvtec_dataset(workdir / "line", (LINE_CATEGORY,), n_train=n_frames, seed=7)[0]
    config = with_overrides(Config(), {"calibration.holdout_fraction": 0.75})
    cal = calibrate(config, normal_frames(folder), MVTecCategory(folder), progress=progress)
    bundle = workdir / "line" / "line.pt"
    digest = save_bundle(bundle, cal.fit.model, cal.manifest, cal.golden)
    write_report(bundle.parent, cal, bundle, digest)
    c = cal.choice
    print(
        f"threshold {c.threshold:.4g}: with {c.confidence:.0%} confidence at most {c.fpr_bound:.2%} of good parts "
        f"rejected (from {c.n} held-out frames); synthetic defects caught: "
        + ", ".join(f"{r.label} {r.value:.0%}" for r in cal.synthetic_recall)
    )
    print(f"report: {bundle.parent / 'report.html'}")
    return folder


def replay(workdir: Path, folder: Path, log_settings: LogSettings | None = None) -> None:
    """Replay the line category's test set as a conveyor; print rejects as a PLC bridge would see them."""
    pub_port, metrics_port, replay_port = free_port(5556), free_port(9108), free_port(5557)
    address = f"tcp://127.0.0.1:{pub_port}"
    overrides = {
        "publisher.address": address,
        "publisher.replay_address": f"tcp://127.0.0.1:{replay_port}",
        "metrics.port": metrics_port,
        "pipeline.max_frame_height": 512,
    }
    config = with_overrides(Config(), overrides)
    truth = [s.defect_type for s in sorted(MVTecCategory(folder).test, key=lambda s: str(s.path))]
    log.info(
        "[3/3] run: replaying %d parts at %d parts/min; rejects over ZeroMQ at %s, metrics at http://127.0.0.1:%d/metrics",
        len(truth),
        CONVEYOR_PPM,
        address,
        metrics_port,
    )
    listener = RejectPrinter(address, truth)
    listener.start()
    source = SourceConfig(spec=f"folder:{folder}", rate_ppm=CONVEYOR_PPM)
    summary = Pipeline(config, workdir / "line" / "line.pt", (source,), log_settings=log_settings).run()
    time.sleep(0.3)
    listener.stop()
    p50, p99 = summary.latency_ms_p50 or 0.0, summary.latency_ms_p99 or 0.0
    print(
        f"\nrun summary: {summary.frames} parts, {summary.rejects} rejected, "
        f"{summary.verdicts - summary.rejects - summary.errors} passed, {summary.errors} errors, "
        f"{summary.drops} dropped; latency p50 {p50:.0f} ms, p99 {p99:.0f} ms"
    )
    missed = sum(1 for k in truth if k != "good") - listener.true_rejects
    print(
        f"against the ground truth: {listener.true_rejects} defects rejected, {missed} missed, "
        f"{listener.false_rejects} good parts rejected"
    )
    if summary.stored is not None:
        bundle = workdir / "line" / "line.pt"
        print(
            f"{summary.stored} verdicts recorded, with the images of every reject: "
            f"linewatch history --bundle {bundle} --verdict reject"
        )
        print(f"review them on the operator page: linewatch station --bundle {bundle} (http://127.0.0.1:8080/)")


class RejectPrinter(threading.Thread):
    """A minimal PLC bridge: subscribes to rejects and prints them with the replay's ground truth."""

    def __init__(self, address: str, truth: list[str]) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"reject")
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.connect(address)
        self.truth = truth
        self.true_rejects = self.false_rejects = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                msg = decode(self.sock.recv_multipart())
            except zmq.Again:
                continue
            kind = self.truth[msg["frame_id"]] if msg["frame_id"] < len(self.truth) else "?"
            if kind == "good":
                self.false_rejects += 1
            else:
                self.true_rejects += 1
            print(
                f"  REJECT part {msg['trigger']:3d}  score {msg['score']:7.2f} > {msg['threshold']:.2f}  "
                f"(truth: {kind})",
                flush=True,
            )

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self.sock.close()
        self.ctx.term()
