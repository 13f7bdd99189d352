"""The Triton backend's op implementations (from prepared op arguments) and what they support.

So far, forward only, eval-mode BatchNorm (running statistics or FrozenBatchNorm2d):
``conv_bn_relu``, ``bn_relu_conv`` (BatchNorm + ReLU applied to the input tile as it is loaded), and
``res2net_chain`` (scale - 1 conv launches, each reading its split in place, adding the
previous split's output in its prologue and writing its channel slice of the output; the pass-through split is
copied or average-pooled into its slice by extra programs of the first launch). Training and backward come with
the Triton issues.
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


def fold_bn(bn, conv_bias, dtype):
    """Eval BatchNorm (running statistics) folded to per-channel (scale, shift), in the statistics' precision."""
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rv = bn.running_var.to(stat_dtype)
    scale = torch.rsqrt(rv + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(stat_dtype)
    shift = -bn.running_mean.to(stat_dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(stat_dtype)
    if conv_bias is not None:
        shift = shift + conv_bias.to(stat_dtype) * scale
    return scale, shift


def conv_bn_relu(args):
    from .conv import conv_bn_act_fwd, pack_weight

    scale, shift = fold_bn(args.bn, args.bias, args.x.dtype)
    w = pack_weight(args.weight.to(scale.dtype), scale).to(args.x.dtype)
    return conv_bn_act_fwd(args.x, w, shift, tuple(args.weight.shape[2:]), args.stride, args.padding,
                           args.dilation, args.groups, args.residual, args.relu)


def bn_relu_conv(args):
    from .conv import conv_bn_act_fwd, pack_weight

    scale, shift = fold_bn(args.bn, None, args.x.dtype)
    w = pack_weight(args.weight, torch.ones(args.weight.shape[0], device=args.weight.device,
                                            dtype=args.weight.dtype)).to(args.x.dtype)
    bias = (args.bias.to(scale.dtype) if args.bias is not None
            else torch.zeros(args.weight.shape[0], device=args.x.device, dtype=scale.dtype))
    return conv_bn_act_fwd(args.x, w, bias, tuple(args.weight.shape[2:]), args.stride, args.padding, args.dilation,
                           args.groups, args.residual, relu=False, pre_scale=scale, pre_shift=shift)


def res2net_chain(args):
    from .conv import PassThrough, conv_bn_act_fwd, pack_weight, passthrough_fwd

    x, wd, s, d = args.x, args.width, args.stride, args.dilation
    N, C, H, W = x.shape
    out = torch.empty((N, C, (H - 1) // s + 1, (W - 1) // s + 1), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    single = args.passthrough is None  # timm with scale == 1: one conv over the whole input

    def split(t, i):
        return t if single else t[:, i * wd:(i + 1) * wd]

    # the pass-through split rides on the first launch (extra programs), so the chain is scale - 1 launches
    pt = None if single else PassThrough(split(x, args.passthrough), split(out, args.passthrough),
                                         pool=args.block_type == "stage", stride=s)
    prev = None
    for w, b, bn, i in zip(args.weights, args.biases, args.bns, args.conv_splits):
        scale, shift = fold_bn(bn, b, x.dtype)
        wp = pack_weight(w.to(scale.dtype), scale).to(x.dtype)
        dst = split(out, i)
        add = prev if args.block_type == "normal" else None
        conv_bn_act_fwd(split(x, i), wp, shift, (3, 3), (s, s), (d, d), (d, d), args.groups, relu=True, add=add,
                        out=dst, passthrough=pt)
        prev, pt = dst, None
    if pt is not None:  # no conv at all (paper order, scale 1): the pass-through alone, one launch
        passthrough_fwd(pt)
    return out


KERNELS = {"conv_bn_relu": conv_bn_relu, "bn_relu_conv": bn_relu_conv, "res2net_chain": res2net_chain}
