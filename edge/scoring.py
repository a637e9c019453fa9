"""Scoring pieces shared by the models: patch embeddings, nearest neighbours, anomaly-map smoothing.

Everything here is plain tensor code with static control flow so `torch.export` (and TensorRT through
it) sees the same graph as eager mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from edge.backbones import FeatureBackbone

# Elements of one (queries x bank-chunk) distance block: 2^22 floats = 16 MiB whatever the bank size;
# measured 1.45x faster at batch 1 than 64 MiB blocks on the 2-core dev box (the block stays in cache).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


class ScoreResult(NamedTuple):
    """Output of every model: image scores (N,) and anomaly maps (N, H, W) at the input resolution."""

    scores: torch.Tensor
    maps: torch.Tensor


# Anything that scores a batch of normalised frames: a model, a prepared backend, a model on a GPU.
Scorer = Callable[[torch.Tensor], ScoreResult]


def concat_feature_maps(features: list[torch.Tensor], pool: bool, pool_zeros: bool = False) -> torch.Tensor:
    """Upsample every map to the first (finest) one's size and concatenate channels: (N, sum C, h, w).

    With `pool`, each map is first 3x3 average-pooled (stride 1): PatchCore's "locally aware" patch
    features, which aggregate a neighbourhood without losing resolution. `pool_zeros`: the window
    counts the cells beyond the map's edge as zeros (see FeatureBackbone's "zeros" border); otherwise
    an edge cell averages the cells inside only.
    """
    size = features[0].shape[-2:]
    out = []
    for f in features:
        if pool:
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=pool_zeros)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def patch_features(backbone: FeatureBackbone, x: torch.Tensor, pool: bool) -> torch.Tensor:
    """`concat_feature_maps` of the backbone's maps of the padded frame, border cells cropped last.

    Pooling and upsampling before the crop means the frame's edge cells see real neighbours
    (from the padding) rather than a truncated window.
    """
    maps = concat_feature_maps(backbone.padded(x), pool, backbone.pools_zeros)
    return backbone.crop(maps, backbone.strides[0])


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1)


def bank_columns(bank: torch.Tensor) -> torch.Tensor:
    """The bank (M, C) as contiguous columns (C, M), the layout the float32 searches take.

    sgemm reads contiguous columns faster than the bank's rows through a transposed view (about a quarter
    less time to re-search 16 patches over 10,240 rows on a CPU).
    """
    return bank.t().contiguous()


def ranking_distance_chunks(
    queries: torch.Tensor, columns: torch.Tensor, bank_sq: torch.Tensor, rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, r) per chunk of `rows` bank rows, r (Q, rows) = |b|^2 - 2 q.b = ||q - b||^2 - |q|^2.

    `columns` (C, M) is the bank from `bank_columns`. |q|^2 is the same along a row, so ranking bank
    rows needs only r; callers add |q|^2 to the few distances they keep instead of to the whole
    (Q x rows) block. A matmul instead of cdist: exports to TensorRT and runs on BLAS; chunking bounds
    peak memory.
    """
    for start in range(0, columns.shape[1], rows):
        chunk = columns[:, start : start + rows]
        yield start, torch.addmm(bank_sq[start : start + rows].unsqueeze(0), queries, chunk, alpha=-2.0)


