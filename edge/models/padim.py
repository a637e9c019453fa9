"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021).

Scoring only: a multivariate Gaussian N(mu_ij, Sigma_ij) per feature-map position over a random subset
of the backbone's channels; the anomaly map is the Mahalanobis distance. Fitting is in `calibration.fit`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edge.backbones import FeatureBackbone
from edge.scoring import AnomalyMapSmoother, ScoreResult, patch_features


def padim_embedding(backbone: FeatureBackbone, x: torch.Tensor, channel_idx: torch.Tensor) -> torch.Tensor:
    """Selected channels (N, d, h, w) of the backbone maps, upsampled to the finest and concatenated."""
    return patch_features(backbone, x, pool=False).index_select(1, channel_idx)


class PadimModel(nn.Module):
    """forward: x (N, 3, H, W) normalised -> ScoreResult(scores (N,) = max of map, maps (N, H, W)).

    Buffers: channel_idx (d,), mean (P, d), inv_cov (P, d, d) with P = h * w positions.
    """

    name = "padim"

    def __init__(
        self,
        backbone: FeatureBackbone,
        channel_idx: torch.Tensor,
        mean: torch.Tensor,
        inv_cov: torch.Tensor,
        input_size: tuple[int, int],
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        d = channel_idx.numel()
        if mean.ndim != 2 or mean.shape[1] != d or inv_cov.shape != (mean.shape[0], d, d):
            raise ValueError(
                f"inconsistent PaDiM state: channel_idx {tuple(channel_idx.shape)}, mean {tuple(mean.shape)}, "
                f"inv_cov {tuple(inv_cov.shape)}"
            )
        if int(channel_idx.max()) >= sum(backbone.channels):
            raise ValueError("PaDiM channel index exceeds the backbone's feature channels")
        self.backbone = backbone
        self.register_buffer("channel_idx", channel_idx.long())
        self.register_buffer("mean", mean.float().contiguous())
        self.register_buffer("inv_cov", inv_cov.float().contiguous())
        self.smoother = AnomalyMapSmoother(input_size, sigma, grid_size=backbone.grid_size(input_size))

    def distance_map(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance per feature-map position (N, h, w)."""
        emb = padim_embedding(self.backbone, x, self.channel_idx)
        n, d, h, w = emb.shape
        if h * w != self.mean.shape[0]:
            raise ValueError(f"PaDiM was fitted on {self.mean.shape[0]} positions, input gives {h * w}")
        delta = emb.reshape(n, d, h * w).permute(0, 2, 1) - self.mean  # (N, P, d)
        # (x - mu)^T Sigma^-1 (x - mu) per position, batched over positions.
        m2 = torch.einsum("npi,pij,npj->np", delta, self.inv_cov, delta)
        return m2.clamp_min(0).sqrt().view(n, h, w)

    def forward(self, x: torch.Tensor) -> ScoreResult:
        maps = self.smoother(self.distance_map(x))
        return ScoreResult(maps.flatten(1).amax(dim=1), maps)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.smoother.sigma}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"channel_idx": self.channel_idx, "mean": self.mean, "inv_cov": self.inv_cov}

    @classmethod
    def from_tensors(
        cls,
        backbone: FeatureBackbone,
        input_size: tuple[int, int],
        params: dict[str, Any],
        tensors: dict[str, torch.Tensor],
    ) -> PadimModel:
        return cls(
            backbone,
            tensors["channel_idx"],
            tensors["mean"],
            tensors["inv_cov"],
            input_size,
            sigma=float(params["sigma"]),
        )
