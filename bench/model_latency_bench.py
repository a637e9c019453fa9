"""Benchmark: batch-1 latency of several bundles on this box, interleaved in one run.

    python bench/model_latency_bench.py BUNDLE [BUNDLE ...] [--rounds 40] [--backend torch]

Prints each bundle's model, input size and batch-1 p50, and its ratio to the first bundle's. Used to
report EfficientAD's CPU latency against PatchCore's in the same run (docs/efficientad.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from edge.backends import prepare_backend
from edge.bundle import load_bundle
from pipeline.app.bench import interleaved_batch1_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    bundles = [load_bundle(p) for p in args.bundles]
    sizes = {b.preprocessing.input_size for b in bundles}
    if len(sizes) != 1:
        raise SystemExit(f"bundles have different input sizes {sorted(sizes)}: compare like with like")
    size = sizes.pop()
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p, b in zip(args.bundles, bundles, strict=True):
            x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last)
            models[str(p)] = prepare_backend(b.model, args.backend, args.device, x, Path(tmp), b.hash)
        ms = interleaved_batch1_ms(models, size, args.rounds)
    first = ms[str(args.bundles[0])]
    for p, b in zip(args.bundles, bundles, strict=True):
        name = f"{b.manifest.model} ({b.manifest.feature_extractor})"
        print(f"{name:<36} {size[0]}x{size[1]}  batch-1 p50 {ms[str(p)]:7.1f} ms  = {ms[str(p)] / first:.2f} x first")


if __name__ == "__main__":
    main()