def _chunk_rows(n_queries: int, n_bank: int, chunk_elements: int) -> int:
    return max(1, min(n_bank, chunk_elements // max(n_queries, 1)))


def nearest_neighbor(
    queries: torch.Tensor, columns: torch.Tensor, bank_sq: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance and index of each query's nearest bank row.

    queries (Q, C), columns (C, M) = `bank_columns(bank)`, bank_sq (M,) = |bank|^2 -> (Q,), (Q,). Peak
    memory is bounded by `chunk_elements` floats whatever the bank size.
    """
    rows = _chunk_rows(queries.shape[0], columns.shape[1], chunk_elements)
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start, r in ranking_distance_chunks(queries, columns, bank_sq, rows):
        d_min, i_min = r.min(dim=1)
        i_min = i_min + start
        if best_d is None or best_i is None:
            best_d, best_i = d_min, i_min
        else:
            better = d_min < best_d
            best_d = torch.where(better, d_min, best_d)
            best_i = torch.where(better, i_min, best_i)
    assert best_d is not None and best_i is not None
    return (best_d + squared_norms(queries)).clamp_min(0).sqrt(), best_i


def k_nearest(
    queries: torch.Tensor,
    columns: torch.Tensor,
    bank_sq: torch.Tensor,
    k: int,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Indices (Q, k) of each query's k nearest bank rows, ascending by distance; chunked like above."""
    rows = max(k, _chunk_rows(queries.shape[0], columns.shape[1], chunk_elements))
    best_r: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start, r in ranking_distance_chunks(queries, columns, bank_sq, rows):
        r_k, i_k = r.topk(min(k, r.shape[1]), dim=1, largest=False)
        i_k = i_k + start
        if best_r is not None and best_i is not None:  # merge with the best so far: a (Q, 2k) problem
            r_k, i_k = torch.cat([best_r, r_k], dim=1), torch.cat([best_i, i_k], dim=1)
            r_k, pos = r_k.topk(min(k, r_k.shape[1]), dim=1, largest=False)
            i_k = i_k.gather(1, pos)
        best_r, best_i = r_k, i_k
    assert best_i is not None
    return best_i


# Bank rows per block of the bf16 search: small enough that a block's distances stay in L2 (2 MB a core on
# AMX CPUs) until `amin` reads them back; larger blocks were up to half again slower.
BFLOAT16_SEARCH_ROWS = 512


def _split_bfloat16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ hi + lo, both bfloat16: 16 significant bits together instead of bf16's 8."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _bfloat16_parts(x: torch.Tensor, centre: torch.Tensor) -> list[torch.Tensor]:
    """[v, |v|^2_hi, |v|^2_lo, ones (N, 2)], all bfloat16, with v = x - centre rounded to bfloat16.

    The norms are those of the rounded v, split into two bf16 halves, so that the matmul of
    `bfloat16_sq_distance` gives the distance between the rounded points without cancellation error.
    """
    v = (x - centre).to(torch.bfloat16)
    sq_hi, sq_lo = _split_bfloat16(squared_norms(v.float()))
    ones = torch.ones(x.shape[0], 2, dtype=torch.bfloat16, device=x.device)
    return [v, sq_hi.unsqueeze(1), sq_lo.unsqueeze(1), ones]


def bfloat16_bank_operand(bank: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Bank operand (M, C + 4) of `bfloat16_sq_distance`; pairs with `bfloat16_query_operand`.

    With b = bf16(bank - centre) (centring shrinks the norms, and so the rounding), the columns are
    [-2b, |b|^2_hi, |b|^2_lo, 1, 1]. Scaling by -2 is exact in bf16.
    """
    b, sq_hi, sq_lo, ones = _bfloat16_parts(bank, centre)
    return torch.cat([-2 * b, sq_hi, sq_lo, ones], dim=1).contiguous()


def bfloat16_query_operand(queries: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Query operand (Q, C + 4): [q, 1, 1, |q|^2_hi, |q|^2_lo] with q = bf16(queries - centre)."""
    q, sq_hi, sq_lo, ones = _bfloat16_parts(queries, centre)
    return torch.cat([q, ones, sq_hi, sq_lo], dim=1)


def bfloat16_sq_distance(
    query_op: torch.Tensor, bank_op: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> torch.Tensor:
    """Squared distance (Q,) from each query to its nearest bank row, both rounded to bf16 (not exact).

    One bf16 matmul of the two operands gives |q|^2 + |b|^2 - 2 q.b for the rounded points: each
    product of two bf16 numbers is exact in the fp32 accumulator, and the output, rounded to bf16, is
    the distance itself rather than a difference of large terms (~2.5e-3 relative on Lite0 features).
    Only the minimum value is reduced, never its index: on the CPU `amin` is 2.5x faster than `min`
    with indices and 5x faster than `topk`. Blocks of BFLOAT16_SEARCH_ROWS bank rows, fewer if
    `chunk_elements` (the memory bound) asks for it.
    """
    rows = min(BFLOAT16_SEARCH_ROWS, _chunk_rows(query_op.shape[0], bank_op.shape[0], chunk_elements))
    as_int = query_op.device.type == "cpu"
    best: torch.Tensor | None = None
    for start in range(0, bank_op.shape[0], rows):
        d = torch.matmul(query_op, bank_op[start : start + rows].t())
        if as_int:
            # The CPU reduces int16 4x faster than bf16. A non-negative bf16 orders like its bits read
            # as int16; a negative one (rounding, true distance ~0) reads as a negative int16, so the
            # minimum is then negative too, and the clamp below makes it 0 either way.
            d = d.view(torch.int16)
        d = d.amin(dim=1)
        best = d if best is None else torch.minimum(best, d)
    assert best is not None
    if as_int:
        best = best.view(torch.bfloat16)
    return best.float().clamp_min(0)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius 4 sigma (truncation error < 1e-4)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_operator(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix of a 1-D convolution with `kernel` over n samples with replicate borders."""
    r = kernel.numel() // 2
    impulses = torch.eye(n, device=kernel.device).unsqueeze(1)  # row j: a unit impulse at sample j
    return F.conv1d(F.pad(impulses, (r, r), mode="replicate"), kernel.view(1, 1, -1)).squeeze(1).t()


# How a score grid is brought to the frame's size before the blur. "linear": bilinear, as in the PatchCore,
# PaDiM and EfficientAD papers; at 8 px per cell it adds a spread of its own (sigma 4 becomes 5.2 px in
# all). "cubic": bicubic (Keys, a = -0.75, as torch's), whose negative lobes add none (3.4 px in all).
UPSAMPLINGS = ("linear", "cubic")


class AnomalyMapSmoother(nn.Module):
    """Score grid (N, h, w) -> anomaly map (N, H, W): replicate-pad by `border` cells, upsample (`upsampling`,
    bilinear or bicubic), then a separable Gaussian blur (replicate borders).

    Every step is linear and acts on rows and columns separately, so the map is A_h @ grid @ A_w^T, each
    A the blur matrix (a buffer: it depends only on the output size) times the upsampling matrix of the
    grid's size. Two small matmuls replace a full-resolution upsample and two 33-tap convolutions over
    one channel, which took 0.9 ms per 256 px map on the dev CPU (4 ms for two). The buffers travel with
    the model and are constants in exported graphs. Given the `grid_size` the model's grids will have,
    the two A are built once here rather than per call (0.085 of the 0.125 ms a 32x32 -> 256x256 map took).
    """

    def __init__(
        self,
        output_size: tuple[int, int],
        sigma: float = 4.0,
        border: int = 0,
        grid_size: tuple[int, int] | None = None,
        upsampling: str = "linear",
    ) -> None:
        super().__init__()
        if upsampling not in UPSAMPLINGS:
            raise ValueError(f"map upsampling {upsampling!r}: expected one of {', '.join(UPSAMPLINGS)}")
        self.output_size = output_size
        self.sigma = sigma
        self.border = border
        self.upsampling_mode = upsampling
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("blur_rows", blur_operator(output_size[0], kernel), persistent=False)
        self.register_buffer("blur_cols", blur_operator(output_size[1], kernel), persistent=False)
        self.grid_size = grid_size
        if grid_size is not None:
            rows, cols = self.operators(grid_size)
            self.register_buffer("grid_rows", rows, persistent=False)
            self.register_buffer("grid_cols", cols, persistent=False)

    def upsampling(self, n_in: int, n_out: int) -> torch.Tensor:
        """(n_out, n_in) matrix of the replicate padding and the upsampling along one axis."""
        impulses = torch.eye(n_in, device=self.blur_rows.device).unsqueeze(1)
        if self.border:
            impulses = F.pad(impulses, (self.border, self.border), mode="replicate")
        if self.upsampling_mode == "linear":
            return F.interpolate(impulses, size=n_out, mode="linear", align_corners=False).squeeze(1).t()
        # torch's bicubic is separable: its 1-D operator is a 2-D bicubic over rows of height 1.
        cubic = F.interpolate(impulses.unsqueeze(2), size=(1, n_out), mode="bicubic", align_corners=False)
        return cubic.view(n_in, n_out).t()

    def operators(self, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_h, A_w) for grids of `grid_size`: blur times upsampling, (H, h) and (W, w)."""
        h, w = self.output_size
        return self.blur_rows @ self.upsampling(grid_size[0], h), self.blur_cols @ self.upsampling(grid_size[1], w)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        if self.grid_size == tuple(grid.shape[-2:]):
            rows, cols = self.grid_rows, self.grid_cols
        else:
            rows, cols = self.operators((grid.shape[-2], grid.shape[-1]))
        return torch.matmul(torch.matmul(rows, grid.float()), cols.t())
