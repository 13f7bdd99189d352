"""The `cpu` backend: resfast._C's CPU kernels (csrc/cpu/conv_eval.cpp) for eval-mode blocks.

BatchNorm is folded into the conv weights and bias (cached by the block: :mod:`resfast.ops.fold`); for
float32/bfloat16 with oneDNN the folded weights are also prepacked for oneDNN, once, with
``mkldnn::_reorder_convolution_weight`` (as inductor's frozen graphs do), and the convolutions run through
oneDNN with the ReLU and the residual add as post-ops applied while the output is written.
``res2net_chain`` is one op call (``resfast::res2net_chain_folded``) writing every split into its slice of one
output. ``bn_relu_conv`` applies BN + ReLU with ``resfast::bn_act`` and then the conv.

So far: inference only (BatchNorm with running statistics, no autograd); training runs on `eager`.
This module also registers the fake (meta) implementations of the C++ ops, so torch.compile can trace them.
"""

from __future__ import annotations

import torch

from .. import _ext
from .checks import needs_batch_stats
from .fold import FoldCache, fold_conv_bn, fold_scale_shift

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CPP_OPS = ("conv_bias_act", "res2net_chain_folded", "bn_act")


def missing_ops() -> list[str]:
    """C++ ops this backend needs that the loaded resfast._C does not register (an older build)."""
    if _ext.C is None:
        return list(CPP_OPS)
    return [op for op in CPP_OPS if not hasattr(torch.ops.resfast, op)]


def input_reasons(op: str, args) -> list[str]:
    """Why the `cpu` backend cannot run `op` on these prepared arguments (empty when it can)."""
    if op not in KERNELS:
        return []  # the static reason says it all
    reasons = []
    x = args.x
    if x.device.type != "cpu":
        return [f"the input is on {x.device.type}; the cpu backend takes CPU tensors"]
    if x.dtype not in CPU_DTYPES:
        reasons.append(f"dtype {x.dtype} is not supported by the cpu backend (float32, float64, bfloat16)")
    bns = args.bns if op == "res2net_chain" else (args.bn,)
    if op == "conv_bn_relu" and args.shortcut is not None:
        bns += (args.shortcut.bn,)
    if any(needs_batch_stats(bn, args.training) for bn in bns):
        reasons.append("BatchNorm with batch statistics (training) is not implemented in the cpu backend yet")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in _tensors(op, args)):
        reasons.append(f"the inputs require grad and the cpu backend's {op} has no backward yet")
    return reasons


def _tensors(op, args):
    if op == "res2net_chain":
        return [args.x, *args.weights, *args.biases, *[t for bn in args.bns for t in (bn.weight, bn.bias)]]
    tensors = [args.x, args.weight, args.bias, args.residual, args.bn.weight, args.bn.bias]
    if op == "conv_bn_relu" and args.shortcut is not None:
        s = args.shortcut
        tensors += [s.x, s.weight, s.bias, s.bn.weight, s.bn.bias]
    return tensors


_MKLDNN = torch.backends.mkldnn.is_available()


def _packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs the convs of this dtype, so the folded weights are worth prepacking. Not while
    torch.compile traces: the folding is then part of the graph, and packed oneDNN tensors have no fake."""
    if torch.compiler.is_compiling():
        return False
    return dtype in (torch.float32, torch.bfloat16) and _MKLDNN and torch.backends.mkldnn.enabled


def _folded_conv(cache: FoldCache | None, x, weight, conv_bias, bn, stride, padding, dilation, groups):
    """(weight, bias) of the conv with `bn` folded in (`bn` None: the conv as it is), in x's dtype, prepacked for
    oneDNN where oneDNN runs it; cached in the block's `cache` when there is one."""
    pack = _packs(x.dtype)

    def build():
        if bn is None:
            w, b = weight.to(x.dtype), None if conv_bias is None else conv_bias.to(x.dtype)
        else:
            w, b = fold_conv_bn(weight, conv_bias, bn, x.dtype)
        if pack:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                w.contiguous(), list(padding), list(stride), list(dilation), groups, list(x.shape))
        return w, b

    if cache is None:
        with torch.no_grad():
            return build()
    sources = (weight, conv_bias) + (() if bn is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    extra = (None if bn is None else bn.eps, x.dtype, pack, tuple(x.shape) if pack else None, tuple(stride),
             tuple(padding), tuple(dilation), groups)
    return cache.get(("cpu", id(weight)), sources, build, extra)


def _conv(args, x, w, b, relu, residual=None):
    return torch.ops.resfast.conv_bias_act(x, w, b, list(args.stride), list(args.padding), list(args.dilation),
                                           args.groups, residual, relu)


def conv_bn_relu(args):
    residual = args.residual
    s = args.shortcut
    if s is not None:  # the projection shortcut first: its output is the main conv's residual post-op
        ws, bs = _folded_conv(args.cache, s.x, s.weight, s.bias, s.bn, s.stride, (0, 0), (1, 1), 1)
        residual = torch.ops.resfast.conv_bias_act(s.x, ws, bs, list(s.stride), [0, 0], [1, 1], 1, None, False)
    w, b = _folded_conv(args.cache, args.x, args.weight, args.bias, args.bn, args.stride, args.padding,
                        args.dilation, args.groups)
    return _conv(args, args.x, w, b, args.relu, residual)


def bn_relu_conv(args):
    x = args.x
    scale, shift = fold_scale_shift(args.bn, None, x.dtype)
    a = torch.ops.resfast.bn_act(x, scale.to(x.dtype), shift.to(x.dtype), None, True)
    w, b = _folded_conv(args.cache, a, args.weight, args.bias, None, args.stride, args.padding, args.dilation,
                        args.groups)
    return _conv(args, a, w, b, False, args.residual)


def res2net_chain(args):
    x = args.x
    if not args.weights:  # paper order with scale 1: the input passes through, nothing to fuse
        from .reference import EAGER_IMPLS

        return EAGER_IMPLS["res2net_chain"](args)
    s, d = (args.stride,) * 2, (args.dilation,) * 2
    folded = [_folded_conv(args.cache, x.narrow(1, 0, w.shape[1] * args.groups), w, b, bn, s, d, d, args.groups)
              for w, b, bn in zip(args.weights, args.biases, args.bns)]
    return torch.ops.resfast.res2net_chain_folded(
        x, [w for w, _ in folded], [b for _, b in folded], args.width, args.stride, args.dilation, args.groups,
        args.block_type, list(args.conv_splits), -1 if args.passthrough is None else args.passthrough)


KERNELS = {"conv_bn_relu": conv_bn_relu, "bn_relu_conv": bn_relu_conv, "res2net_chain": res2net_chain}


def _out_hw(h, w, k, stride, padding, dilation):
    return ((h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1)


def _layout(x):
    return (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format)


def _register_fakes() -> None:
    if _ext.C is None or missing_ops():
        return

    @torch.library.register_fake("resfast::conv_bias_act")
    def _(x, weight, bias, stride, padding, dilation, groups, residual, relu):
        oh, ow = _out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
        return x.new_empty((x.shape[0], weight.shape[0], oh, ow)).contiguous(memory_format=_layout(x))

    @torch.library.register_fake("resfast::res2net_chain_folded")
    def _(x, weights, biases, width, stride, dilation, groups, block_type, conv_splits, passthrough):
        oh, ow = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1
        return x.new_empty((x.shape[0], x.shape[1], oh, ow)).contiguous(memory_format=_layout(x))


_register_fakes()
