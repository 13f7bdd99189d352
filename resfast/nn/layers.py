"""Module inspection: which modules resfast's fused ops reproduce exactly, and timm's classes recognised without
importing timm. The ops (resfast/ops) take tensors and BatchNormParams; deciding that a module is one of those is
the blocks' business, here.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..ops.batchnorm import is_frozen_bn


def is_timm(module: Optional[nn.Module], *names: str) -> bool:
    """The module's class is one of timm's called ``names`` (a class defined under ``timm.``; timm is not
    imported)."""
    t = type(module)
    return t.__name__ in names and t.__module__.startswith("timm.")


def is_supported_bn(module: Optional[nn.Module]) -> bool:
    """BatchNorm modules the fused ops reproduce exactly.

    nn.BatchNorm2d (and subclasses that do not override forward), resfast's SyncBatchNorm2d (whose process group
    the ops take along: :func:`as_bn_params`) and FrozenBatchNorm2d. torch's nn.SyncBatchNorm is excluded: the
    block runs it as a module.
    """
    if module is None:
        return False
    if isinstance(module, nn.SyncBatchNorm):
        return False
    if isinstance(module, nn.BatchNorm2d):
        from .sync_batchnorm import SyncBatchNorm2d  # (sync_batchnorm imports this module)

        return type(module).forward in (nn.BatchNorm2d.forward, SyncBatchNorm2d.forward)
    return is_frozen_bn(module)


def is_bn_relu(module: Optional[nn.Module]) -> bool:
    """timm's ``BatchNormAct2d`` whose activation is a plain ReLU: ``relu(bn(x))``, which the fused ops reproduce
    as a BatchNorm followed by a ReLU (:func:`as_bn_params` gives its BatchNorm part).

    Recognised by its exact class (a module under ``timm.``; timm is not imported), with ``.drop`` an
    nn.Identity and ``.act`` an nn.ReLU (in place or not). Its forward is a copy of nn.BatchNorm2d's (the same
    momentum / ``momentum=None`` / num_batches_tracked / track_running_stats rules, the same F.batch_norm call;
    checked against timm 1.0) followed by ``drop`` and ``act``; a subclass may change that, so it is not accepted.
    timm's SyncBatchNormAct is not a BatchNormAct2d (and is a SyncBatchNorm): excluded, as SyncBatchNorm is.
    resfast's SyncBatchNormAct2d (what :func:`resfast.convert_sync_batchnorm` makes of a BatchNormAct2d) is
    accepted on the same conditions.
    """
    from .sync_batchnorm import SyncBatchNormAct2d

    return (
        (type(module) is SyncBatchNormAct2d or is_timm(module, "BatchNormAct2d"))
        and isinstance(module, nn.BatchNorm2d)
        and not isinstance(module, nn.SyncBatchNorm)
        and type(getattr(module, "drop", None)) is nn.Identity
        and type(getattr(module, "act", None)) is nn.ReLU
    )


def fusable_conv(conv: Optional[nn.Module]) -> bool:
    """A plain nn.Conv2d with zero padding given as numbers (no 'same', no custom forward)."""
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def fusable_relu(act: Optional[nn.Module]) -> bool:
    return type(act) is nn.ReLU


def fusable(*pairs) -> bool:
    """True when every (conv, bn) pair is a plain conv and a supported BatchNorm."""
    return all(fusable_conv(c) and is_supported_bn(b) for c, b in pairs)
