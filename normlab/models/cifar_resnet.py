"""The CIFAR ResNets of He et al. 2016 (Sec. 4.2): depth 6n+2, three stages of widths 16/32/64.

A 3×3 stem with no max-pool, so 32×32 inputs keep full resolution in the first stage (8×8 digits
work too). Shortcuts where the shape changes are option A by default, as in the paper's CIFAR
experiments: the identity, subsampled by the stride, with zero channels appended (no parameters,
no norm). Option B projects with a strided 1×1 conv and a norm from the registry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

from normlab.models.blocks import BasicBlock
from normlab.models.norm_layer import NormLayer

SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Option A: ``x[:, :, ::s, ::s]`` followed by ``out_channels − in_channels`` zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images."""

    def __init__(self, depth: int, num_classes: int, norm: NormLayer, *, width: int = 16,
                 shortcut: str = "A", in_chans: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth={depth} is invalid; depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110)")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is invalid; valid shortcuts: 'A' (zero-padding), 'B' (projection)")
        if width < 1 or in_chans < 1:
            raise ValueError(f"width={width} and in_chans={in_chans} must both be >= 1")
        blocks = (depth - 2) // 6
        self.shortcut, self.inplanes = shortcut, width
        self.conv1 = conv3x3(in_chans, width)
        self.bn1 = norm(width, act=True)
        self.relu = norm.activation()
        self.layer1 = self._make_layer(norm, width, blocks, stride=1)
        self.layer2 = self._make_layer(norm, 2 * width, blocks, stride=2)
        self.layer3 = self._make_layer(norm, 4 * width, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def _make_layer(self, norm: NormLayer, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), norm(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=norm)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, norm_layer=norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
