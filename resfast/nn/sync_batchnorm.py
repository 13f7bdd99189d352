"""Synchronised BatchNorm that the fused ops understand, and the converter that puts it in a model.

``resfast.convert_sync_batchnorm(model)`` replaces every nn.BatchNorm2d by :class:`SyncBatchNorm2d` and every timm
``BatchNormAct2d`` by :class:`SyncBatchNormAct2d` (its activation kept). Both are nn.BatchNorm2d subclasses with the
same parameters, buffers and state_dict keys; in training their statistics are those of the whole process group's
batch, on any device (CPU with gloo, CUDA with nccl: resfast/ops/sync_batchnorm.py). resfast's blocks recognise
them and keep calling the fused ops, which run synchronised BatchNorm on the eager backend.

torch's nn.SyncBatchNorm.convert_sync_batchnorm still works for resfast's blocks: they see a BatchNorm the ops do
not take and run their child modules (unfused; torch's module needs GPU tensors in training). It turns timm's
BatchNormAct2d into a plain nn.SyncBatchNorm whose forward ignores the activation; this converter does not.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

from torch import Tensor, nn

from ..ops.batchnorm import as_bn_params, batch_norm_eager, resolve_bn
from .layers import is_timm


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are merged over `process_group` (None: the default group).

    Same constructor as nn.BatchNorm2d plus ``process_group``, same state_dict. In training with torch.distributed
    initialised and more than one process in the group, mean and variance are those of the group's whole batch
    (the running variance unbiased with the global count) and the backward sums its reductions over the group;
    every rank must run the forward and backward of every such layer. Otherwise (one process, no process group,
    eval mode) it is exactly nn.BatchNorm2d. Inputs are 4-D.
    """

    # resfast.ops.as_bn_params takes the process group of a BatchNorm2d whose class says so
    synchronizes_statistics = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _batch_norm(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        # nn.BatchNorm2d's rules (resolve_bn), with the process group when there is one to merge over
        return batch_norm_eager(x, resolve_bn(as_bn_params(self), self.training))

    def forward(self, x: Tensor) -> Tensor:
        return self._batch_norm(x)

    def __deepcopy__(self, memo):
        # A ProcessGroup cannot be copied (torch's nn.SyncBatchNorm with a group cannot be deep-copied): the copy
        # shares it, as it shares the job. Everything else is copied as copy.deepcopy does for a module.
        if self.process_group is not None:
            memo.setdefault(id(self.process_group), self.process_group)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new


class SyncBatchNormAct2d(SyncBatchNorm2d):
    """timm's ``BatchNormAct2d`` (BatchNorm, then ``drop``, then ``act``) with synchronised statistics.

    Made by :func:`convert_sync_batchnorm` from a BatchNormAct2d, whose ``drop`` and ``act`` modules it keeps (same
    state_dict keys). Built directly it has ``drop = nn.Identity()`` and ``act`` the given module (default nn.ReLU).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, act: Optional[nn.Module] = None,
                 drop: Optional[nn.Module] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self._batch_norm(x)))


def _is_timm_bn_act(m: nn.Module) -> bool:
    return is_timm(m, "BatchNormAct2d") and isinstance(m, nn.BatchNorm2d)


def _as(m: nn.Module, cls: type, process_group) -> nn.Module:
    """`m`'s state under `cls`: the same parameter and buffer tensors, submodules, hooks, attributes and training flag
    (nothing is copied, so an optimizer built before the conversion still updates the new module)."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for k in ("_parameters", "_buffers", "_modules"):
        new.__dict__[k] = copy.copy(m.__dict__[k])  # own containers; the tensors and modules are shared
    new.process_group = process_group
    return new


# plain BatchNorms of other ranks: torch's SyncBatchNorm computes exactly what they do (on GPU), as in torch's converter
_TORCH_SYNC = (nn.BatchNorm1d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Make `module`'s BatchNorms synchronise their training statistics over `process_group` (None: the default
    group), as torch.nn.SyncBatchNorm.convert_sync_batchnorm does, in a form resfast's fused blocks keep using.

    * nn.BatchNorm2d (exactly that class) -> :class:`SyncBatchNorm2d`;
    * timm's BatchNormAct2d -> :class:`SyncBatchNormAct2d`, keeping its ``drop`` and ``act`` (torch's converter makes
      it a plain SyncBatchNorm that no longer applies the activation);
    * nn.BatchNorm1d/3d -> torch's nn.SyncBatchNorm, as torch's converter does (runs on GPU only);
    * FrozenBatchNorm2d, modules already synchronised, and other BatchNorm subclasses (their forward may do more
      than a BatchNorm) are left as they are; the latter with a warning.

    Parameters and buffers are the same tensors (requires_grad and the training flag as they were). Children are
    replaced in place; the returned module is `module`, or its replacement when it is itself a BatchNorm.
    """
    skipped: list[str] = []
    out = _convert(module, process_group, skipped)
    if skipped:
        warnings.warn(
            f"resfast.convert_sync_batchnorm left these BatchNorm layers unsynchronised (their class is not one it "
            f"knows to be a plain BatchNorm): {sorted(set(skipped))}", RuntimeWarning, stacklevel=2)
    return out


def _convert(m: nn.Module, process_group, skipped: list[str]) -> nn.Module:
    if type(m) is nn.BatchNorm2d:
        return _as(m, SyncBatchNorm2d, process_group)
    if _is_timm_bn_act(m):
        return _as(m, SyncBatchNormAct2d, process_group)  # its children are drop and act: nothing to convert
    if type(m) in _TORCH_SYNC:
        return nn.SyncBatchNorm.convert_sync_batchnorm(m, process_group)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d)):
        skipped.append(type(m).__qualname__)
    for name, child in m.named_children():
        new = _convert(child, process_group, skipped)
        if new is not child:
            setattr(m, name, new)
    return m
