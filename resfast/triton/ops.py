"""The Triton backend's op implementations (from prepared op arguments) and what they support.

So far, forward only, eval-mode BatchNorm (running statistics or FrozenBatchNorm2d):
``conv_bn_relu``, ``bn_relu_conv`` (BatchNorm + ReLU applied to the input tile as it is loaded), and
``res2net_chain`` (scale - 1 conv launches, each reading its split in place, adding the
previous split's output in its prologue and writing its channel slice of the output; the pass-through split is
copied or average-pooled into its slice by extra programs of the first launch). Training and backward come with
the Triton issues.

Each op is a dispatcher op, ``torch.ops.resfast_triton.<op>`` (library.py); ``KERNELS[op](prepared args)``, the
dispatch layer's entry point, folds eval BatchNorm into per-channel (scale, shift) and calls it. This module
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
    if op in ("conv_bn_relu", "bn_relu_conv"):
        if needs_batch_stats(args.bn, args.training):
            reasons.append("BatchNorm with batch statistics (training) is not implemented in the Triton backend yet")
        tensors = [t for t in (x, args.weight, args.bias, args.residual, args.bn.weight, args.bn.bias) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            reasons.append(f"the inputs require grad and the Triton {op} has no backward yet")
    return reasons


def fold_bn(bn, conv_bias, dtype, cache=None):
    """Eval BatchNorm folded to per-channel (scale, shift) (resfast.ops.fold), kept in the calling block's
    FoldCache when there is one. The weight packing itself still happens per launch (inside the op)."""
    from ..ops.fold import fold_scale_shift

    if cache is None:
        return fold_scale_shift(bn, conv_bias, dtype)
    sources = (conv_bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    return cache.get(("triton", id(bn.running_var), id(conv_bias)), sources,
                     lambda: fold_scale_shift(bn, conv_bias, dtype), (bn.eps, dtype))


def conv_bn_relu(args):
    from . import library  # noqa: F401  (registers torch.ops.resfast_triton)

    scale, shift = fold_bn(args.bn, args.bias, args.x.dtype, args.cache)
    return torch.ops.resfast_triton.conv_bn_relu(args.x, args.weight, scale, shift, list(args.stride),
                                                 list(args.padding), list(args.dilation), args.groups, args.relu,
                                                 args.residual)


def bn_relu_conv(args):
    from . import library  # noqa: F401

    scale, shift = fold_bn(args.bn, None, args.x.dtype, args.cache)
    return torch.ops.resfast_triton.bn_relu_conv(args.x, scale, shift, args.weight, args.bias, list(args.stride),
                                                 list(args.padding), list(args.dilation), args.groups,
                                                 args.residual)


def res2net_chain(args):
    from . import library  # noqa: F401

    folded = [fold_bn(bn, b, args.x.dtype, args.cache) for bn, b in zip(args.bns, args.biases)]
    return torch.ops.resfast_triton.res2net_chain(args.x, list(args.weights), [f[0] for f in folded],
                                                  [f[1] for f in folded], args.scale, args.stride, args.dilation,
                                                  args.groups, args.order, args.block_type)


KERNELS = {"conv_bn_relu": conv_bn_relu, "bn_relu_conv": bn_relu_conv, "res2net_chain": res2net_chain}
