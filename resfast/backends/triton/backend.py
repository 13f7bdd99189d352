"""The Triton backend's op implementations (from prepared op arguments) and what they support.

Eval BatchNorm without gradients (inference): ``conv_bn_relu`` (with a 1x1 projection shortcut as a second GEMM in
the same kernel), ``bn_relu_conv`` (BatchNorm + ReLU applied to the input tile as it is loaded), and
``res2net_chain`` (scale - 1 conv launches, each reading its split in place, adding the previous split's output in
its prologue and writing its channel slice of the output; the pass-through split is copied or average-pooled into
its slice by extra programs of the first launch), with the BatchNorm folded into packed weights kept in the calling
block's FoldCache, so an eval forward re-packs nothing (library.py).

Training BatchNorm (batch statistics, running buffers updated exactly as nn.BatchNorm2d), or any call whose inputs
require grad: the training ops of training.py, with their backward ops wired to autograd. The projection shortcut
is then its own conv + BatchNorm op whose output is the main op's residual. ``scale_add_relu`` has its backward op
registered with it (library.py).

Under ``torch.autocast`` the convolutions run in the autocast dtype (inputs, weights, biases and residuals cast to
it, as F.conv2d would be), BatchNorm statistics and parameters stay fp32.
This module imports triton only when a kernel runs, so the dispatch layer can ask input_reasons without it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...ops import training as ops_training
from ...ops.dispatch import BLOCK_OPS, Backend, read_verified_ops
from ...ops.dtypes import acc_dtype, compute_dtype
from ...ops.fold import FoldCache, fold_scale_shift
from ...ops.precision import precision_reasons, training_path

CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float32, torch.float64)


def input_reasons(op: str, args) -> list[str]:
    """Why the Triton implementation of `op` cannot take these prepared arguments (empty when it can)."""
    reasons = []
    x = args.x
    dtype = compute_dtype(x)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if x.device.type == "cuda":
        if dtype not in CUDA_DTYPES:
            reasons.append(f"dtype {dtype} is not supported by the Triton kernels on CUDA")
    elif x.device.type == "cpu" and interpret:
        if dtype not in INTERPRETER_DTYPES:
            reasons.append(f"dtype {dtype} is not supported under the Triton interpreter (float32/float64)")
    reasons += precision_reasons(args, dtype)
    return reasons


def _bn_sources(bn):
    return () if bn is None else (bn.weight, bn.bias, bn.running_mean, bn.running_var)


def packed_conv(cache, weight, conv_bias, bn, dtype):
    """(packed weight (kH, kW, C_in/g, C_out) in ``dtype`` with eval ``bn``'s scale folded in, shift (C_out,) in
    float32/float64 with the conv bias and ``bn``'s shift folded in); ``bn`` None: the conv as it is. Kept in the
    calling block's FoldCache (resfast.ops.fold) when there is one, rebuilt when a source tensor changes."""
    from .kernels.conv import pack_weight

    def build():
        if bn is None:
            stat = acc_dtype(dtype)
            shift = (conv_bias.to(stat) if conv_bias is not None
                     else torch.zeros(weight.shape[0], device=weight.device, dtype=stat))
            return pack_weight(weight, None, dtype), shift
        scale, shift = fold_scale_shift(bn, conv_bias, dtype)
        return pack_weight(weight, scale, dtype), shift

    return FoldCache.get_or_build(cache, ("triton", id(weight)), (weight, conv_bias) + _bn_sources(bn), build,
                                  (None if bn is None else bn.eps, dtype))


def pre_bn(cache, bn, dtype):
    """Eval BatchNorm as per-channel (scale, shift) for bn_relu_conv's prologue, cached like packed_conv."""

    return FoldCache.get_or_build(cache, ("triton-pre", id(bn.running_var)), _bn_sources(bn),
                                  lambda: fold_scale_shift(bn, None, dtype), (bn.eps, dtype))


def _packed_with_projection(args, dtype):
    """(main packed weight, shortcut packed weight, one bias with both BatchNorm shifts): one cache entry, so an
    eval forward adds no per-call work (not even the (C_out,) sum of the shifts)."""
    sc = args.shortcut

    def build():
        w, shift = packed_conv(None, args.weight, args.bias, args.bn, dtype)
        sw, s_shift = packed_conv(None, sc.weight, sc.bias, sc.bn, dtype)
        return w, sw, shift + s_shift

    sources = (args.weight, args.bias, *_bn_sources(args.bn), sc.weight, sc.bias, *_bn_sources(sc.bn))
    return FoldCache.get_or_build(args.cache, ("triton-proj", id(args.weight), id(sc.weight)), sources, build,
                                  (args.bn.eps, sc.bn.eps, dtype))


# ---------------------------------------------------------------------------------------------------------------
# training (and eval with gradients): the ops of training.py


def conv_bn_relu_train(args):
    from . import training  # noqa: F401  (registers the training ops)

    return ops_training.conv_bn_relu_train(torch.ops.resfast_triton, args)


def bn_relu_conv_train(args):
    from . import training  # noqa: F401

    return ops_training.bn_relu_conv_train(torch.ops.resfast_triton, args)


def res2net_chain_train(args):
    from . import training  # noqa: F401

    return ops_training.res2net_chain_train(torch.ops.resfast_triton, args)


# ---------------------------------------------------------------------------------------------------------------
# inference


def conv_bn_relu(args):
    from . import library  # noqa: F401  (registers torch.ops.resfast_triton)

    if training_path(args):
        return conv_bn_relu_train(args)
    args = _autocast_inputs(args)
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

    if training_path(args):
        return bn_relu_conv_train(args)
    args = _autocast_inputs(args)
    dtype = args.x.dtype
    scale, shift = pre_bn(args.cache, args.bn, dtype)
    w, bias = packed_conv(args.cache, args.weight, args.bias, None, dtype)
    return torch.ops.resfast_triton.bn_relu_conv(args.x, scale, shift, w, bias, list(args.stride),
                                                 list(args.padding), list(args.dilation), args.groups,
                                                 args.residual)


def res2net_chain(args):
    from . import library  # noqa: F401

    if training_path(args):
        return res2net_chain_train(args)
    args = _autocast_inputs(args)
    packed = [packed_conv(args.cache, w, b, bn, args.x.dtype) for w, b, bn in zip(args.weights, args.biases, args.bns)]
    return torch.ops.resfast_triton.res2net_chain(args.x, [p[0] for p in packed], [p[1] for p in packed],
                                                  args.scale, args.stride, args.dilation, args.groups, args.order,
                                                  args.block_type)


def _autocast_inputs(args):
    """Under autocast, the activations in the autocast dtype (the packed weights follow x's dtype)."""
    dtype = compute_dtype(args.x)
    if dtype == args.x.dtype:
        return args
    fields = {"x": args.x.to(dtype)}
    if getattr(args, "residual", None) is not None:
        fields["residual"] = args.residual.to(dtype)
    sc = getattr(args, "shortcut", None)
    if sc is not None:
        fields["shortcut"] = sc._replace(x=sc.x.to(dtype))
    return args._replace(**fields)


def scale_add_relu(args):
    from . import library  # noqa: F401

    return torch.ops.resfast_triton.scale_add_relu(args.x, args.gate, args.residual, args.relu)


def bn_act(args):
    from . import library  # noqa: F401

    return torch.ops.resfast_triton.bn_act(args.x, args.scale, args.shift, args.residual, args.relu)


def res2net_bottleneck_train(args):
    from . import blocks  # noqa: F401  (registers the whole-block ops)

    return ops_training.res2net_bottleneck_train(torch.ops.resfast_triton, args)


def preact_block_train(args):
    from . import blocks  # noqa: F401

    return ops_training.preact_block_train(torch.ops.resfast_triton, args)


KERNELS = {"conv_bn_relu": conv_bn_relu, "bn_relu_conv": bn_relu_conv, "res2net_chain": res2net_chain,
           "scale_add_relu": scale_add_relu, "bn_act": bn_act, "res2net_bottleneck_train": res2net_bottleneck_train,
           "preact_block_train": preact_block_train}


class TritonBackend(Backend):
    name = "triton"
    # ops with a Triton implementation (KERNELS below; triton is imported on first use, not at `import resfast`)
    implemented = ("conv_bn_relu", "bn_relu_conv", "res2net_chain", "scale_add_relu", "bn_act")
    block_ops = BLOCK_OPS  # the whole-block training ops (blocks.py)
    # Kernels tested only under TRITON_INTERPRET=1 so far: `auto` does not pick an op until it has been verified on
    # a GPU (verified_ops: resfast/ops/gpu_verified.json); an explicit `resfast.backend("triton")` does.
    verified_ops = read_verified_ops("triton")
    verified_on_gpu = set(implemented) <= set(verified_ops)

    def _static_reasons(self, op):
        reasons = []
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install triton)")
        if op not in self.implemented + self.block_ops:
            reasons.append(f"no Triton kernel is implemented for {op} yet")
        return reasons

    def environment_reasons(self):
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ["no CUDA device is visible and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on "
                    "CPU tensors)"]
        return []

    def auto_reasons(self, op):
        return [] if self.verified_on_gpu or op in self.verified_ops else [
            "the Triton kernels are not verified on a GPU yet: auto does not use them; select backend 'triton'"]

    def _input_reasons(self, op, args):
        dev = args.x.device.type
        if dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ["the input is on the CPU; Triton runs on CUDA devices, or on the CPU with TRITON_INTERPRET=1"]
        if dev not in ("cpu", "cuda"):
            return [f"the input is on {dev}; Triton runs on CUDA devices"]
        if op not in self.implemented + self.block_ops:
            return []
        return input_reasons(op, args)

    def run(self, op, args):
        return KERNELS[op](args)
