"""`linewatch bench`: how fast a bundle runs on this box, each figure against its floor, in one run.

- backbone alone (the floor: PatchCore cannot beat its own feature extractor),
- the full model (scores + full-resolution smoothed maps): throughput at --batch, latency at batch 1,
- the streaming pipeline on a looping folder replay in `block` mode (nothing dropped),
and the ratios pipeline/model and model/backbone, the memory bank's size and the peak RSS.
"""

from __future__ import annotations

import functools
import os
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from edge.backbones import FeatureBackbone
from edge.backends import check_backend, engine_cache_dir, prepare_backend
from edge.bundle import load_bundle
from pipeline.app.config import Config, with_overrides
from pipeline.app.ports import free_port
from pipeline.app.store_bench import (
    StoreBench,
    latency_with_and_without_store,
    p99_change_interval,
    p99_spread,
    recorder_throughput,
    rounds_for,
    sqlite_in,
)
from pipeline.logs import LogSettings
from pipeline.settings import SourceConfig, UiConfig
from pipeline.supervisor import Pipeline, detail, headline


@dataclass
class BenchResult:
    backbone_fps: float
    model_fps: float
    pipeline_fps: float
    pipeline_efficiency: float
    model_ms_p50: float
    model_ms_p99: float
    backbone_ms_p50: float
    bank_mb: float
    rss_mb: float
    batch: int = detail()
    pipeline_cpu: dict[str, float] = detail()  # CPU cores used, per process
    store: StoreBench | None = detail(default=None)  # None: --no-store

    def to_json(self) -> dict[str, float | None]:
        """The figures `linewatch bench --json` prints (the detail fields are for the text output)."""
        figures: dict[str, float | None] = headline(self)
        if self.store is not None:
            figures |= {f"store_{k}": v for k, v in vars(self.store).items()}
            figures["store_p99_change"] = self.store.p99_change
        return figures


