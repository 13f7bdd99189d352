"""The Triton ops as dispatcher ops: ``torch.ops.resfast_triton.{conv_bn_relu, bn_relu_conv, res2net_chain,
scale_add_relu}``.

Registered with ``torch.library.triton_op`` (the launches go through ``wrap_triton`` on a GPU, common.launcher), so
torch.compile and torch.export see them. The fake implementation of each op is its own Python body: on
FakeTensors it allocates the channels_last outputs, with the strides the kernels write, and launches nothing.
The ops take weights already packed for the kernels, (kH, kW, C_in/groups, C_out), with eval BatchNorm's scale
folded in, and the folded shift as the bias (resfast.backends.triton.backend.packed_conv, cached by the calling
block); they are inference-only except scale_add_relu, whose backward is an op too (the training versions of the
others are in training.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ...ops._args import BLOCK_TYPES, ORDERS, chain_layout
from ...ops.autograd import bn_act_autograd
from .kernels import batchnorm
from .kernels.conv import Add, PassThrough, Projection, Prologue, conv_bn_act_fwd, interpreting, passthrough_fwd
from .kernels.scale_add_relu import scale_add_relu_bwd, scale_add_relu_fwd


def _check_folded(op: str, x: Tensor, weight: Tensor, groups: int, tensors: dict) -> None:
    """Clear errors for direct calls of the registered ops (the public ops check more, before dispatch).
    ``weight`` is packed: (kH, kW, C_in/groups, C_out)."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{op}: x and weight must be 4-D, got {x.dim()}-D and {weight.dim()}-D")
    if groups < 1 or x.shape[1] % groups or weight.shape[3] % groups or weight.shape[2] * groups != x.shape[1]:
        raise ValueError(f"{op}: packed weight {tuple(weight.shape)} (kH, kW, C_in/groups, C_out) with "
                         f"groups={groups} does not fit an input with {x.shape[1]} channels")
    for name, (t, n) in tensors.items():
        if t is not None and (t.dim() != 1 or t.shape[0] != n):
            raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
    for name, t in [("weight", weight)] + [(k, v[0]) for k, v in tensors.items()]:
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")


def _conv_bn_relu(x: Tensor, weight: Tensor, shift: Tensor, stride: list[int], padding: list[int],
                  dilation: list[int], groups: int, relu: bool, residual: Optional[Tensor],
                  shortcut_x: Optional[Tensor], shortcut_weight: Optional[Tensor],
                  shortcut_stride: list[int]) -> Tensor:
    """``relu(conv2d(x, weight) + shift + residual)`` (relu optional), the residual either given or the 1x1
    projection ``conv2d(shortcut_x, shortcut_weight, stride=shortcut_stride)`` computed in the same kernel.
    x (N, C_in, H, W) any strides; weight packed (kH, kW, C_in/groups, C_out) with BatchNorm's scale folded in;
    shift (C_out,) (BatchNorm's shift, conv bias, and the shortcut BatchNorm's shift); residual (N, C_out, H_out,
    W_out) or None; shortcut_weight packed (1, 1, C_in', C_out). Returns (N, C_out, H_out, W_out) channels_last."""
    op = "resfast_triton::conv_bn_relu"
    _check_folded(op, x, weight, groups, {"shift": (shift, weight.shape[3])})
    proj = None
    if (shortcut_x is None) != (shortcut_weight is None) or (shortcut_x is not None and residual is not None):
        raise ValueError(f"{op}: give shortcut_x and shortcut_weight together, and not with residual")
    if shortcut_x is not None:
        if shortcut_x.dim() != 4 or shortcut_x.device != x.device:
            raise ValueError(f"{op}: shortcut_x must be 4-D on {x.device}")
        proj = Projection(shortcut_x, shortcut_weight, tuple(shortcut_stride))
    return conv_bn_act_fwd(x, weight, shift, tuple(stride), tuple(padding), tuple(dilation), groups, residual, relu,
                           projection=proj)


def _bn_relu_conv(x: Tensor, pre_scale: Tensor, pre_shift: Tensor, weight: Tensor, bias: Optional[Tensor],
                    stride: list[int], padding: list[int], dilation: list[int], groups: int,
                    residual: Optional[Tensor]) -> Tensor:
    """``conv2d(relu(x * pre_scale + pre_shift), weight, bias) + residual``: pre_scale/pre_shift (C_in,) (eval
    BatchNorm folded), applied to the input tile as it is loaded; weight packed (kH, kW, C_in/groups, C_out).
    Returns (N, C_out, H_out, W_out) channels_last."""
    op = "resfast_triton::bn_relu_conv"
    _check_folded(op, x, weight, groups, {"pre_scale": (pre_scale, x.shape[1]), "pre_shift": (pre_shift, x.shape[1]),
                                          "bias": (bias, weight.shape[3])})
    b = (bias if bias is not None
         else torch.zeros(weight.shape[3], device=x.device, dtype=pre_scale.dtype))
    return conv_bn_act_fwd(x, weight, b, tuple(stride), tuple(padding), tuple(dilation), groups, residual,
                           relu=False, prologue=Prologue(pre_scale, pre_shift))


