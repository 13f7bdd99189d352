"""The Triton backend's op implementations (from prepared op arguments) and what they support.

So far, forward only, eval-mode BatchNorm (running statistics or FrozenBatchNorm2d):
``conv_bn_relu`` (with a 1x1 projection shortcut as a second GEMM in the same kernel), ``bn_relu_conv``
(BatchNorm + ReLU applied to the input tile as it is loaded), and ``res2net_chain`` (scale - 1 conv launches,
each reading its split in place, adding the previous split's output in its prologue and writing its channel slice
of the output; the pass-through split is copied or average-pooled into its slice by extra programs of the first
launch). Training and backward come with
the Triton issues.

Each op is a dispatcher op, ``torch.ops.resfast_triton.<op>`` (library.py); ``KERNELS[op](prepared args)``, the
dispatch layer's entry point, folds eval BatchNorm into the weights, packs them for the kernels (both kept in the
calling block's FoldCache, so an eval forward re-packs nothing) and calls it. This module
imports triton only when a kernel runs, so the dispatch layer can ask input_reasons without it.
"""

from __future__ import annotations

import os

import torch

from ..ops.checks import needs_batch_stats

CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float32, torch.float64)


def input_reasons(op: str, args) -> list[str]:
    """Why the Triton implementation of `op` cannot take these prepared arguments (empty when it can)."""
    reasons = []
    x = args.x
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if x.device.type == "cuda":
        if x.dtype not in CUDA_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported by the Triton kernels on CUDA")
    elif x.device.type == "cpu" and interpret:
        if x.dtype not in INTERPRETER_DTYPES:
            reasons.append(f"dtype {x.dtype} is not supported under the Triton interpreter (float32/float64)")
    if op == "res2net_chain":
        if any(needs_batch_stats(bn, args.training) for bn in args.bns):
            reasons.append("BatchNorm with batch statistics (training) is not implemented in the Triton backend yet")
        tensors = [x, *args.weights, *[b for b in args.biases if b is not None],
                   *[t for bn in args.bns for t in (bn.weight, bn.bias) if t is not None]]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            reasons.append("the inputs require grad and the Triton res2net_chain has no backward yet")
    if op == "scale_add_relu":
        tensors = [t for t in (x, args.gate, args.residual) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            reasons.append("the inputs require grad and the Triton scale_add_relu has no backward yet")
    if op in ("conv_bn_relu", "bn_relu_conv"):
        sc = args.shortcut if op == "conv_bn_relu" else None
        if needs_batch_stats(args.bn, args.training) or (sc is not None and needs_batch_stats(sc.bn, args.training)):
            reasons.append("BatchNorm with batch statistics (training) is not implemented in the Triton backend yet")
        tensors = [t for t in (x, args.weight, args.bias, args.residual, args.bn.weight, args.bn.bias) if t is not None]
        if sc is not None:
            tensors += [t for t in (sc.x, sc.weight, sc.bias, sc.bn.weight, sc.bn.bias) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            reasons.append(f"the inputs require grad and the Triton {op} has no backward yet")
    return reasons


def _bn_sources(bn):
    return () if bn is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var)


def packed_conv(cache, weight, conv_bias, bn, dtype):
    """(packed weight (kH, kW, C_in/g, C_out) in ``dtype`` with eval ``bn``'s scale folded in, shift (C_out,) in
    float32/float64 with the conv bias and ``bn``'s shift folded in); ``bn`` None: the conv as it is. Kept in the
    calling block's FoldCache (resfast.ops.fold) when there is one, rebuilt when a source tensor changes."""
    from ..ops.fold import fold_scale_shift
    from .conv import pack_weight

    def build():
        if bn is None:
            stat = torch.float64 if dtype == torch.float64 else torch.float32
            shift = (conv_bias.to(stat) if conv_bias is not None
                     else torch.zeros(weight.shape[0], device=weight.device, dtype=stat))
            return pack_weight(weight, None, dtype), shift
        scale, shift = fold_scale_shift(bn, conv_bias, dtype)
        return pack_weight(weight, scale, dtype), shift

    if cache is None:
        with torch.no_grad():
            return build()
    return cache.get(("triton", id(weight)), (weight, conv_bias) + _bn_sources(bn), build,
                     (None if bn is None else bn.eps, dtype))


def pre_bn(cache, bn, dtype):
    """Eval BatchNorm as per-channel (scale, shift) for bn_relu_conv's prologue, cached like packed_conv."""
    from ..ops.fold import fold_scale_shift

    if cache is None:
        return fold_scale_shift(bn, None, dtype)
    return cache.get(("triton-pre", id(bn.running_var)), _bn_sources(bn), lambda: fold_scale_shift(bn, None, dtype),
                     (bn.eps, dtype))


def _packed_with_projection(args, dtype):
    """(main packed weight, shortcut packed weight, one bias with both BatchNorm shifts): one cache entry, so an
    eval forward adds no per-call work (not even the (C_out,) sum of the shifts)."""
    sc = args.shortcut

    def build():
        w, shift = packed_conv(None, args.weight, args.bias, args.bn, dtype)
        sw, s_shift = packed_conv(None, sc.weight, sc.bias, sc.bn, dtype)
        return w, sw, shift + s_shift

    if args.cache is None:
        with torch.no_grad():
            return build()
    sources = (args.weight, args.bias, *_bn_sources(args.bn), sc.weight, sc.bias, *_bn_sources(sc.bn))
    return args.cache.get(("triton-proj", id(args.weight), id(sc.weight)), sources, build,
                          (args.bn.eps, sc.bn.eps, dtype))


def conv_bn_relu(args):
    from . import library  # noqa: F401  (registers torch.ops.resfast_triton)

    dtype = args.x.dtype
    sx = sw = None
    s_stride = [1, 1]
    sc = args.shortcut
    if sc is None:
        w, shift = packed_conv(args.cache, args.weight, args.bias, args.bn, dtype)
    else:
        w, sw, shift = _packed_with_projection(args, dtype)
        sx, s_stride = sc.x, list(sc.stride)
    return torch.ops.resfast_triton.conv_bn_relu(args.x, w, shift, list(args.stride), list(args.padding),
                                                 list(args.dilation), args.groups, args.relu, args.residual,
                                                 sx, sw, s_stride)


def bn_relu_conv(args):
    from . import library  # noqa: F401

    dtype = args.x.dtype
    scale, shift = pre_bn(args.cache, args.bn, dtype)
    w, bias = packed_conv(args.cache, args.weight, args.bias, None, dtype)
    return torch.ops.resfast_triton.bn_relu_conv(args.x, scale, shift, w, bias, list(args.stride),
                                                 list(args.padding), list(args.dilation), args.groups,
                                                 args.residual)


def res2net_chain(args):
    from . import library  # noqa: F401

    packed = [packed_conv(args.cache, w, b, bn, args.x.dtype) for w, b, bn in zip(args.weights, args.biases, args.bns)]
    return torch.ops.resfast_triton.res2net_chain(args.x, [p[0] for p in packed], [p[1] for p in packed],
                                                  args.scale, args.stride, args.dilation, args.groups, args.order,
                                                  args.block_type)


def scale_add_relu(args):
    from . import library  # noqa: F401

    return torch.ops.resfast_triton.scale_add_relu(args.x, args.gate, args.residual, args.relu)


KERNELS = {"conv_bn_relu": conv_bn_relu, "bn_relu_conv": bn_relu_conv, "res2net_chain": res2net_chain,
           "scale_add_relu": scale_add_relu}
