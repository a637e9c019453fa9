"""Pipeline benchmark: streaming throughput against the model's own, and latency at 80 % load.

1. Model alone: the bundle's model on batches of `pipeline.max_batch`, before, between and after the
   runs of step 2 (a box's speed drifts; each run is compared with the mean of its neighbours).
2. Pipeline at full speed, `--rounds` times: a looping folder replay with `block` backpressure;
   ratio = pipeline / model, plus the CPU each process used (drift-free evidence of where the time goes).
3. Pipeline paced at 80 % of that rate, like a conveyor, `--rounds` times: end-to-end latency p50 / p99,
   each run's p99 against the model's own batch-1 p99 measured before and after it. With
   `--load-of batch1`, at 80 % of the model's batch-1 rate instead (parts passing one at a time).
   With `--rate R`, at R parts/s in every run, so that runs of different days or settings compare.
   Beside each paced run, the same parts on the same schedule through a one-process loop (the model
   at batch 1, no stages: what a line engineer's own loop would do), so the box's own stalls and the
   queueing behind them can be told apart from what the pipeline adds. The two take turns going
   first, and the rounds are also pooled: one slow spell of a noisy box moves a single round's p99.

    python bench/pipeline_bench.py --bundle B.pt --data FOLDER_OR_MVTEC [--seconds 30]
        [--load-of batch1] [--rate R]

Without --bundle it generates a small dataset and calibrates a bundle first (about a minute).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from calibration.datasets import normal_frames
from edge.backends import check_backend, engine_cache_dir, prepare_backend
from edge.bundle import load_bundle
from pipeline.app.bench import completed, latencies_ms, paced_loop_latencies_ms, throughput, timed_replay
from pipeline.app.config import load_config, with_overrides


def _join(values: list[float], digits: int = 1) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3, help="pipeline runs at full speed, each between model runs")
    parser.add_argument("--config", type=Path)
    parser.add_argument(
        "--load-of",
        choices=("pipeline", "batch1"),
        default="pipeline",
        help="the paced runs go at 80%% of: the full-speed pipeline's rate (frames batched), or the model's "
        "batch-1 rate (parts passing one at a time)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="parts/s for the paced runs, instead of 80%% of a rate measured first (which differs from run to run)",
    )
    args = parser.parse_args()
    if args.rate is not None and args.rate <= 0:
        parser.error(f"--rate must be a positive number of parts/s, got {args.rate}")
    config = load_config(args.config)
    pc = config.pipeline
    check_backend(pc.backend, pc.device, pc.backend_fallback)  # before a bundle is calibrated or loaded
    bundle_path, data = args.bundle, args.data
    if bundle_path is None or data is None:
        from calibration.calibrate import calibrate
        from calibration.synthetic import generate_mvtec_dataset
        from edge.bundle import save_bundle

        work = Path(tempfile.mkdtemp(prefix="linewatch-bench-"))
        data = generate_mvtec_dataset(work, ("grass",), n_train=100)[0]
        overrides = {"calibration.target_fpr": 0.05, "calibration.confidence": 0.9, "calibration.synthetic_per_kind": 0}
        cal = calibrate(with_overrides(config, overrides), normal_frames(data))
        bundle_path = work / "bundle.pt"
        save_bundle(bundle_path, cal.fit.model, cal.manifest)
    bundle = load_bundle(bundle_path, config.model.backbone_weights)
    h, w = bundle.preprocessing.input_size
    batch = pc.max_batch
    # The model alone runs as the infer stage runs it: on pipeline.device, through pipeline.backend.
    x = torch.randn(batch, 3, h, w).contiguous(memory_format=torch.channels_last).to(pc.device)
    x1 = x[:1].contiguous(memory_format=torch.channels_last)
    cache = engine_cache_dir(pc.engine_cache, bundle_path)
    batched, single = (
        prepare_backend(bundle.model, pc.backend, pc.device, ex, cache, bundle.hash, pc.backend_fallback)
        for ex in (x, x1)
    )
    model_batched = completed(lambda: batched(x), pc.device)
    model_single = completed(lambda: single(x1), pc.device)

    def model_alone() -> float:
        with torch.inference_mode():
            return throughput(model_batched, batch, min(args.seconds / 2, 10.0))

    # Model and pipeline alternate, each pipeline run between two model runs: a box's speed drifts by
    # 10-20 % within a minute, so a ratio is only taken between neighbours; the median ratio is reported.
    alone = [model_alone()]
    ratios, fps_runs = [], []
    cpu: dict[str, float] = {}
    for _ in range(args.rounds):
        full_speed = timed_replay(config, bundle_path, data, args.seconds)
        fps, cpu = full_speed.fps, full_speed.cpu
        alone.append(model_alone())
        fps_runs.append(fps)
        ratios.append(fps / ((alone[-2] + alone[-1]) / 2))
    fps = float(np.median(fps_runs))
    print(f"model alone (batch {batch}), before/between/after the pipeline runs: {_join(alone)} frames/s")
    print(f"pipeline, full speed: {_join(fps_runs)} frames/s")
    print(f"  pipeline / model (neighbouring runs): {_join(ratios, 2)} -> median {np.median(ratios):.2f}")
    if cpu:
        infer = cpu.get("infer", 0.0)
        rest = sum(v for k, v in cpu.items() if k != "infer")
        print(
            f"  CPU cores: inference {infer:.2f}, all other stages {rest:.2f} -> {infer / (infer + rest):.0%} to the "
            "model (" + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + ")"
        )

    def model_batch1_ms() -> tuple[float, float]:
        """Batch-1 p50 and p99 of the model alone, back to back: the p99 is the target's reference."""
        with torch.inference_mode():
            lat = latencies_ms(model_single, min(args.seconds, 10.0))
        return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))

    first_p50, first_p99 = model_batch1_ms()
    # At batch 2 a frame costs less than alone, so 80 % of the batched rate can be ~100 % of what the
    # model does one part at a time: parts then wait for a partner. "batch1" paces below that.
    if args.rate is not None:
        rate = args.rate * 60.0
    else:
        rate = 0.8 * (fps if args.load_of == "pipeline" else 1000.0 / first_p50) * 60.0

    # As above: each paced pipeline run sits between two measurements of the model's batch-1 p99.
    reference = [first_p99]
    p99_ratios, loop_ratios, own_ratios, lines, loop_lines = [], [], [], [], []
    pooled: list[np.ndarray] = []
    pooled_loop: list[np.ndarray] = []
    for i in range(args.rounds):
        loop_first = i % 2 == 1  # whichever runs second may meet a box that has drifted
        if loop_first:
            loop, backlog_s = _paced_loop(model_single, rate, args.seconds)
        paced = timed_replay(config, bundle_path, data, args.seconds, rate)
        paced_fps, lat = paced.fps, paced.e2e_ms
        if not loop_first:
            loop, backlog_s = _paced_loop(model_single, rate, args.seconds)
        reference.append(model_batch1_ms()[1])
        pooled.append(lat)
        pooled_loop.append(loop)
        p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        loop_p99 = float(np.percentile(loop, 99))
        model_p99 = (reference[-2] + reference[-1]) / 2
        p99_ratios.append(p99 / model_p99)
        loop_ratios.append(loop_p99 / model_p99)
        own_ratios.append(p99 / loop_p99)
        lines.append(f"{paced_fps:.1f} frames/s, end-to-end p50 {p50:.1f} / p99 {p99:.1f} ms")
        loop_lines.append(f"p50 {np.percentile(loop, 50):.1f} / p99 {loop_p99:.1f} ms")
        if loop_first:
            loop_lines[-1] += " (ran first)"
        if backlog_s > 0.05 * args.seconds:
            loop_lines[-1] += f" (could not keep up with this rate: {backlog_s:.1f} s of parts still queued at the end)"
    if args.rate is not None:
        paced = f"at {rate / 60:.1f} parts/s (--rate)"
    else:
        basis = (
            "the full-speed pipeline"
            if args.load_of == "pipeline"
            else f"the model's batch-1 rate (p50 {first_p50:.1f} ms)"
        )
        paced = f"at 80% of {basis} ({rate / 60:.1f} parts/s)"
    print(f"pipeline {paced}: " + "; ".join(lines))
    print(f"  model's own batch-1 p99, back to back, before/between/after: {_join(reference)} ms")
    print(f"  end-to-end p99 / model p99 (neighbours): {_join(p99_ratios, 2)} -> median {np.median(p99_ratios):.2f}")
    print("  one-process loop on the same schedule, beside each run: " + "; ".join(loop_lines))
    print(f"  loop p99 / model p99 (neighbours): {_join(loop_ratios, 2)} -> median {np.median(loop_ratios):.2f}")
    print(f"  pipeline p99 / loop p99 (same round): {_join(own_ratios, 2)} -> median {np.median(own_ratios):.2f}")
    model_p99 = float(np.mean(reference))
    all_p99 = float(np.percentile(np.concatenate(pooled), 99))
    all_loop_p99 = float(np.percentile(np.concatenate(pooled_loop), 99))
    print(
        f"  all rounds pooled: end-to-end p99 {all_p99:.1f} ms, loop p99 {all_loop_p99:.1f} ms, model p99 (mean) "
        f"{model_p99:.1f} ms -> pipeline / model {all_p99 / model_p99:.2f}, loop / model {all_loop_p99 / model_p99:.2f}"
    )


def _paced_loop(model_single: Callable[[], object], rate_ppm: float, seconds: float) -> tuple[np.ndarray, float]:
    """The one-process loop on the paced runs' schedule; returns its latencies and the backlog it ended with."""
    with torch.inference_mode():
        started = time.perf_counter()
        loop = paced_loop_latencies_ms(model_single, 60.0 / rate_ppm, seconds)
    # The loop serves every part due within `seconds`; time past that is the backlog it was left with.
    return loop, time.perf_counter() - started - seconds


if __name__ == "__main__":
    main()
