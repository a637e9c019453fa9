"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024).

Scoring only: the patch description networks (PDN-S / PDN-M) used as teacher T and student S, the
autoencoder A, and the module that turns their disagreement into a quantile-normalised anomaly map.
Distilling the teacher and training S and A live in `calibration.efficientad`.

Every number the scores depend on is a buffer of `EfficientADModel` (teacher channel mean/std, the four
map quantiles), so the bundle alone reproduces the scores; the reference code keeps some of them apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge.scoring import AnomalyMapSmoother, ScoreResult

PDN_SIZES = ("small", "medium")
TEACHER_CHANNELS = 384  # channels of T's output and of each of S's two heads (paper: 384)
TEACHER_FILE_FORMAT = "linewatch-teacher"  # a distilled teacher's file: {"format", "size", "weights", "record"}
RECEPTIVE_FIELD = 33  # pixels of input seen by one PDN output cell (both sizes)
PDN_STRIDE = 4
# Quantiles of the held-out normal maps mapped to 0 and 0.1 (paper: q_a = 0.9, q_b = 0.995).
QUANTILE_A = 0.9
QUANTILE_B = 0.995


def _pdn_layers(size: str, out_channels: int, padding: bool) -> list[tuple[str, nn.Module]]:
    """(name, layer) of PDN-S or PDN-M (paper, tables 6 and 7); without padding a 256 px input gives 56 x 56."""
    if size not in PDN_SIZES:
        raise ValueError(f"PDN size {size!r}: expected one of {', '.join(PDN_SIZES)}")
    p = 1 if padding else 0
    c1, c2 = (128, 256) if size == "small" else (256, 512)
    stem: list[tuple[str, nn.Module]] = [  # both sizes: two 4x4 convolutions, each followed by 2x2 average pooling
        ("conv1", nn.Conv2d(3, c1, 4, padding=3 * p)),
        ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.AvgPool2d(2, stride=2, padding=p)),
        ("conv2", nn.Conv2d(c1, c2, 4, padding=3 * p)),
        ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.AvgPool2d(2, stride=2, padding=p)),
    ]
    if size == "small":
        return [
            *stem,
            ("conv3", nn.Conv2d(c2, c2, 3, padding=p)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(c2, out_channels, 4)),
        ]
    return [
        *stem,
        ("conv3", nn.Conv2d(c2, c2, 1)),
        ("relu3", nn.ReLU(inplace=True)),
        ("conv4", nn.Conv2d(c2, c2, 3, padding=p)),
        ("relu4", nn.ReLU(inplace=True)),
        ("conv5", nn.Conv2d(c2, out_channels, 4)),
        ("relu5", nn.ReLU(inplace=True)),
        ("conv6", nn.Conv2d(out_channels, out_channels, 1)),
    ]


