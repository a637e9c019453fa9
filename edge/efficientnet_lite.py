"""EfficientNet-Lite (Tan & Le 2019, "Lite" variant for edge devices), written for feature extraction.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, fixed stem and head.
Parameter names follow the layout of the published PyTorch conversion of the TensorFlow checkpoints
(`_conv_stem`, `_blocks.N._depthwise_conv`, ...) so that state dict loads with `strict=True`.
Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2), as the weights were trained with
it; symmetric padding shifts every stride-2 feature map by half a pixel and costs accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BN_EPS = 1e-3  # TensorFlow's default, used by the original checkpoints


@dataclass(frozen=True)
class StageSpec:
    kernel: int
    stride: int
    expand: int
    out_channels: int
    repeats: int


# EfficientNet-B0 / Lite0 stages: (kernel, stride, expand ratio, output channels, repeats).
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(3, 1, 1, 16, 1),
    StageSpec(3, 2, 6, 24, 2),
    StageSpec(5, 2, 6, 40, 2),
    StageSpec(3, 2, 6, 80, 3),
    StageSpec(5, 1, 6, 112, 3),
    StageSpec(5, 2, 6, 192, 4),
    StageSpec(3, 1, 6, 320, 1),
)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (static under export).

    Symmetric padding (every stride-1 conv) is left to the convolution itself. The asymmetric stride-2
    case pads one more pixel after than before. A depthwise conv does that without a padded copy of its
    input: its kernel gets a leading row/column of zeros and the convolution pads symmetrically by the
    larger amount, which computes the same sums. On the dev CPU the padded copy cost more than the conv
    itself (96 channels at 144 px: 0.90 ms with the copy, 0.29 ms without). A dense conv (the 3-channel
    stem) keeps the copy: there the extra taps cost more than copying its small input.
    """

    def same_padding(self, x: torch.Tensor) -> tuple[list[int], list[int]]:
        """Padding before and after, per spatial axis (H, W); after is before or before + 1."""
        before: list[int] = []
        after: list[int] = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            before.append(total // 2)
            after.append(total - total // 2)
        return before, after

    def conv_padded_copy(self, x: torch.Tensor, before: list[int], after: list[int]) -> torch.Tensor:
        pads = [before[1], after[1], before[0], after[0]]  # F.pad order: (left, right, top, bottom)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.same_padding(x)
        if before == after:
            return F.conv2d(x, self.weight, self.bias, self.stride, tuple(before), self.dilation, self.groups)
        if self.groups == self.in_channels and self.dilation == (1, 1):
            extra = [a - b for a, b in zip(after, before, strict=True)]
            weight = F.pad(self.weight, (extra[1], 0, extra[0], 0))
            return F.conv2d(x, weight, self.bias, self.stride, tuple(after), 1, self.groups)
        return self.conv_padded_copy(x, before, after)


def fold_batchnorm(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace `parent.<conv_name>` by the conv with `parent.<bn_name>` folded into it, and the BN by Identity.

    Inference only (uses the running statistics). Saves one full pass over every activation map:
    BatchNorm took 15 % of the Lite0 forward on the dev CPU.
    """
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    if isinstance(bn, nn.Identity):
        return
    setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
    setattr(parent, bn_name, nn.Identity())


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity skip)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)  # y is a fresh tensor here
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.use_skip else y

    def fold_batchnorm(self) -> None:
        if self.has_expand:
            fold_batchnorm(self, "_expand_conv", "_bn0")
        fold_batchnorm(self, "_depthwise_conv", "_bn1")
        fold_batchnorm(self, "_project_conv", "_bn2")


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier whose `forward_blocks` exposes the output of every block.

    Input: (N, 3, H, W) normalised as in `edge.preprocessing` for this backbone.
    """

    def __init__(self, stages: tuple[StageSpec, ...] = LITE0_STAGES, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[MBConvBlock] = []
        in_ch = 32
        for spec in stages:
            for r in range(spec.repeats):
                stride = spec.stride if r == 0 else 1
                blocks.append(MBConvBlock(in_ch, spec.out_channels, spec.kernel, stride, spec.expand))
                in_ch = spec.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def block_channels(self, index: int) -> int:
        return self._blocks[index]._project_conv.out_channels

    def fold_batchnorm(self) -> None:
        """Fold every BatchNorm into its convolution (inference only; outputs agree to float rounding)."""
        fold_batchnorm(self, "_conv_stem", "_bn0")
        for block in self._blocks:
            block.fold_batchnorm()
        fold_batchnorm(self, "_conv_head", "_bn1")

    def block_stride(self, index: int) -> int:
        stride = 2  # stem
        for block in self._blocks[: index + 1]:
            stride *= block._depthwise_conv.stride[0]
        return stride

    def forward_blocks(self, x: torch.Tensor, last_block: int) -> list[torch.Tensor]:
        """Outputs of blocks 0..last_block (inclusive); later blocks are not computed."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        outs: list[torch.Tensor] = []
        for block in self._blocks[: last_block + 1]:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x, len(self._blocks) - 1)[-1]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
