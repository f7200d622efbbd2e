"""Weight Standardization (Qiao et al., 2019): every conv's filters are standardized before use.

``Ŵ = (W − mean(W)) / (std(W) + 1e-5)``, mean and (unbiased) std over each output filter's
(C_in, kH, kW), as in the authors' code. It is a property of the convolutions, paired with
GroupNorm in ``gn_ws``; :func:`standardize_convs` converts a built model's convs in place.
"""

from __future__ import annotations

import torch
from torch import nn


class WSConv2d(nn.Conv2d):
    """A Conv2d whose weight is standardized per output filter on every forward pass."""

    ws_eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        std, mean = torch.std_mean(self.weight, dim=(1, 2, 3), keepdim=True)
        return (self.weight - mean) / (std + self.ws_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


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