class BackboneOnly(nn.Module):
    """The model's feature extractor as the model runs it (padded frame): the floor `bench` compares with.

    Prepared with the same backend as the model, so a compiled model is not compared with an eager floor.
    """

    def __init__(self, backbone: FeatureBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.padded(x)


def completed(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """`fn`, waiting for `device` to finish its work: CUDA calls return when queued, so a host clock around
    a bare call times the launch, not the inference."""
    if not str(device).startswith("cuda"):
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def throughput(fn: Callable[[], object], items: int, seconds: float) -> float:
    """Items per second of `fn` (which handles `items` per call), after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += items
    return n / (time.perf_counter() - start)


def interleaved_call_seconds(
    fns: dict[str, Callable[[], object]],
    seconds: float = 0.0,
    rounds: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    burst: int = 1,
) -> dict[str, list[float]]:
    """Duration of every call of each `fn`, called in turn round by round (at least `rounds` rounds and
    `seconds` long) so drift on a noisy box hits all alike. One warm-up call each, not counted.

    With `burst` > 1 each fn runs `burst` times per turn and the first call of a turn is not counted:
    it starts on the caches the other fns left, which a model running alone on its box never does.
    """
    for fn in fns.values():
        fn()
    spent: dict[str, list[float]] = {name: [] for name in fns}
    done = 0
    start = clock()
    while done < rounds or clock() - start < seconds:
        for name, fn in fns.items():
            for i in range(burst):
                t = clock()
                fn()
                if burst == 1 or i > 0:
                    spent[name].append(clock() - t)
        done += 1
    return spent


def interleaved_throughput(
    fns: dict[str, Callable[[], object]], items: int, seconds: float, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Items per second of each `fn` (each handles `items` per call), timed interleaved; only the time
    inside each call counts for it."""
    spent = interleaved_call_seconds(fns, seconds, clock=clock)
    return {name: len(v) * items / sum(v) for name, v in spent.items()}


def latencies_ms(fn: Callable[[], object], seconds: float, at_least: int = 20) -> np.ndarray:
    fn()
    out = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(out) < at_least:
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return np.asarray(out)


def paced_loop_latencies_ms(
    fn: Callable[[], object],
    period_s: float,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> np.ndarray:
    """Latency in ms of each part through a one-process loop fed on a conveyor's schedule: no stages, no
    rings, just `fn` per part, as a line engineer's own loop would run. Part i is due at i * `period_s`;
    if the loop is still busy then, the part waits, and its latency runs from when it was due. So stalls
    of the box and queueing behind a slow call reach this loop as they reach the pipeline. One warm-up
    call first, not counted.
    """
    fn()
    out = []
    start = clock()
    i = 0
    while (due := start + i * period_s) - start < seconds:
        if (now := clock()) < due:
            sleep(due - now)
            t0 = clock()  # idle: stamped on waking, as the pipeline's capture stamps a part it releases
        else:
            t0 = due  # busy: the part has waited since it was due
        fn()
        out.append((clock() - t0) * 1000.0)
        i += 1
    return np.asarray(out)


def interleaved_batch1_ms(
    models: dict[str, Callable[[torch.Tensor], object]],
    size: tuple[int, int],
    rounds: int = 60,
    device: str = "cpu",
    burst: int = 1,
) -> dict[str, float]:
    """Batch-1 p50 per model in ms, calls interleaved round by round so drift on a noisy box hits all alike
    (`burst`: see `interleaved_call_seconds`)."""
    x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last).to(device)
    calls = {k: completed(functools.partial(m, x), device) for k, m in models.items()}
    with torch.inference_mode():
        spent = interleaved_call_seconds(calls, rounds=rounds, burst=burst)
    return {k: float(np.percentile(v, 50)) * 1000.0 for k, v in spent.items()}


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process in clock ticks (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def synthetic_frames(folder: Path, size: tuple[int, int], n: int = 32, seed: int = 0) -> Path:
    """Textured noise frames to replay when no data is given (throughput does not depend on content)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        noise = rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.resize(noise, (size[1], size[0]), interpolation=cv2.INTER_CUBIC))
    return folder


@dataclass
class Replay:
    """What a timed looping replay measured."""

    fps: float
    e2e_ms: np.ndarray  # capture to verdict published, per verdict
    decide_ms: np.ndarray  # inference done to verdict published (and, with the store on, left for the recorder)
    cpu: dict[str, float]  # CPU cores used, per process


def timed_replay(
    config: Config,
    bundle: Path,
    data: Path,
    seconds: float,
    rate_ppm: float = 0.0,
    log_settings: LogSettings | None = None,
) -> Replay:
    """A looping replay of `data`, measured over `seconds` after the first verdict plus a quarter of that for
    warm-up."""
    with tempfile.TemporaryDirectory(prefix="linewatch-bench-store-") as tmp:
        ports = {"publisher.address": f"tcp://127.0.0.1:{free_port()}", "metrics.port": 0}
        ports["publisher.replay_address"] = f"tcp://127.0.0.1:{free_port()}"
        ports["ui.feed_address"] = f"tcp://127.0.0.1:{free_port()}"
        if config.ui.port == UiConfig.port:  # a bench beside a running line must not take its page's port
            ports["ui.port"] = free_port()
        if config.store.path is None:  # a bench's verdicts never join those of the line beside the bundle
            ports["store.path"] = tmp
        return _timed_replay(with_overrides(config, ports), bundle, data, seconds, rate_ppm, log_settings)


def _timed_replay(
    config: Config, bundle: Path, data: Path, seconds: float, rate_ppm: float, log_settings: LogSettings | None
) -> Replay:
    source = SourceConfig(spec=f"folder:{data}", loop=True, rate_ppm=rate_ppm)
    stamps: list[tuple[float, int, int]] = []
    cpu: dict[str, float] = {}
    started, measuring = threading.Event(), threading.Event()

    def on_verdict(rec: np.void) -> None:
        started.set()
        if measuring.is_set():
            decided = int(rec["m_decide_ns"])
            stamps.append((time.monotonic(), decided - int(rec["m_capture_ns"]), decided - int(rec["m_infer_ns"])))

    pipeline = Pipeline(config, bundle, (source,), on_verdict, config.model.backbone_weights, log_settings=log_settings)

    def measure() -> None:
        started.wait()
        time.sleep(seconds * 0.25)  # warm-up: rings fill, batches settle
        pids = {s.name: s.process.pid for s in pipeline.stages if s.process is not None and s.process.pid}
        pids["supervisor"] = os.getpid()
        before = {k: cpu_ticks(p) for k, p in pids.items()}
        measuring.set()
        time.sleep(seconds)
        measuring.clear()
        for k, p in pids.items():
            try:
                cpu[k] = (cpu_ticks(p) - before[k]) / os.sysconf("SC_CLK_TCK") / seconds
            except OSError:
                pass  # a stage restarted during the window: its CPU time is not comparable
        pipeline.request_stop()

    threading.Thread(target=measure, daemon=True).start()
    pipeline.run(install_signals=False)
    table = np.array(stamps, dtype=np.float64).reshape(-1, 3)
    times = table[:, 0]
    fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return Replay(fps, table[:, 1] / 1e6, table[:, 2] / 1e6, cpu)


def run_bench(
    bundle_path: Path,
    config: Config,
    batch: int,
    seconds: float,
    data: Path | None = None,
    log_settings: LogSettings | None = None,
    store_section: bool = True,
    store_url: str | None = None,
) -> BenchResult:
    pc = config.pipeline
    check_backend(pc.backend, pc.device, pc.backend_fallback)
    bundle = load_bundle(bundle_path, config.model.backbone_weights)
    model, pre = bundle.model, bundle.preprocessing
    h, w = pre.input_size
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=torch.channels_last).to(pc.device)
    x1 = x[:1].contiguous(memory_format=torch.channels_last)
    cache = engine_cache_dir(pc.engine_cache, bundle_path)
    batched = prepare_backend(model, pc.backend, pc.device, x, cache, bundle.hash, pc.backend_fallback)
    single = prepare_backend(model, pc.backend, pc.device, x1, cache, bundle.hash, pc.backend_fallback)
    # EfficientAD has no backbone: its floor is the teacher PDN, which every frame goes through.
    floor_module = BackboneOnly(model.backbone) if model.backbone is not None else model.floor_module()
    floor = prepare_backend(
        floor_module, pc.backend, pc.device, x, cache, f"{bundle.hash}-backbone", pc.backend_fallback
    )
    floor1 = prepare_backend(
        floor_module, pc.backend, pc.device, x1, cache, f"{bundle.hash}-backbone", pc.backend_fallback
    )
    with torch.inference_mode():
        calls = {"backbone": completed(lambda: floor(x), pc.device), "model": completed(lambda: batched(x), pc.device)}
        rates = interleaved_throughput(calls, batch, seconds / 2)
        backbone, model_fps = rates["backbone"], rates["model"]
        # Batch-1 latency of the model and of its floor, interleaved, for the ratio of the two.
        calls = {"backbone": completed(lambda: floor1(x1), pc.device)}
        calls["model"] = completed(lambda: single(x1), pc.device)
        spent = interleaved_call_seconds(calls, seconds / 4, rounds=20)
        lat, floor_lat = np.asarray(spent["model"]) * 1000.0, np.asarray(spent["backbone"]) * 1000.0
    bank_mb = sum(t.numel() * t.element_size() for t in model.tensors().values()) / 2**20
    with tempfile.TemporaryDirectory(prefix="linewatch-bench-") as tmp:
        folder = data or synthetic_frames(Path(tmp) / "frames", (h, w))
        # The bench's verdicts go to a store of its own, never into the bundle's data folder.
        config = with_overrides(config, {"pipeline.max_batch": batch, "store.path": str(Path(tmp) / "data")})
        full_speed = timed_replay(config, bundle_path, folder, seconds, log_settings=log_settings)
        fps, cpu = full_speed.fps, full_speed.cpu
        store = None
        if store_section:
            store = _store_bench(config, bundle_path, folder, (h, w), fps, seconds, store_url, log_settings)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return BenchResult(
        backbone_fps=backbone,
        model_fps=model_fps,
        pipeline_fps=fps,
        pipeline_efficiency=fps / model_fps if model_fps else 0.0,
        model_ms_p50=float(np.percentile(lat, 50)),
        model_ms_p99=float(np.percentile(lat, 99)),
        backbone_ms_p50=float(np.percentile(floor_lat, 50)),
        bank_mb=bank_mb,
        rss_mb=rss_mb,
        batch=batch,
        pipeline_cpu=cpu,
        store=store,
    )


def _store_bench(
    config: Config,
    bundle: Path,
    folder: Path,
    input_size: tuple[int, int],
    fps: float,
    seconds: float,
    store_url: str | None,
    log_settings: LogSettings | None,
) -> StoreBench:
    data = Path(str(config.store.path))
    data.mkdir(parents=True, exist_ok=True)
    sqlite = recorder_throughput(sqlite_in(data), input_size, seconds / 4)
    postgresql = recorder_throughput(store_url, input_size, seconds / 4) if store_url else None

    rounds = rounds_for(seconds)

    def replay(store_on: bool, rate_ppm: float) -> Replay:
        run_config = with_overrides(config, {"store.enabled": store_on, "ui.enabled": False})  # the store alone
        return timed_replay(run_config, bundle, folder, seconds / (2 * rounds), rate_ppm, log_settings)

    off, on = latency_with_and_without_store(replay, max(fps, 1.0) * 60 / 2, rounds)
    off_e2e, on_e2e = np.concatenate([r.e2e_ms for r in off]), np.concatenate([r.e2e_ms for r in on])
    off_decide, on_decide = np.concatenate([r.decide_ms for r in off]), np.concatenate([r.decide_ms for r in on])
    return StoreBench(
        sqlite,
        postgresql,
        float(np.percentile(off_e2e, 50)),
        float(np.percentile(off_e2e, 99)),
        float(np.percentile(on_e2e, 50)),
        float(np.percentile(on_e2e, 99)),
        float(np.percentile(off_decide, 99)),
        float(np.percentile(on_decide, 99)),
        p99_spread([r.e2e_ms for r in off]),
        *p99_change_interval([r.e2e_ms for r in off], [r.e2e_ms for r in on]),
        len(off),
    )
