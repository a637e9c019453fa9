"""Benchmark: linewatch's k-center coreset vs the plain float32 greedy loop, same features, same run.

    python bench/coreset_bench.py [--images 40] [--ratio 0.1]

Features are real Lite0 patch embeddings of generated brick tiles (needs the demo extra). Prints both
times, their ratio and both coverage radii (the quantity k-center minimises; lower is better).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from calibration.coreset import coverage_radius, k_center_greedy, random_projection
from calibration.datasets import SkipReport, normal_frames
from calibration.fit import preprocess_samples
from calibration.synthetic import generate_mvtec_dataset
from edge.backbones import get_spec, load_backbone
from edge.models.patchcore import patchcore_embedding


def reference_k_center(features: torch.Tensor, n_select: int, projection_dim: int, seed: int) -> torch.Tensor:
    """The straightforward vectorised loop: float32 projected features, one matvec per pick."""
    gen = torch.Generator().manual_seed(seed)
    x = random_projection(features.float(), projection_dim, gen).contiguous()
    min_dist = torch.full((x.shape[0],), float("inf"))
    selected = torch.empty(n_select, dtype=torch.long)
    current = int(torch.randint(x.shape[0], (1,), generator=gen))
    for i in range(n_select):
        selected[i] = current
        min_dist = torch.minimum(min_dist, ((x - x[current]) ** 2).sum(dim=1))
        current = int(torch.argmax(min_dist))
    return selected


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        category = generate_mvtec_dataset(tmp, ("brick",), n_train=args.images, n_test_good=0, n_test_per_defect=0)[0]
        pre = get_spec("efficientnet_lite0").preprocessing(256)
        images = preprocess_samples(normal_frames(category), pre, False, SkipReport())
    backbone = load_backbone("efficientnet_lite0").module
    with torch.inference_mode():
        emb = torch.cat([patchcore_embedding(backbone, images[i : i + 8]) for i in range(0, len(images), 8)])
    features = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    n_select = round(args.ratio * features.shape[0])
    print(f"features {tuple(features.shape)}, selecting {n_select}")
    t0 = time.perf_counter()
    ref = reference_k_center(features, n_select, 128, 0)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = k_center_greedy(features, n_select, 128, 0)
    t_ours = time.perf_counter() - t0
    r_ref, r_ours = coverage_radius(features, ref), coverage_radius(features, ours)
    print(f"reference float32 loop: {t_ref:7.2f} s   coverage radius {r_ref:.3f}")
    print(f"linewatch k_center:     {t_ours:7.2f} s   coverage radius {r_ours:.3f}")
    print(f"speed-up {t_ref / t_ours:.1f}x, radius ratio ours/reference {r_ours / r_ref:.3f}")


if __name__ == "__main__":
    main()
