"""SyncBN: BN whose statistics cover every image of the step (N·W), across processes too."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from normlab.norms.worker_stats import for_statistics, update_running_stats


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BN whose statistics cover every image of the step (N·W): the paper's "BN at large batch" reference.

    One process: BN over the whole batch, whatever W. A job on several processes: statistics over every
    rank's images. On CUDA, DDP runs torch's ``nn.SyncBatchNorm`` in its place
    (:func:`normlab.norms.sync_bn_swap.to_torch_sync_bn`); on
    the CPU, which torch's does not take, the sums cross the ranks here in a differentiable all-reduce, so each
    rank's gradient holds every rank's share, as torch's backward arranges on CUDA. A model meant to run on one
    rank alone (the memory-format probe) swaps it for plain BN first
    (:func:`normlab.norms.sync_bn_swap.to_process_local_bn`).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return self._all_reduced(x)
        return super().forward(x)

    def _all_reduced(self, x: torch.Tensor) -> torch.Tensor:
        """Two all-reduces: the global mean, then the sum of squares around it (no E[x²] − E[x]² cancellation)."""
        from torch.distributed.nn.functional import all_reduce

        if x.dim() != 4:
            raise ValueError(f"syncbn: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        xs = for_statistics(x)
        count = xs.new_tensor([x.numel() // x.shape[1]])
        sums = all_reduce(torch.cat([xs.sum((0, 2, 3)), count]))
        c, total = x.shape[1], sums[-1]
        mean = sums[:c] / total
        var = all_reduce((xs - mean[None, :, None, None]).square().sum((0, 2, 3))) / total
        if self.track_running_stats:
            update_running_stats(self, mean.detach()[None], var.detach()[None], total.detach())
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return torch.addcmul(shift.to(x.dtype)[None, :, None, None], x, scale.to(x.dtype)[None, :, None, None])