def _res2net_chain(x: Tensor, weights: list[Tensor], shifts: list[Tensor], scale: int, stride: int, dilation: int,
                   groups: int, order: str, block_type: str) -> Tensor:
    """Res2Net's split -> 3x3 conv -> folded BN -> ReLU chain (see resfast.ops.res2net_chain for the orders and
    block types): one packed (3, 3, width/groups, width) weight (BatchNorm's scale folded in) and (width,) shift per
    conv, in chain order.
    Returns (N, C, H_out, W_out) channels_last."""
    op = "resfast_triton::res2net_chain"
    if order not in ORDERS or block_type not in BLOCK_TYPES:
        raise ValueError(f"{op}: order must be one of {ORDERS} and block_type one of {BLOCK_TYPES}, "
                         f"got {order!r}, {block_type!r}")
    if x.dim() != 4 or scale < 1 or x.shape[1] % scale:
        raise ValueError(f"{op}: x must be (N, C, H, W) with C divisible by scale={scale}, got {tuple(x.shape)}")
    if stride < 1 or dilation < 1 or (block_type == "normal" and stride != 1):
        raise ValueError(f"{op}: stride and dilation must be >= 1 (stride 1 for 'normal' blocks), "
                         f"got {stride}, {dilation}")
    conv_splits, passthrough = chain_layout(scale, order)
    if not len(weights) == len(shifts) == len(conv_splits):
        raise ValueError(f"{op}: scale={scale}, order={order!r} needs {len(conv_splits)} weights and shifts, got "
                         f"{len(weights)}, {len(shifts)}")
    N, C, H, W = x.shape
    wd = C // scale if passthrough is not None else C
    for i, (w, sh) in enumerate(zip(weights, shifts)):
        if tuple(w.shape) != (3, 3, wd // groups if wd % groups == 0 else -1, wd):
            raise ValueError(f"{op}: weights[{i}] must be packed as (3, 3, {wd}/groups={groups}, {wd}), got "
                             f"{tuple(w.shape)}")
        _check_folded(op, x[:, :wd], w, groups, {f"shifts[{i}]": (sh, wd)})

    s, d = stride, dilation
    out = torch.empty((N, C, (H - 1) // s + 1, (W - 1) // s + 1), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)

    def split(t, i):
        return t if passthrough is None else t[:, i * wd:(i + 1) * wd]

    # the pass-through split rides on the first launch (extra programs), so the chain is scale - 1 launches
    pt = None if passthrough is None else PassThrough(split(x, passthrough), split(out, passthrough),
                                                      pool=block_type == "stage", stride=s)
    prev = None
    for w, sh, i in zip(weights, shifts, conv_splits):
        dst = split(out, i)
        add = Add(prev) if block_type == "normal" and prev is not None else None
        conv_bn_act_fwd(split(x, i), w, sh, (s, s), (d, d), (d, d), groups, relu=True, add=add, out=dst,
                        passthrough=pt)
        prev, pt = dst, None
    if pt is not None:  # no conv at all (paper order, scale 1): the pass-through alone, one launch
        passthrough_fwd(pt)
    return out


def _scale_add_relu(x: Tensor, gate: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """``relu(x * gate[n, c] + residual)`` (relu optional): x (N, C, H, W) any strides, gate (N, C), residual x's
    shape or None. Returns (N, C, H, W) channels_last."""
    op = "resfast_triton::scale_add_relu"
    if x.dim() != 4 or tuple(gate.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{op}: x must be 4-D and gate (N, C) = {tuple(x.shape[:2])}, got {tuple(x.shape)} and "
                         f"{tuple(gate.shape)}")
    if residual is not None and tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{op}: {name} must have x's dtype and device")
    return scale_add_relu_fwd(x, gate, residual, relu)


def _scale_add_relu_backward(dy: Tensor, x: Tensor, gate: Tensor, y: Optional[Tensor], need_dx: bool,
                             need_dgate: bool, need_dres: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgate, dresidual) of scale_add_relu; ``y`` its saved output (the ReLU's mask), None without the ReLU.
    Gradients not asked for come back empty."""
    return scale_add_relu_bwd(dy, x, gate, y, need_dx, need_dgate, need_dres)


def _scale_add_relu_setup(ctx, inputs, output):
    x, gate, residual, relu = inputs
    ctx.save_for_backward(x, gate, output if relu else None)
    ctx.has_res = residual is not None


def _scale_add_relu_grad(ctx, dy):
    x, gate, y = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_res and ctx.needs_input_grad[2])
    if not any(need):
        return None, None, None, None
    grads = torch.ops.resfast_triton.scale_add_relu_backward(dy, x, gate, y, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,)


def _bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """``relu(x * scale[c] + shift[c] + residual)`` by BatchNorm's apply kernel (a zero mean), in x's memory
    format (resfast.ops.bn_act has checked the arguments)."""
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
           else torch.contiguous_format)
    out = torch.empty_like(x, memory_format=fmt)
    return batchnorm.apply(x, torch.zeros_like(scale), scale, shift, residual, relu, out=out)


# the op bodies, also their fake implementations (FakeTensors: outputs allocated, nothing launched)
IMPLS = {"conv_bn_relu": _conv_bn_relu, "bn_relu_conv": _bn_relu_conv, "res2net_chain": _res2net_chain,
         "scale_add_relu": _scale_add_relu, "scale_add_relu_backward": _scale_add_relu_backward, "bn_act": _bn_act}
OPS = {name: triton_op(f"resfast_triton::{name}", fn, mutates_args=()) for name, fn in IMPLS.items()}
OPS["scale_add_relu"].register_autograd(_scale_add_relu_grad, setup_context=_scale_add_relu_setup)
_setup, _backward = bn_act_autograd("resfast_triton")
OPS["bn_act"].register_autograd(_backward, setup_context=_setup)


def _keep_opaque(mode, func, types, args, kwargs):
    return mode.__torch_dispatch__(func, types, args, kwargs)


if interpreting():
    # triton_op decomposes its op into the Python body when AOTAutograd functionalises (so Inductor sees the
    # kernels). Under TRITON_INTERPRET=1 the launches use the interpreted kernel itself (common.launcher), which
    # cannot run on the tracer's tensors, so the body would trace to allocations only; keep the op opaque there
    # instead (a graph node that runs the real op, traced through its fake implementation), as torch.export does.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for _op in OPS.values():
        _op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)


