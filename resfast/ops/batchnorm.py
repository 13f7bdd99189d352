"""BatchNorm parameters as plain data, and nn.BatchNorm2d's training/eval rules in one place.

Every op takes its BatchNorm as a :class:`BatchNormParams` (or a BatchNorm module, converted with
:func:`as_bn_params`). :func:`resolve_bn` applies nn.BatchNorm2d's rules once, at the op boundary, before any
backend runs: which statistics to use, whether the running buffers are updated, the averaging factor
(``momentum``, or ``1 / num_batches_tracked`` when ``momentum is None``), and the ``num_batches_tracked``
increment. Backends receive a :class:`ResolvedBN` and never re-derive these rules.

A BatchNorm whose training statistics are synchronised across processes (resfast's ``SyncBatchNorm2d``, from
:func:`resfast.convert_sync_batchnorm`) carries its ``process_group``; :func:`batch_norm_eager` then merges the
statistics of the group (``resfast/ops/sync_batchnorm.py``) and only the eager backend runs it. torch's own
nn.SyncBatchNorm is not taken: blocks run it as a module (its forward needs GPU tensors in training).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .sync_batchnorm import sync_batch_norm, world_size


class BatchNormParams(NamedTuple):
    """The tensors and settings of one BatchNorm2d.

    ``weight``/``bias`` are None for ``affine=False``; ``running_mean``/``running_var`` are None for
    ``track_running_stats=False`` at construction. ``track_running_stats=False`` with buffers present (the flag
    switched off later) is nn.BatchNorm2d's third case: batch statistics and no update in training, the
    running statistics in eval. ``frozen=True`` is torchvision's FrozenBatchNorm2d: running statistics
    always, never updated, computed as ``x * (w * rsqrt(rv + eps)) + (b - rm * w * rsqrt(rv + eps))``.
    ``process_group`` (a torch.distributed group of more than one process, or None): in training, the batch
    statistics are those of the whole group's batch (see :func:`batch_norm_eager`); None: this process's batch.
    """

    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    frozen: bool = False
    track_running_stats: bool = True
    process_group: Optional[object] = None  # last, with a default: positional constructions stay valid

    @property
    def num_features(self) -> Optional[int]:
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None:
                return t.shape[0]
        return None


class ResolvedBN(NamedTuple):
    """A BatchNorm with nn.BatchNorm2d's rules applied for one call (what backends receive)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]  # what F.batch_norm receives: None when batch statistics are not tracked
    running_var: Optional[Tensor]
    use_batch_stats: bool  # normalise with this batch's statistics (training, or no running stats)
    update_running: bool  # running_mean/running_var are updated in place with `factor`
    factor: float
    eps: float
    frozen: bool
    process_group: Optional[object] = None  # set only with batch statistics in training: merge over this group


def is_frozen_bn(module: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d (and look-alikes): recognised by name and buffers, no import."""
    return type(module).__name__ == "FrozenBatchNorm2d" and all(
        isinstance(getattr(module, n, None), Tensor) for n in ("weight", "bias", "running_mean", "running_var")
    )


def as_bn_params(bn) -> BatchNormParams:
    """BatchNormParams from a BatchNormParams, an nn.BatchNorm2d or a FrozenBatchNorm2d.

    For a BatchNorm2d subclass that does more in its forward (timm's BatchNormAct2d: see
    resfast.nn.layers.is_bn_relu)
    these are the parameters of its BatchNorm alone; whether the rest can be fused is the caller's decision.
    A resfast SyncBatchNorm2d gives its process group (None: the default group) when torch.distributed is
    initialised and the group has more than one process, else None (it then is an nn.BatchNorm2d)."""
    if isinstance(bn, BatchNormParams):
        return bn
    if isinstance(bn, nn.SyncBatchNorm):
        raise TypeError(
            "SyncBatchNorm synchronises statistics across processes, which resfast's ops do not do: run the "
            "module itself (resfast's blocks do so automatically)"
        )
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected a BatchNorm2d, got {type(bn).__name__} (resfast's ops normalise 4-D inputs)")
        return BatchNormParams(
            bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps, False,
            bool(bn.track_running_stats), _sync_group(bn),
        )
    if isinstance(bn, nn.Module) and is_frozen_bn(bn):
        return BatchNormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var, None, None, bn.eps, True)
    raise TypeError(
        f"expected a BatchNormParams, nn.BatchNorm2d or FrozenBatchNorm2d for the BatchNorm, got {type(bn).__name__}"
    )


_LOCAL_ONLY = [0]  # > 0 inside local_statistics()


@contextlib.contextmanager
def local_statistics() -> Iterator[None]:
    """Within this context synchronised BatchNorms use this process's batch alone (no collective): for a
    computation that runs on one rank only, such as resfast.convert's check of a block on a probe input."""
    _LOCAL_ONLY[0] += 1
    try:
        yield
    finally:
        _LOCAL_ONLY[0] -= 1


def _sync_group(bn: nn.Module) -> Optional[object]:
    """The process group a resfast SyncBatchNorm2d (a BatchNorm2d whose class sets ``synchronizes_statistics``)
    synchronises over now, or None when there is nothing to merge."""
    if not getattr(type(bn), "synchronizes_statistics", False) or _LOCAL_ONLY[0]:
        return None
    group = bn.process_group
    if world_size(group) <= 1:
        return None
    if group is None:
        import torch.distributed as dist

        group = dist.group.WORLD
    return group


def resolve_bn(bn: BatchNormParams, training: bool) -> ResolvedBN:
    """Apply nn.BatchNorm2d.forward's rules for one call; increments num_batches_tracked like the module does.

    Call exactly once per BatchNorm per forward, after the inputs have been validated.
    """
    if bn.frozen:
        return ResolvedBN(bn.weight, bn.bias, bn.running_mean, bn.running_var, False, False, 0.0, bn.eps, True)
    has_buffers = bn.running_mean is not None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = training or not has_buffers
    # synchronised statistics in training only, as torch's nn.SyncBatchNorm (an eval pass, often run on one rank,
    # never waits on a collective)
    group = bn.process_group if training else None
    # as nn.BatchNorm2d: the buffers are passed (and, with batch statistics, updated) unless training without
    # tracking; in eval they are used whenever they exist
    pass_buffers = has_buffers and (not training or bn.track_running_stats)
    return ResolvedBN(
        bn.weight,
        bn.bias,
        bn.running_mean if pass_buffers else None,
        bn.running_var if pass_buffers else None,
        use_batch_stats,
        use_batch_stats and pass_buffers,
        factor,
        bn.eps,
        False,
        group,
    )


def batch_norm_eager(x: Tensor, bn: ResolvedBN) -> Tensor:
    """The eager BatchNorm of a resolved BN: exactly what nn.BatchNorm2d / FrozenBatchNorm2d compute, with the batch
    statistics of the whole process group for a synchronised BatchNorm in training."""
    if bn.frozen:
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    if bn.process_group is not None:
        return sync_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.factor, bn.eps,
                               bn.process_group)
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.use_batch_stats, bn.factor, bn.eps
    )

