"""Pipeline benchmark: streaming throughput against the model's own throughput, and latency under load.

1. Model alone: the bundle's model scoring preprocessed batches of `max_batch` in this process.
2. Pipeline at full speed: a looping folder replay with `block` backpressure (nothing dropped),
   frames per second over `--seconds` after warm-up. Ratio = pipeline fps / model fps.
3. Pipeline at 80 % of that rate, paced like a conveyor: end-to-end latency p50 / p99.

    python tests/bench/pipeline_bench.py --bundle B.pt --data FOLDER_OR_MVTEC [--seconds 30]

Without --bundle it generates a small dataset and calibrates a bundle first (about a minute).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from calibration.datasets import iter_loaded, normal_frames
from edge.bundle import load_bundle
from pipeline.config import Config, SourceConfig, with_overrides
from pipeline.supervisor import Pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_fps(bundle_path: Path, data: Path, batch: int, seconds: float) -> float:
    bundle = load_bundle(bundle_path)
    from calibration.datasets import SkipReport

    frames = [bundle.preprocessing(x.image) for x in iter_loaded(normal_frames(data)[:batch], False, SkipReport())]
    x = torch.from_numpy(np.stack(frames))
    with torch.inference_mode():
        bundle.model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            bundle.model(x)
            n += x.shape[0]
    return n / (time.perf_counter() - start)


def pipeline_run(config: Config, bundle: Path, data: Path, seconds: float, rate_ppm: float) -> dict:
    source = SourceConfig(spec=f"folder:{data}", loop=True, rate_ppm=rate_ppm)
    config = with_overrides(config, {"publisher.address": f"tcp://127.0.0.1:{free_port()}", "metrics.port": 0})
    warm = seconds * 0.2
    stamps: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def on_verdict(rec: np.void) -> None:
        now = time.monotonic()
        if now - t0 > warm:
            stamps.append((now, int(rec["m_decide_ns"]) - int(rec["m_capture_ns"])))

    pipeline = Pipeline(config, bundle, (source,), on_verdict)
    cpu: dict[str, float] = {}

    def sample_cpu() -> None:  # CPU seconds per second of each process over the measured window
        time.sleep(warm + 5.0)  # start-up (model loading) + warm-up
        window = seconds - warm - 7.0
        a = {st.name: _cpu_ticks(st.process.pid) for st in pipeline.stages if st.process is not None}
        a["supervisor"] = _cpu_ticks(os.getpid())
        time.sleep(window)
        for st in pipeline.stages:
            if st.process is not None and st.name in a:
                cpu[st.name] = (_cpu_ticks(st.process.pid) - a[st.name]) / os.sysconf("SC_CLK_TCK") / window
        cpu["supervisor"] = (_cpu_ticks(os.getpid()) - a["supervisor"]) / os.sysconf("SC_CLK_TCK") / window

    threading.Thread(target=sample_cpu, daemon=True).start()
    t0 = time.monotonic()
    summary = pipeline.run(duration_s=seconds, install_signals=False)
    times = np.array([t for t, _ in stamps])
    lat = np.array([v for _, v in stamps]) / 1e6
    return {
        "fps": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "frames": summary.frames,
        "accounted": summary.verdicts + summary.drops,
        "drops": summary.drops,
        "cpu": cpu,
    }


def _cpu_ticks(pid: int | None) -> int:
    """utime + stime of a process, in clock ticks (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()
    from pipeline.config import load_config

    config = load_config(args.config)
    bundle, data = args.bundle, args.data
    if bundle is None or data is None:
        from calibration.calibrate import calibrate
        from calibration.synthetic import generate_mvtec_dataset
        from edge.bundle import save_bundle

        work = Path(tempfile.mkdtemp(prefix="linewatch-bench-"))
        data = generate_mvtec_dataset(work, ("grass",), n_train=100)[0]
        cal_config = with_overrides(
            config, {"calibration.target_fpr": 0.05, "calibration.confidence": 0.9, "calibration.synthetic_per_kind": 0}
        )
        cal = calibrate(cal_config, normal_frames(data))
        bundle = work / "bundle.pt"
        save_bundle(bundle, cal.fit.model, cal.manifest)
    batch = config.pipeline.max_batch
    # Model alone measured before and after the pipeline run: this machine's speed drifts between runs.
    before = model_fps(bundle, data, batch, min(args.seconds, 15.0))
    full = pipeline_run(config, bundle, data, args.seconds, 0.0)
    after = model_fps(bundle, data, batch, min(args.seconds, 15.0))
    alone = (before + after) / 2
    print(f"model alone (batch {batch}): {alone:.1f} frames/s (before {before:.1f}, after {after:.1f})")
    print(
        f"pipeline, full speed: {full['fps']:.1f} frames/s -> ratio {full['fps'] / alone:.2f} "
        f"(frames {full['frames']}, accounted {full['accounted']}, drops {full['drops']})"
    )
    if full["cpu"]:
        infer = sum(v for k, v in full["cpu"].items() if k == "infer")
        rest = sum(v for k, v in full["cpu"].items() if k != "infer")
        print(
            f"  CPU (cores) at full speed: inference {infer:.2f}, all other stages {rest:.2f} "
            f"-> {infer / (infer + rest):.0%} of the pipeline's CPU goes to the model ("
            + ", ".join(f"{k} {v:.2f}" for k, v in full["cpu"].items())
            + ")"
        )
    rate = 0.8 * full["fps"] * 60.0
    paced = pipeline_run(config, bundle, data, args.seconds, rate)
    print(
        f"pipeline at 80% ({rate / 60:.1f} parts/s): {paced['fps']:.1f} frames/s, latency p50 {paced['p50_ms']:.1f} ms,"
        f" p99 {paced['p99_ms']:.1f} ms (frames {paced['frames']}, accounted {paced['accounted']})"
    )


if __name__ == "__main__":
    main()
