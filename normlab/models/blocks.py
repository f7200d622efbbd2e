"""Residual blocks with the norm injected: torchvision's block layout and parameter names.

They differ from torchvision's in one way: each norm-then-activation pair has its own activation
module, so a norm-activation layer (FRN, EvoNorm) can replace the ReLU after it, while the ReLU
after the residual addition stays. The constructor signature is torchvision's, so these blocks
plug into ``torchvision.models.resnet.ResNet``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

from normlab.models.norm_layer import NormLayer


class ResidualBlock(nn.Module):
    """A block whose last norm (before the addition) may start at γ=0."""

    expansion = 1

    @property
    def last_norm(self) -> nn.Module:
        raise NotImplementedError


class BasicBlock(ResidualBlock):
    """Two 3×3 convs (He et al. 2016)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer: NormLayer | None = None):
        super().__init__()
        if groups != 1 or base_width != 64 or dilation != 1:
            raise ValueError("BasicBlock takes groups=1, base_width=64 and dilation=1 only")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes, act=True)
        self.act1 = norm_layer.activation()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.act2 = nn.ReLU(inplace=True)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)


class Bottleneck(ResidualBlock):
    """1×1, 3×3 (strided), 1×1 convs, four times wider at the output (torchvision's ResNet v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer: NormLayer | None = None):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width, act=True)
        self.act1 = norm_layer.activation()
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width, act=True)
        self.act2 = norm_layer.activation()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.downsample = downsample
        self.act3 = nn.ReLU(inplace=True)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + identity)
