"""Weight Standardization (Qiao et al., 2019): every conv's filters are standardized before use.

``Ŵ = (W − mean(W)) / (std(W) + 1e-5)``, mean and (unbiased) std over each output filter's
(C_in, kH, kW), as in the authors' code. It is a property of the convolutions, paired with
GroupNorm in ``gn_ws``; :func:`standardize_convs` converts a built model's convs in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WSConv2d(nn.Conv2d):
    """A Conv2d whose weight is standardized per output filter on every forward pass."""

    ws_eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        std, mean = torch.std_mean(self.weight, dim=(1, 2, 3), keepdim=True)
        return (self.weight - mean) / (std + self.ws_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = self.standardized_weight(), self.padding
        if self.padding_mode != "zeros":  # reflect, replicate, circular: pad first, as nn.Conv2d does
            x, padding = F.pad(x, self.pad_widths(), mode=self.padding_mode), 0
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    def pad_widths(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom): the padding as ``F.pad`` takes it ('same': torch's split, extra on the
        right and bottom)."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            (top, bottom), (left, right) = ((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                                            for d, k in zip(self.dilation, self.kernel_size))
            return left, right, top, bottom
        height, width = self.padding
        return width, width, height, height


def standardize_convs(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv2d`` in `module` by a :class:`WSConv2d` with the same weights.

    Returns the converted module (the module itself is converted in place where it is not a conv),
    like ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if type(module) is nn.Conv2d:
        ws = WSConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                      module.padding, module.dilation, module.groups, module.bias is not None,
                      module.padding_mode, device=module.weight.device, dtype=module.weight.dtype)
        ws.load_state_dict(module.state_dict())
        return ws
    for name, child in module.named_children():
        setattr(module, name, standardize_convs(child))
    return module
