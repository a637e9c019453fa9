"""Benchmark: bundles on a CUDA GPU, each arithmetic against the CPU's float32 on the same test set.

    python bench/gpu_bench.py --data CATEGORY BUNDLE [BUNDLE ...] [--device cuda] [--compile] [--rounds 100]

For each bundle it scores the MVTec-layout category's test set at batch 1 with
- `cpu`: the reference, the arithmetic calibration chose the threshold in;
- `float32`: eager on the device with torch's defaults (cuDNN may run convolutions in TF32);
- `float16`: eager, convolutions under fp16 autocast (EfficientAD: the whole model; PatchCore: the backbone,
  with the nearest-neighbour search in float32 as linewatch's TensorRT settings keep it): what TensorRT's
  FP16 engine computes, as a proxy, not the engine;
- `bf16 search` (PatchCore): the bf16 nearest-neighbour search (`search_precision: bfloat16`);
- with --compile, `compile` (torch.compile, the `compile` backend) and `compile graphs` (mode
  "reduce-overhead": the whole call replayed as one CUDA graph);
and prints image and pixel AUROC, the largest image-score difference to the reference, how many test
decisions flip at the bundle's threshold, and each one's batch-1 p50, timed interleaved from a CPU frame
in to CPU scores and map out (what the infer stage does per part).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from calibration.datasets import MVTecCategory, SkipReport
from calibration.evaluate import ScoredSet, metrics_of, score_category
from edge.backbones import FeatureBackbone
from edge.backends import OnDevice
from edge.bundle import Bundle, load_bundle
from edge.models.patchcore import PatchCoreModel
from edge.scoring import Scorer
from pipeline.app.bench import interleaved_batch1_ms


def half_features(backbone: FeatureBackbone, device_type: str) -> None:
    """Make `backbone` compute its feature maps under fp16 autocast and hand them on as float32."""
    padded = backbone.padded

    def fp16_padded(x: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(device_type, dtype=torch.float16):
            return [f.float() for f in padded(x)]

    backbone.padded = fp16_padded  # type: ignore[method-assign]


def variants(bundle: Bundle, device: str, compile_too: bool) -> dict[str, Scorer]:
    model = bundle.model
    out: dict[str, Scorer] = {"cpu": model}
    on_dev = copy.deepcopy(model).to(device).eval()
    out["float32"] = OnDevice(on_dev, device, None)
    if model.backbone is None:
        out["float16"] = OnDevice(on_dev, device, torch.float16)
    else:
        half = copy.deepcopy(model).to(device).eval()
        half_features(half.backbone, torch.device(device).type)
        out["float16"] = OnDevice(half, device, None)
    if isinstance(model, PatchCoreModel):
        split = PatchCoreModel(
            copy.deepcopy(model.backbone),
            model.memory_bank,
            bundle.preprocessing.input_size,
            num_neighbors=model.num_neighbors,
            sigma=model.smoother.sigma,
            search_precision="bfloat16",
        )
        out["bf16 search"] = OnDevice(split.to(device).eval(), device, None)
    if compile_too:
        for name, mode in (("compile", None), ("compile graphs", "reduce-overhead")):
            compiled = torch.compile(copy.deepcopy(model).to(device).eval(), dynamic=False, mode=mode)
            out[name] = OnDevice(compiled, device, None)
    return out


def compared(reference: ScoredSet, other: ScoredSet, threshold: float | None) -> dict[str, float | int | None]:
    score_rel = np.abs(other.scores - reference.scores) / np.abs(reference.scores)
    map_rel = np.abs(other.maps - reference.maps) / np.abs(reference.maps).max(axis=(1, 2), keepdims=True)
    flips = None if threshold is None else int(((other.scores > threshold) != (reference.scores > threshold)).sum())
    return {"score_rel_max": float(score_rel.max()), "map_rel_max": float(map_rel.max()), "flips": flips}


def bench_bundle(path: Path, data: Path, device: str, compile_too: bool, rounds: int) -> list[dict[str, object]]:
    bundle = load_bundle(path)
    name = f"{bundle.manifest.model} ({bundle.manifest.feature_extractor})"
    category = MVTecCategory(data)
    runs: dict[str, Scorer] = {}
    rows: list[dict[str, object]] = []
    scored: dict[str, ScoredSet] = {}
    for label, fn in variants(bundle, device, compile_too).items():
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn(torch.randn(1, 3, *bundle.preprocessing.input_size))  # compile / warm-up, timed apart
            first_s = time.perf_counter() - t0
            scored[label] = score_category(fn, bundle.preprocessing, category, False, SkipReport())
        except Exception as exc:  # report and go on: one arithmetic failing must not hide the others
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            rows.append({"bundle": name, "variant": label, "error": error})
            continue
        runs[label] = fn
        e = metrics_of(scored[label], bundle.threshold)
        row: dict[str, object] = {"bundle": name, "variant": label, "first_call_s": first_s, **e.to_dict()}
        row.update(compared(scored["cpu"], scored[label], bundle.threshold))
        rows.append(row)
    ms = interleaved_batch1_ms(runs, bundle.preprocessing.input_size, rounds)
    for row in rows:
        if row["variant"] in ms:
            row["batch1_ms_p50"] = ms[str(row["variant"])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category with a test set")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile and CUDA graphs")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write every row to this file")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for path in args.bundles:
        rows += bench_bundle(path, args.data, args.device, args.compile, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{'bundle':34s} {'variant':15s} {'AUROC':>6s} {'pix AUROC':>9s} {'max dscore':>10s} {'flips':>5s}", end="")
    print(f" {'p50 ms':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['bundle']:34s} {r['variant']:15s} failed: {r['error']}")
            continue
        au, pa = r["image_auroc"], r["pixel_auroc"]
        print(
            f"{r['bundle']:34s} {r['variant']:15s} {au if au is None else f'{au:.4f}':>6} "
            f"{pa if pa is None else f'{pa:.4f}':>9} {r['score_rel_max']:10.1e} {r['flips']!s:>5} "
            f"{r.get('batch1_ms_p50', float('nan')):7.2f}"
        )


if __name__ == "__main__":
    main()