class PatchDescriptionNetwork(nn.Module):
    """PDN: x (N, 3, H, W) -> (N, out_channels, H/4 - 8, W/4 - 8) unpadded, (N, out_channels, H/4, W/4) padded.

    Each output cell sees a 33 x 33 patch of the input and nothing else, which is what makes the
    teacher-student disagreement local.
    """

    def __init__(self, size: str = "small", out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> None:
        super().__init__()
        self.size = size
        self.out_channels = out_channels
        self.padding = padding
        for name, layer in _pdn_layers(size, out_channels, padding):
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        shrink = 0 if self.padding else 8  # the unpadded convolutions eat 8 cells of the H/4 grid
        return input_size[0] // PDN_STRIDE - shrink, input_size[1] // PDN_STRIDE - shrink


def _up(size: tuple[int, int], div: float, minus: int = 0) -> tuple[int, int]:
    return max(1, int(size[0] / div) - minus), max(1, int(size[1] / div) - minus)


class Autoencoder(nn.Module):
    """The paper's autoencoder A: six strided convolutions down to a 64-d code, bilinear upsampling and
    convolutions back up to the PDN's output grid with `out_channels` channels.

    The decoder's intermediate sizes are the paper's for 256 px (3, 8, 15, 32, 63, 127) scaled with the
    input, and the last encoder kernel is input / 32 so the code is 1 x 1 at any supported size.
    """

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int], out_channels: int = TEACHER_CHANNELS):
        super().__init__()
        if min(input_size) < 64 or input_size[0] % 32 or input_size[1] % 32:
            raise ValueError(f"EfficientAD input size {input_size}: expected a multiple of 32, at least 64")
        self.input_size = input_size
        self.output_size = output_size
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, (input_size[0] // 32, input_size[1] // 32)),
        )
        self.decoder = nn.ModuleList([nn.Conv2d(64, 64, 4, padding=2) for _ in range(6)])
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Conv2d(64, 64, 3, padding=1)
        self.out = nn.Conv2d(64, out_channels, 3, padding=1)
        self.sizes = [
            _up(input_size, 64, 1),
            _up(input_size, 32),
            _up(input_size, 16, 1),
            _up(input_size, 8),
            _up(input_size, 4, 1),
            _up(input_size, 2, 1),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        for size, conv in zip(self.sizes, self.decoder, strict=True):
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            z = self.dropout(F.relu(conv(z)))
        z = F.interpolate(z, size=self.output_size, mode="bilinear", align_corners=False)
        return self.out(F.relu(self.head(z)))


def load_pdn_weights(module: PatchDescriptionNetwork, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load teacher weights from a state dict or a `.pth` file holding one.

    Accepts linewatch's own teacher files (`conv1.weight`, ...), the EfficientAD authors' published
    files (an `nn.Sequential` state dict: `0.weight`, `3.weight`, ...) and anomalib's: the convolutions
    are matched in network order by shape, so a PDN-M file is refused for a PDN-S teacher and vice versa.
    """
    where = str(source) if not isinstance(source, Mapping) else "teacher state dict"
    if not isinstance(source, Mapping):
        try:
            source = torch.load(Path(source), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{where}: teacher weights file does not exist") from None
        except Exception as exc:  # unpickling errors come in many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{where}: not a teacher weights file ({reason})") from exc
        if isinstance(source, nn.Module):  # pragma: no cover - weights_only refuses modules
            source = source.state_dict()
    if isinstance(source, Mapping) and source.get("format") == TEACHER_FILE_FORMAT:
        source = source["weights"]
    if not isinstance(source, Mapping):
        raise ValueError(f"{where}: expected a state dict of PDN weights, got {type(source).__name__}")
    weights = [(k, v) for k, v in source.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 4]
    weights.sort(key=lambda kv: _layer_order(kv[0]))
    convs = [m for m in module.children() if isinstance(m, nn.Conv2d)]
    expected = [tuple(c.weight.shape) for c in convs]
    found = [tuple(v.shape) for _, v in weights]
    if found != expected:
        raise ValueError(
            f"{where}: teacher weights do not fit a PDN-{module.size[0].upper()} with {module.out_channels} outputs "
            f"(convolution shapes {found}, expected {expected})"
        )
    with torch.no_grad():
        for conv, (name, w) in zip(convs, weights, strict=True):
            bias = source.get(name[: -len("weight")] + "bias")
            if bias is None or tuple(bias.shape) != (w.shape[0],):
                raise ValueError(f"{where}: {name} has no matching bias")
            conv.weight.copy_(w)
            conv.bias.copy_(bias)


def _layer_order(key: str) -> tuple[int, ...]:
    """Sort key of a state-dict name by the numbers in it: `3.weight` < `10.weight`, `conv2` < `conv10`."""
    digits = "".join(ch if ch.isdigit() else " " for ch in key).split()
    return tuple(int(d) for d in digits)


class EfficientADModel(nn.Module):
    """Quantile-normalised EfficientAD anomaly map and image score.

    forward: x (N, 3, H, W) normalised -> ScoreResult(scores (N,) = max of map, maps (N, H, W)).

    With Y' = (T(x) - mu) / sigma and S(x) = [S_st, S_ae]:
      M_ST = mean_c (Y' - S_st)^2, M_AE = mean_c (A(x) - S_ae)^2               (paper, algorithm 1)
      M = 0.5 * 0.1 (M_ST - q_a^ST) / (q_b^ST - q_a^ST) + 0.5 * 0.1 (M_AE - q_a^AE) / (q_b^AE - q_a^AE)
    The q are the 0.9 / 0.995 quantiles of M_ST and M_AE over held-out normal frames. Without PDN
    padding the maps cover the input minus a 16-px border: they are extended by the nearest cell
    (replicate, so an edge defect still counts) and upsampled bilinearly to the input size.

    Buffers: teacher_mean, teacher_std (1, 384, 1, 1); quantiles (4,) = q_a^ST, q_b^ST, q_a^AE, q_b^AE.
    """

    name = "efficientad"
    backbone = None  # the teacher is part of the model: the bundle carries all of its weights

    def __init__(
        self,
        teacher: PatchDescriptionNetwork,
        student: PatchDescriptionNetwork,
        autoencoder: Autoencoder,
        teacher_mean: torch.Tensor,
        teacher_std: torch.Tensor,
        quantiles: torch.Tensor,
        input_size: tuple[int, int],
        sigma: float = 4.0,
        teacher_source: str = "",
    ) -> None:
        super().__init__()
        c = teacher.out_channels
        if student.out_channels != 2 * c or student.size != teacher.size or student.padding != teacher.padding:
            raise ValueError(
                f"student PDN-{student.size} with {student.out_channels} outputs does not match "
                f"teacher PDN-{teacher.size} with {c} (expected {2 * c})"
            )
        if teacher_mean.numel() != c or teacher_std.numel() != c or quantiles.shape != (4,):
            raise ValueError(
                f"inconsistent EfficientAD state: teacher_mean {tuple(teacher_mean.shape)}, teacher_std "
                f"{tuple(teacher_std.shape)}, quantiles {tuple(quantiles.shape)}"
            )
        if not torch.isfinite(quantiles).all() or not bool(
            (quantiles[1] > quantiles[0]) & (quantiles[3] > quantiles[2])
        ):
            raise ValueError(f"EfficientAD map quantiles {quantiles.tolist()} are not set: fit the model first")
        self.teacher = teacher
        self.student = student
        self.autoencoder = autoencoder
        self.input_size = tuple(input_size)
        self.teacher_source = teacher_source
        self.register_buffer("teacher_mean", teacher_mean.float().reshape(1, c, 1, 1))
        self.register_buffer("teacher_std", teacher_std.float().reshape(1, c, 1, 1))
        self.register_buffer("quantiles", quantiles.float())
        out = teacher.output_size(self.input_size)
        self.border = (self.input_size[0] // PDN_STRIDE - out[0]) // 2
        self.smoother = AnomalyMapSmoother(input_size, sigma, border=self.border)

    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M_ST and M_AE (N, h, w) on the PDN's output grid, before normalisation."""
        return disagreement_maps(self.teacher, self.student, self.autoencoder, self.teacher_mean, self.teacher_std, x)

    def combine(self, map_st: torch.Tensor, map_ae: torch.Tensor) -> torch.Tensor:
        """Normalised combined map (N, H, W) at the input size, from `raw_maps`."""
        q = self.quantiles
        st = 0.1 * (map_st - q[0]) / (q[1] - q[0])
        ae = 0.1 * (map_ae - q[2]) / (q[3] - q[2])
        return self.smoother(0.5 * st + 0.5 * ae)  # replicate-padded by `border`, upsampled, blurred

    def forward(self, x: torch.Tensor) -> ScoreResult:
        maps = self.combine(*self.raw_maps(x))
        return ScoreResult(maps.flatten(1).amax(dim=1), maps)

    def floor_module(self) -> nn.Module:
        """The teacher alone: the part of the model every frame must go through (bench's floor)."""
        return self.teacher

    def params(self) -> dict[str, Any]:
        return {
            "size": self.teacher.size,
            "padding": self.teacher.padding,
            "channels": self.teacher.out_channels,
            "sigma": self.smoother.sigma,
            "teacher": self.teacher_source,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"teacher_mean": self.teacher_mean, "teacher_std": self.teacher_std, "quantiles": self.quantiles}
        for part in ("teacher", "student", "autoencoder"):
            out.update({f"{part}.{k}": v for k, v in getattr(self, part).state_dict().items()})
        return out

    @classmethod
    def from_tensors(
        cls,
        backbone: None,
        input_size: tuple[int, int],
        params: dict[str, Any],
        tensors: dict[str, torch.Tensor],
    ) -> EfficientADModel:
        size, padding, c = str(params["size"]), bool(params["padding"]), int(params["channels"])
        teacher, student, autoencoder = build_networks(size, c, padding, tuple(input_size))
        for part, module in (("teacher", teacher), ("student", student), ("autoencoder", autoencoder)):
            prefix = part + "."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"{part} weights: {' '.join(str(exc).split())[:300]}") from exc
        return cls(
            teacher,
            student,
            autoencoder,
            tensors["teacher_mean"],
            tensors["teacher_std"],
            tensors["quantiles"],
            input_size,
            sigma=float(params["sigma"]),
            teacher_source=str(params.get("teacher", "")),
        )


def build_networks(
    size: str, channels: int, padding: bool, input_size: tuple[int, int]
) -> tuple[PatchDescriptionNetwork, PatchDescriptionNetwork, Autoencoder]:
    """Freshly initialised teacher T, student S (two heads) and autoencoder A for `input_size`."""
    teacher = PatchDescriptionNetwork(size, channels, padding)
    student = PatchDescriptionNetwork(size, 2 * channels, padding)
    autoencoder = Autoencoder(input_size, teacher.output_size(input_size), channels)
    return teacher, student, autoencoder


def disagreement_maps(
    teacher: nn.Module,
    student: nn.Module,
    autoencoder: nn.Module,
    teacher_mean: torch.Tensor,
    teacher_std: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M_ST = mean_c ((T(x) - mu) / sigma - S_st(x))^2 and M_AE = mean_c (A(x) - S_ae(x))^2, each (N, h, w)."""
    y = (teacher(x) - teacher_mean) / teacher_std
    s = student(x)
    a = autoencoder(x)
    c = y.shape[1]
    return (y - s[:, :c]).pow(2).mean(dim=1), (a - s[:, c:]).pow(2).mean(dim=1)
