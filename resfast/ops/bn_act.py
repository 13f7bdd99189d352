"""bn_act: ``relu(x * scale[c] + shift[c] + residual)`` in one pass, the C++/CUDA op ``resfast::bn_act``.

The elementwise half of every fused block (BatchNorm folded to a per-channel scale/shift, the residual add,
the ReLU). CPU and CUDA kernels live in csrc/; this module adds the checks, the fake (meta) implementation
for torch.compile, and autograd. Without resfast._C it computes the same thing with ATen ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from . import checks

OP = "resfast.bn_act"


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
    if _ext.C is None:
        return bn_act_ref(x, scale, shift, residual, relu)
    return torch.ops.resfast.bn_act(x, scale, shift, residual, relu)


def _register() -> None:
    if _ext.C is None:
        return

    @torch.library.register_fake("resfast::bn_act")
    def _(x, scale, shift, residual, relu):
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        return torch.empty_like(x, memory_format=fmt)

    def setup_context(ctx, inputs, output):
        x, scale, shift, residual, relu = inputs
        ctx.relu = relu
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, scale, output if relu else None)

    def backward(ctx, grad):
        x, scale, y = ctx.saved_tensors
        if ctx.relu:
            grad = grad * (y > 0).to(grad.dtype)  # ReLU's gradient: where the output is positive
        grad_x = grad * scale.reshape(1, -1, 1, 1)
        grad_scale = (grad * x).sum((0, 2, 3))
        grad_shift = grad.sum((0, 2, 3))
        return grad_x, grad_scale, grad_shift, (grad if ctx.has_residual else None), None

    torch.library.register_autograd("resfast::bn_act", backward, setup_context=setup_context)


_register()
