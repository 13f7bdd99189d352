"""Training-mode BatchNorm whose statistics are merged across the processes of a torch.distributed group.

:func:`sync_batch_norm` is what :func:`resfast.ops.batchnorm.batch_norm_eager` runs for a BatchNorm with a process
group (``resfast.nn.SyncBatchNorm2d``, made by :func:`resfast.convert_sync_batchnorm`). Unlike torch's
nn.SyncBatchNorm it uses only ``all_gather``/``all_reduce``, so it runs on any device and backend (CPU with gloo,
CUDA with nccl). The idea is the usual one (torch.nn.SyncBatchNorm, Apex): global mean and variance in the forward,
the two per-channel reductions of the BatchNorm backward summed over the group.

Statistics are computed in float32 (float64 for float64 inputs), whatever the input dtype.

How the statistics are merged: each rank computes its count ``n_r``, its mean ``m_r`` and the sum of squares about
its own mean ``M2_r`` (two passes over the local data, so no ``E[x^2] - E[x]^2`` cancellation), and one all_gather
of ``(n_r, m_r, M2_r)`` gives every rank all of them. They are merged with Chan et al.'s pairwise formula in its
closed form over all ranks::

    n = sum n_r,  mean = sum n_r m_r / n,  M2 = sum M2_r + sum n_r (m_r - mean)^2

where every term is a sum of non-negative numbers (no cancellation either), counts may differ between ranks
(an uneven last batch; a rank with an empty batch contributes nothing), and there is one collective per
BatchNorm in the forward. var = M2 / n normalises; the running variance gets the unbiased M2 / (n - 1) of the
global batch, as one process with the whole batch would.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .dtypes import acc_dtype


def _per_channel(t: Tensor) -> Tensor:
    return t.reshape(1, -1, 1, 1)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps, group, world):
        acc = acc_dtype(x.dtype)
        C = x.shape[1]
        n_local = x.numel() // C if C else 0
        xa = x.to(acc)
        mean_local = xa.sum((0, 2, 3)) / max(n_local, 1)
        m2_local = (xa - _per_channel(mean_local)).square().sum((0, 2, 3))
        count = torch.full((1,), float(n_local), dtype=acc, device=x.device)
        local = torch.cat([count, mean_local, m2_local])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (world, 1 + 2C)
        counts, means, m2s = stats[:, :1], stats[:, 1:C + 1], stats[:, C + 1:]
        total = counts.sum()
        ctx.empty = False
        if n_local <= 1:
            # nn.BatchNorm2d's rule, on the global batch. The global count is read on the host only when this
            # rank alone cannot tell (0 or 1 value per channel here): no device sync in the usual case. Every rank
            # sees the same count, so all raise, or all go on.
            n_total = int(total.item())
            if n_total == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got a global batch of 1 value per "
                    f"channel (input shape {tuple(x.shape)} on this rank)"
                )
            if n_total == 0:  # an empty global batch: as nn.BatchNorm2d, an empty output and no running update
                ctx.empty = True
                ctx.save_for_backward(x, weight, bias)
                return torch.empty_like(x)
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_((m2 / (total - 1)).to(running_var.dtype), alpha=factor)
        scale = invstd if weight is None else invstd * weight.to(acc)
        y = (xa - _per_channel(mean)) * _per_channel(scale)
        if bias is not None:
            y = y + _per_channel(bias.to(acc))
        ctx.save_for_backward(x, weight, mean, invstd, total)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        none = (None,) * 6
        if ctx.empty:
            return tuple(None if t is None else torch.zeros_like(t) for t in ctx.saved_tensors) + none
        x, weight, mean, invstd, total = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        dya = dy.to(acc)
        xhat = (x.to(acc) - _per_channel(mean)) * _per_channel(invstd)
        sum_dy = dya.sum((0, 2, 3))
        sum_dy_xhat = (dya * xhat).sum((0, 2, 3))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # d(loss)/d(x) depends on the whole group's batch through the mean and the variance: sum the two
            # per-channel reductions over the group (one all_reduce). Every rank runs it, as every rank's forward
            # ran the all_gather, so the collectives match.
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            g_dy, g_dy_xhat = both.split(sum_dy.shape[0])
            scale = invstd if weight is None else invstd * weight.to(acc)
            dx = (dya - _per_channel(g_dy / total) - xhat * _per_channel(g_dy_xhat / total)) * _per_channel(scale)
            dx = dx.to(x.dtype)
        # weight and bias: this rank's share only. Their gradients are summed/averaged over the ranks by
        # DistributedDataParallel like every other parameter's; summing them here as well would count them twice.
        if weight is not None and ctx.needs_input_grad[1]:
            dw = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = sum_dy.to(ctx.bias_dtype)
        return (dx, dw, db) + none


def world_size(group) -> int:
    """The size of `group` (None: the default group); 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def sync_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], factor: float, eps: float, group) -> Tensor:
    """Training BatchNorm of a 4-D `x` with the statistics of the whole process `group`'s batch.

    Same arguments as ``F.batch_norm(x, running_mean, running_var, weight, bias, True, factor, eps)``, whose result
    it equals when the group has one process (then it calls exactly that). `running_mean`/`running_var` (both or
    neither) are updated in place with the global mean and unbiased variance. Every rank of `group` must call it
    (and run the backward) in the same order, as for any collective.
    """
    world = world_size(group)
    if world <= 1:
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, True, factor, eps)
    return _SyncBatchNorm.apply(x, weight, bias, running_mean, running_var, factor, eps, group, world)
