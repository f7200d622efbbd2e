"""ResNet-18/34/50/101 built on ``torchvision.models.resnet.ResNet`` with the norm injected.

The trunk, the parameter names and the parameter counts are torchvision's (ResNet-50 with BN or GN:
25,557,032), so torchvision checkpoints load into a BN model. ``cifar_stem=True`` swaps the 7×7/2
stem and max-pool for a 3×3/1 stem: the common CIFAR variant of ResNet-18/34/50.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv

from normlab.models.blocks import BasicBlock, Bottleneck
from normlab.models.norm_layer import NormLayer

ARCHS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


class ResNet(tv.ResNet):
    """torchvision's ResNet whose every norm comes from `norm`, shortcut projections included."""

    def __init__(self, depth: int, num_classes: int, norm: NormLayer, *, cifar_stem: bool = False,
                 in_chans: int = 3) -> None:
        block, layers = ARCHS[depth]
        super().__init__(block, layers, num_classes=num_classes, norm_layer=norm)
        # The stem's norm is followed by its activation, which torchvision's norm_layer(C) cannot say.
        self.bn1 = norm(64, act=True)
        self.relu = norm.activation()
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
