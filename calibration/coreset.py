"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

Selection runs on a Johnson-Lindenstrauss random projection of the features (as in the paper), which
keeps the distance ordering approximately while making each step cheaper; the greedy itself is exact
and lazy (see `k_center_greedy`).
"""

from __future__ import annotations

import math

import torch

from calibration.progress import Progress
from edge.scoring import bank_columns, nearest_neighbor, squared_norms


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(N, C) -> (N, dim) with a Gaussian matrix scaled by 1/sqrt(dim); identity when dim >= C."""
    if dim <= 0 or dim >= features.shape[1]:
        return features
    return features @ projection_matrix(features.shape[1], dim, generator, features.dtype)


def projection_matrix(channels: int, dim: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The (channels, dim) Gaussian matrix scaled by 1/sqrt(dim) that both projections draw."""
    return torch.randn(channels, dim, generator=generator, dtype=dtype) / math.sqrt(dim)


def k_center_greedy(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
    block: int = 1024,
    refresh: int = 2,
) -> torch.Tensor:
    """Indices (n_select,) of the greedy k-center subset of `features` (N, C): each step adds the point
    farthest from the current subset. Exact (the same picks as the textbook loop), but lazy.

    The textbook loop updates every point's distance to its nearest centre after every pick: one
    matrix-vector product over all N points per pick, bound by memory bandwidth. Here points live in
    blocks; a block keeps a stale upper bound of its largest min-distance (distances only shrink) and
    the centres it has not seen yet. Only blocks whose bound could hold the farthest point are
    brought up to date, all their pending centres at once: a matrix-matrix product, compute-bound and
    far rarer. When the best up-to-date block beats every stale bound, its farthest point is exactly
    the textbook pick. Measured 2.3x faster than the float16 matvec loop on 102,400 x 128 points.
    Features on a GPU go through `farthest_first_queued` instead, with the same start and projection.
    """
    n = features.shape[0]
    if not 0 < n_select <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {n_select}")
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if features.device.type != "cpu":
            x = _projected_blocks(features, projection_dim, gen, n)
            start = int(torch.randint(n, (1,), generator=gen))  # drawn as below: the same start as on the CPU
            return farthest_first_queued(x, n_select, start, progress).cpu()
        n_blocks = math.ceil(n / block)
        # The projected points are the one (N, d) allocation: written in place, centred in place, padded.
        x = _projected_blocks(features, projection_dim, gen, n_blocks * block)
        current = int(torch.randint(n, (1,), generator=gen))
        padding = n_blocks * block - n
        blocks = x.view(n_blocks, block, -1)
        block_sq = torch.empty(n_blocks, block)
        for b in range(0, n_blocks, 64):  # squared a slice at a time: `blocks * blocks` would copy all of them
            block_sq[b : b + 64] = (blocks[b : b + 64] * blocks[b : b + 64]).sum(dim=-1)
        min_dist = torch.full((n_blocks, block), float("inf"))
        if padding:
            min_dist.view(-1)[n:] = -float("inf")  # padding rows are never picked
        seen = torch.zeros(n_blocks, dtype=torch.long)  # centres applied to each block so far
        bound = torch.full((n_blocks,), float("inf"))  # >= the block's true largest min-distance
        centres = torch.empty(n_select, x.shape[1])
        centre_sq = torch.empty(n_select)
        selected = torch.empty(n_select, dtype=torch.long)
        with Progress("coreset", n_select, enabled=progress) as bar:
            for i in range(n_select):
                selected[i] = current
                centres[i] = x[current]
                centre_sq[i] = (x[current] * x[current]).sum()
                k = i + 1
                while True:
                    top = torch.topk(bound, min(refresh, n_blocks)).indices
                    stale = top[seen[top] < k].tolist()
                    if not stale:  # the best bounds are all exact: the first holds the farthest point
                        best = int(top[0])
                        current = best * block + int(torch.argmax(min_dist[best]))
                        break
                    _bring_up_to_date(blocks, block_sq, min_dist, seen, bound, centres, centre_sq, stale, k)
                bar.update()
    return selected


def farthest_first_queued(x: torch.Tensor, n_select: int, start: int, progress: bool = False) -> torch.Tensor:
    """The textbook greedy loop (indices on `x`'s device) with no host sync inside: for GPUs.

    Each pick is one matrix-vector product, a minimum and an argmax queued behind the last, and the
    picked index stays on the device. The lazy blocks above need the host to choose the blocks at
    every pick; on an H100 that sync cost about 1 ms per pick, 6 s for a 5,120-row bank.
    """
    x_sq = (x * x).sum(dim=1)
    min_dist = torch.full((x.shape[0],), float("inf"), device=x.device)
    selected = torch.empty(n_select, dtype=torch.long, device=x.device)
    selected[0] = start
    with Progress("coreset", n_select, enabled=progress) as bar:
        for i in range(n_select):
            c = x.index_select(0, selected[i : i + 1])[0]
            # |x|^2 - 2 x.c + |c|^2 per point, the same expansion as the lazy blocks use.
            d = torch.addmv(x_sq, x, c, alpha=-2.0).add_((c * c).sum())
            torch.minimum(min_dist, d, out=min_dist)
            if i + 1 < n_select:
                selected[i + 1] = torch.argmax(min_dist)
            bar.update()
    return selected


def _projected_blocks(features: torch.Tensor, dim: int, generator: torch.Generator, rows: int) -> torch.Tensor:
    """(rows, d) float32: the projected, centred features, then copies of the first row as padding.

    Centring leaves distances unchanged and makes norms smaller (less cancellation in |x|^2 - 2x.c).
    Same projection and arithmetic as `random_projection`, without its temporaries: at a million
    patches each (N, d) copy is half a gigabyte.
    """
    n, c = features.shape
    d = c if dim <= 0 or dim >= c else dim
    x = torch.empty(rows, d, device=features.device)
    if d == c:
        x[:n] = features
    else:
        # Drawn on the CPU whatever the device, so a GPU fit projects (and selects) like a CPU one.
        proj = projection_matrix(c, d, generator, torch.float32).to(features.device)
        for start in range(0, n, _PROJECT_ROWS):  # chunks: a float16 bank is converted a slice at a time
            stop = min(start + _PROJECT_ROWS, n)
            torch.matmul(features[start:stop].float(), proj, out=x[start:stop])
    x[:n] -= x[:n].mean(dim=0)
    x[n:] = x[0]
    return x


_PROJECT_ROWS = 65536
# Pending centres applied per matmul when refreshing: bounds the (block x centres) distance block.
_CENTRES_PER_STEP = 2048


def _bring_up_to_date(
    blocks: torch.Tensor,
    block_sq: torch.Tensor,
    min_dist: torch.Tensor,
    seen: torch.Tensor,
    bound: torch.Tensor,
    centres: torch.Tensor,
    centre_sq: torch.Tensor,
    stale: list[int],
    k: int,
) -> None:
    """Apply centres [seen, k) to each `stale` block and refresh its bound.

    One block at a time through views: gathering the stale blocks into one batched matmul copied
    ~1 MB per refresh and took a third of the whole selection.
    """
    for b in stale:
        md = min_dist[b]
        for start in range(int(seen[b]), k, _CENTRES_PER_STEP):
            stop = min(start + _CENTRES_PER_STEP, k)
            # |c|^2 - 2 x.c per (point, centre); |x|^2 is the same along a row, so it is added after the min.
            d = torch.addmm(centre_sq[start:stop], blocks[b], centres[start:stop].t(), alpha=-2.0)
            torch.minimum(md, d.amin(dim=1).add_(block_sq[b]), out=md)
        seen[b] = k
        bound[b] = md.max()


def coverage_radius(features: torch.Tensor, selected: torch.Tensor) -> float:
    """Largest distance from any point to its nearest selected point (what k-center minimises)."""
    bank = features[selected]
    dist, _ = nearest_neighbor(features, bank_columns(bank), squared_norms(bank))
    return float(dist.max())
