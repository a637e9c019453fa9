"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Scoring only: a plain `nn.Module` holding the backbone and the memory bank M. Fitting (feature
extraction + coreset) lives in `calibration.fit`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edge.backbones import FeatureBackbone
from edge.precision import bfloat16_on, resolve_precision
from edge.scoring import (
    DEFAULT_CHUNK_ELEMENTS,
    AnomalyMapSmoother,
    ScoreResult,
    bank_columns,
    bfloat16_bank_operand,
    bfloat16_query_operand,
    bfloat16_sq_distance,
    k_nearest,
    nearest_neighbor,
    patch_features,
    squared_norms,
)

# Patches per image whose nearest neighbour is searched again exactly in float32 after the bf16 search.
# The image score is the largest of them, so it is the float32 score unless more than this many patches
# lie within the bf16 search's error (~2.5e-3) of the true maximum.
RERANK_PATCHES = 16


def patchcore_embedding(backbone: FeatureBackbone, x: torch.Tensor) -> torch.Tensor:
    """Locally aware patch features (N, C, h, w): 3x3-pooled backbone maps, upsampled and concatenated."""
    return patch_features(backbone, x, pool=True)


class PatchCoreModel(nn.Module):
    """Image score and anomaly map from nearest-neighbour distances to a memory bank of patch features.

    forward: x (N, 3, H, W) normalised -> ScoreResult(scores (N,), maps (N, H, W)).

    `search_precision` "float32" searches exactly. "bfloat16" finds every patch's distance with one
    bf16 matmul between bf16-rounded features (`bfloat16_sq_distance`, ~2.5e-3 relative on Lite0's
    features) and then searches the RERANK_PATCHES highest patches of each image exactly, so image
    scores (what the threshold is calibrated on) stay the float32 ones on every box; only the rest of
    the map carries the small error.
    "auto" picks bfloat16 on CPUs that multiply it natively, and float32 on CUDA (where TF32 or
    TensorRT's FP16 do reduced-precision matmuls their own way). The configured value is what the
    bundle records; `search` is what it resolved to on this machine's CPU.
    """

    name = "patchcore"

    def __init__(
        self,
        backbone: FeatureBackbone,
        memory_bank: torch.Tensor,
        input_size: tuple[int, int],
        num_neighbors: int = 9,
        sigma: float = 4.0,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        search_precision: str = "auto",
        bank_neighbors: torch.Tensor | None = None,
        map_upsampling: str = "cubic",
    ) -> None:
        super().__init__()
        if memory_bank.ndim != 2 or memory_bank.shape[0] == 0:
            raise ValueError("memory bank is empty: fit the model first")
        if memory_bank.shape[1] != sum(backbone.channels):
            raise ValueError(
                f"memory bank has {memory_bank.shape[1]} features per patch, backbone gives {sum(backbone.channels)}"
            )
        self.backbone = backbone
        self.num_neighbors = num_neighbors
        self.chunk_elements = chunk_elements
        self.register_buffer("memory_bank", memory_bank.float().contiguous())  # M in the paper
        self.register_buffer("bank_sq", squared_norms(self.memory_bank), persistent=False)
        self.register_buffer("bank_cols", bank_columns(self.memory_bank), persistent=False)
        # N_b(m) of every bank row m, nearest first (m itself), for the reweighting: a table lookup per
        # image instead of a search of the bank (0.2 ms at batch 1 on 10,240 rows). It is fitted with
        # the bank and kept in the bundle (0.55 s for 10,240 rows, growing with their square); bundles
        # from before it existed get it computed here.
        k = min(num_neighbors, self.memory_bank.shape[0])
        if bank_neighbors is None:
            with torch.no_grad():
                bank_neighbors = k_nearest(self.memory_bank, self.bank_cols, self.bank_sq, k, chunk_elements)
        elif tuple(bank_neighbors.shape) != (self.memory_bank.shape[0], k):
            raise ValueError(
                f"bank_neighbors has shape {tuple(bank_neighbors.shape)}, expected ({self.memory_bank.shape[0]}, {k})"
            )
        self.register_buffer("bank_neighbors", bank_neighbors.long().clone())
        self.search = resolve_precision(search_precision, "search_precision")
        self.search_precision = search_precision
        if self.search == "bfloat16":  # derived operands: not part of the bundle
            centre = self.memory_bank.mean(dim=0)
            self.register_buffer("bank_centre", centre, persistent=False)
            self.register_buffer("bank_op", bfloat16_bank_operand(self.memory_bank, centre), persistent=False)
        # Bicubic: bilinear adds a spread of its own before the blur, which costs pixel AUROC and PRO. Image
        # scores do not depend on it; bundles record it, and older ones stay bilinear.
        self.smoother = AnomalyMapSmoother(
            input_size, sigma, grid_size=backbone.grid_size(input_size), upsampling=map_upsampling
        )

    def forward(self, x: torch.Tensor) -> ScoreResult:
        return self.score_embedding(patchcore_embedding(self.backbone, x))

    def score_embedding(self, emb: torch.Tensor) -> ScoreResult:
        """Scores and maps from patch features (N, C, h, w) already computed by `patchcore_embedding`."""
        n, c, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if not self._bfloat16_search_on(emb.device):
            dist, nn_idx = nearest_neighbor(patches, self.bank_cols, self.bank_sq, self.chunk_elements)
            patch_scores = dist.view(n, h * w)
            s_star, p_star = patch_scores.max(dim=1)
            m_star_idx = nn_idx.view(n, h * w).gather(1, p_star.unsqueeze(1)).squeeze(1)
        else:
            patch_scores, s_star, p_star, m_star_idx = self._bfloat16_search(patches, n)
        m_test = patches.view(n, h * w, c).gather(1, p_star.view(-1, 1, 1).expand(-1, 1, c)).squeeze(1)
        scores = self.reweighted_scores(m_test, s_star, m_star_idx)
        return ScoreResult(scores, self.smoother(patch_scores.view(n, h, w)))

    def _bfloat16_search_on(self, device: torch.device) -> bool:
        return bfloat16_on(self.search_precision, self.search, device)

    def _bfloat16_search(
        self, patches: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch scores (N, P), and s*, its patch and its nearest bank row (N,) each, exact for the top patches."""
        query_op = bfloat16_query_operand(patches, self.bank_centre)
        approx = bfloat16_sq_distance(query_op, self.bank_op, self.chunk_elements).sqrt().view(n, -1)
        p, c = approx.shape[1], patches.shape[1]
        top = approx.topk(min(RERANK_PATCHES, p), dim=1).indices  # (N, T)
        t = top.shape[1]
        candidates = patches.view(n, p, c).gather(1, top.unsqueeze(2).expand(-1, -1, c)).reshape(n * t, c)
        dist, idx = nearest_neighbor(candidates, self.bank_cols, self.bank_sq, self.chunk_elements)
        dist, idx = dist.view(n, t), idx.view(n, t)
        s_star, j = dist.max(dim=1)
        p_star = top.gather(1, j.unsqueeze(1)).squeeze(1)
        m_star_idx = idx.gather(1, j.unsqueeze(1)).squeeze(1)
        return approx.scatter(1, top, dist), s_star, p_star, m_star_idx

    def reweighted_scores(self, m_test: torch.Tensor, s_star: torch.Tensor, m_star_idx: torch.Tensor) -> torch.Tensor:
        """Image score s = w * s* (paper eq. 7).

        s* (N,) is the largest patch distance, m_test* (N, C) that patch and m* = bank[m_star_idx] its
        nearest bank feature; w = 1 - exp(|m_test* - m*|) / sum over the b nearest bank neighbours m of
        m* of exp(|m_test* - m|), computed as a softmax so large distances cannot overflow.
        """
        support = self.bank_neighbors[m_star_idx]  # N_b(m*), m* first
        diffs = m_test.unsqueeze(1) - self.memory_bank[support]
        weights = 1.0 - torch.softmax(diffs.norm(dim=2), dim=1)[:, 0]
        return weights * s_star

    def params(self) -> dict[str, Any]:
        return {
            "num_neighbors": self.num_neighbors,
            "sigma": self.smoother.sigma,
            "search_precision": self.search_precision,
            "map_upsampling": self.smoother.upsampling_mode,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank, "bank_neighbors": self.bank_neighbors}

    @classmethod
    def from_tensors(
        cls,
        backbone: FeatureBackbone,
        input_size: tuple[int, int],
        params: dict[str, Any],
        tensors: dict[str, torch.Tensor],
    ) -> PatchCoreModel:
        return cls(
            backbone,
            tensors["memory_bank"],
            input_size,
            num_neighbors=int(params["num_neighbors"]),
            sigma=float(params["sigma"]),
            search_precision=str(params.get("search_precision", "float32")),  # bundles before it existed
            bank_neighbors=tensors.get("bank_neighbors"),  # computed for bundles before it existed
            map_upsampling=str(params.get("map_upsampling", "linear")),  # bundles before it existed
        )
