"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Scoring only: a plain `nn.Module` holding the backbone and the memory bank M. Fitting (feature
extraction + coreset) lives in `calibration.fit`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edge.backbones import FeatureBackbone
from edge.scoring import (
    DEFAULT_CHUNK_ELEMENTS,
    SEARCH_PRECISIONS,
    AnomalyMapSmoother,
    ScoreResult,
    k_nearest,
    nearest_neighbor,
    nearest_neighbor_reranked,
    patch_features,
    squared_norms,
)


def patchcore_embedding(backbone: FeatureBackbone, x: torch.Tensor) -> torch.Tensor:
    """Locally aware patch features (N, C, h, w): 3x3-pooled backbone maps, upsampled and concatenated."""
    return patch_features(backbone, x, pool=True)


class PatchCoreModel(nn.Module):
    """Image score and anomaly map from nearest-neighbour distances to a memory bank of patch features.

    forward: x (N, 3, H, W) normalised -> ScoreResult(scores (N,), maps (N, H, W)).
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
        search_precision: str = "float32",
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
        if search_precision not in SEARCH_PRECISIONS:
            choices = ", ".join(SEARCH_PRECISIONS)
            raise ValueError(f"search_precision must be one of {choices}, got {search_precision!r}")
        self.search_precision = search_precision
        low = self.memory_bank.to(SEARCH_PRECISIONS[search_precision])
        self.register_buffer("bank_low", low, persistent=False)  # derived: not part of the bundle
        self.register_buffer("bank_sq_low", squared_norms(self.memory_bank).to(low.dtype), persistent=False)
        self.smoother = AnomalyMapSmoother(input_size, sigma)

    def forward(self, x: torch.Tensor) -> ScoreResult:
        return self.score_embedding(patchcore_embedding(self.backbone, x))

    def score_embedding(self, emb: torch.Tensor) -> ScoreResult:
        """Scores and maps from patch features (N, C, h, w) already computed by `patchcore_embedding`."""
        n, c, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if self.search_precision == "float32":
            dist, nn_idx = nearest_neighbor(patches, self.memory_bank, self.bank_sq, self.chunk_elements)
        else:
            dist, nn_idx = nearest_neighbor_reranked(
                patches, self.memory_bank, self.bank_low, self.bank_sq_low, chunk_elements=self.chunk_elements
            )
        patch_scores = dist.view(n, h * w)
        scores = self.reweighted_scores(patches.view(n, h * w, c), patch_scores, nn_idx.view(n, h * w))
        return ScoreResult(scores, self.smoother(patch_scores.view(n, h, w)))

    def reweighted_scores(
        self, patches: torch.Tensor, patch_scores: torch.Tensor, nn_idx: torch.Tensor
    ) -> torch.Tensor:
        """Image score s = w * s* (paper eq. 7).

        s* is the largest patch distance, m_test* that patch and m* its nearest bank feature;
        w = 1 - exp(|m_test* - m*|) / sum over the b nearest bank neighbours m of m* of exp(|m_test* - m|),
        computed as a softmax so large distances cannot overflow.
        patches (N, P, C), patch_scores (N, P), nn_idx (N, P) -> (N,).
        """
        s_star, p_star = patch_scores.max(dim=1)
        m_test = patches.gather(1, p_star.view(-1, 1, 1).expand(-1, 1, patches.shape[2])).squeeze(1)
        m_star_idx = nn_idx.gather(1, p_star.view(-1, 1)).squeeze(1)
        m_star = self.memory_bank[m_star_idx]
        k = min(self.num_neighbors, self.memory_bank.shape[0])
        support = k_nearest(m_star, self.memory_bank, self.bank_sq, k, self.chunk_elements)  # N_b(m*), m* first
        diffs = m_test.unsqueeze(1) - self.memory_bank[support]
        weights = 1.0 - torch.softmax(diffs.norm(dim=2), dim=1)[:, 0]
        return weights * s_star

    def params(self) -> dict[str, Any]:
        return {
            "num_neighbors": self.num_neighbors,
            "sigma": self.smoother.sigma,
            "search_precision": self.search_precision,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank}

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
            search_precision=str(params.get("search_precision", "float32")),
        )
