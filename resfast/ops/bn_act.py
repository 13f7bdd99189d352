"""bn_act: ``relu(x * scale[c] + shift[c] + residual)`` in one pass.

The elementwise half of every fused block (BatchNorm folded to a per-channel scale/shift, the residual add,
the ReLU). Dispatched like every op: the cpu and cuda backends run the C++/CUDA op ``resfast::bn_act``
(csrc/, its fake and autograd in resfast/backends/cpp.py), the eager backend :func:`bn_act_ref`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import checks, dispatch
from .batchnorm import BatchNormParams

OP = "resfast.bn_act"


class BnActArgs(NamedTuple):
    x: Tensor
    scale: Tensor
    shift: Tensor
    residual: Optional[Tensor]
    relu: bool

    op = "bn_act"
    keeps_input_precision = False
    training = False

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return ()

    def grad_tensors(self) -> list[Tensor]:
        return [t for t in (self.x, self.scale, self.shift, self.residual) if t is not None]


def bn_act_ref(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """Eager reference of :func:`bn_act`."""
    y = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``relu(x * scale[c] + shift[c] + residual)`` for x (N, C, H, W) NCHW or channels_last; scale, shift (C,).

    Returns a tensor in x's memory format. Differentiable in x, scale, shift and residual.
    """
    checks.check_input(OP, x)
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != x.shape[1]:
            raise ValueError(f"{OP}: {name} must have shape ({x.shape[1]},), got {getattr(t, 'shape', t)}")
        checks.check_same(OP, x, t, name)
    if residual is not None:
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"{OP}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        checks.check_same(OP, x, residual, "residual")
    args = BnActArgs(x, scale, shift, residual, relu)
    return dispatch.select("bn_act", args).run("bn_act", args)


dispatch.define("bn_act", lambda a: bn_act_ref(a.x, a.scale, a.shift, a.residual, a.relu))

