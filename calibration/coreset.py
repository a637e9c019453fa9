"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

Selection runs on a Johnson-Lindenstrauss random projection of the features (as in the paper), which
keeps the distance ordering approximately while making each iteration cheaper.
"""

from __future__ import annotations

import math

import torch

from calibration.progress import Progress
from edge.scoring import nearest_neighbor, squared_norms


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(N, C) -> (N, dim) with a Gaussian matrix scaled by 1/sqrt(dim); identity when dim >= C."""
    if dim <= 0 or dim >= features.shape[1]:
        return features
    proj = torch.randn(features.shape[1], dim, generator=generator, dtype=features.dtype) / math.sqrt(dim)
    return features @ proj


def k_center_greedy(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Indices (n_select,) of a greedy k-center subset of `features` (N, C).

    Each step adds the point farthest from the current subset; min_dist[i] is the squared distance from
    point i to its nearest selected point and is updated in place with one matvec per step.
    """
    n = features.shape[0]
    if not 0 < n_select <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {n_select}")
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        x = random_projection(features.float(), projection_dim, gen)
        x = (x - x.mean(dim=0)).contiguous()  # distances are unchanged; smaller norms, less cancellation
        sq = (x * x).sum(dim=1)
        # The matvec over all points is the whole cost and is memory-bound: half-precision storage halves
        # the bytes read (and fits 100k x 128 points in L3); norms and min distances stay float32.
        x_half = x.half()
        min_dist = torch.full((n,), float("inf"))
        selected = torch.empty(n_select, dtype=torch.long)
        current = int(torch.randint(n, (1,), generator=gen))
        with Progress("coreset", n_select, enabled=progress) as bar:
            for i in range(n_select):
                selected[i] = current
                # |x - c|^2 = |x|^2 - 2 x.c + |c|^2
                dist = torch.mv(x_half, x_half[current]).float().mul_(-2.0).add_(sq).add_(sq[current])
                torch.minimum(min_dist, dist, out=min_dist)
                current = int(torch.argmax(min_dist))
                bar.update()
    return selected


def coverage_radius(features: torch.Tensor, selected: torch.Tensor) -> float:
    """Largest distance from any point to its nearest selected point (what k-center minimises)."""
    bank = features[selected]
    dist, _ = nearest_neighbor(features, bank, squared_norms(bank))
    return float(dist.max())
