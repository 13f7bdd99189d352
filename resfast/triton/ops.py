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

import os

import torch

from ..ops.batchnorm import resolve_bn
from ..ops.checks import needs_batch_stats

CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float32, torch.float64)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolutions run in: the autocast dtype where autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)  # autocast leaves float64 alone
    return x.dtype


def _grad_tensors(op: str, args) -> list:
    if op == "res2net_chain":
        ts = [args.x, *args.weights, *args.biases, *[t for bn in args.bns for t in (bn.weight, bn.bias)]]
    elif op == "scale_add_relu":
        ts = [args.x, args.gate, args.residual]
    else:
        ts = [args.x, args.weight, args.bias, args.residual, args.bn.weight, args.bn.bias]
        sc = args.shortcut if op == "conv_bn_relu" else None
        if sc is not None:
            ts += [sc.x, sc.weight, sc.bias, sc.bn.weight, sc.bn.bias]
    return [t for t in ts if t is not None]


def wants_grad(op: str, args) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in _grad_tensors(op, args))


def training_path(op: str, args) -> bool:
    """Whether the call needs the training ops: batch statistics somewhere, or gradients."""
    if op == "res2net_chain":
        bns = args.bns
    elif op == "scale_add_relu":
        bns = ()
    else:
        sc = args.shortcut if op == "conv_bn_relu" else None
        bns = (args.bn,) if sc is None else (args.bn, sc.bn)
    return any(needs_batch_stats(bn, args.training) for bn in bns) or wants_grad(op, args)


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
    # under autocast: eager normalises bn_relu_conv's input in its own dtype, the chain's pass-through split keeps
    # it (the cat promotes), and a residual add promotes to the residual's dtype; casting them first would round
    residual = getattr(args, "residual", None)
    kept = [(name, t.dtype) for name, t in (("input", x if op in ("bn_relu_conv", "res2net_chain") else None),
                                            ("residual", residual)) if t is not None and t.dtype != dtype]
    for name, dt in kept:
        reasons.append(f"under autocast the {name} is {dt}, not the autocast dtype {dtype}: eager keeps its "
                       "precision where the Triton kernels would round it")
    if op == "res2net_chain" and training_path(op, args):
        if len({needs_batch_stats(bn, args.training) for bn in args.bns}) > 1:
            reasons.append("the chain's BatchNorms mix batch and running statistics (the Triton chain takes one kind)")
        if len({bn.weight is None for bn in args.bns}) > 1 or len({bn.bias is None for bn in args.bns}) > 1:
            reasons.append("the chain's BatchNorms mix affine and non-affine (the Triton chain takes one kind)")
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


# ---------------------------------------------------------------------------------------------------------------
# training (and eval with gradients): the ops of training.py


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _bn_inputs(bn, training, dtype):
    """(resolved BatchNorm, mean_in, invstd_in): the statistics handed to a training op, None for batch statistics.
    resolve_bn increments num_batches_tracked, once per BatchNorm per forward, as nn.BatchNorm2d does."""
    r = resolve_bn(bn, training)
    if r.use_batch_stats:
        return r, None, None
    stat = _stat_dtype(dtype)
    return r, r.running_mean.detach().to(stat), (r.running_var.detach().to(stat) + r.eps).rsqrt()


def _update_running(r, mean, var, empty=False):
    """The running buffers' update; none for an empty batch (F.batch_norm leaves them alone then)."""
    if r.update_running and not empty:
        torch.ops.resfast_triton.bn_running_update(r.running_mean, r.running_var, mean, var, r.factor)


def _conv_bn_train(x, weight, bias, bn, training, stride, padding, dilation, groups, relu, residual, dtype):
    r, mean_in, invstd_in = _bn_inputs(bn, training, dtype)
    y, _, mean, _, var = torch.ops.resfast_triton.conv_bn_train(
        x.to(dtype), weight.to(dtype), _cast(bias, dtype), r.weight, r.bias, _cast(residual, dtype), mean_in,
        invstd_in, list(stride), list(padding), list(dilation), groups, relu, r.eps)
    _update_running(r, mean, var, x.numel() == 0)
    return y


def conv_bn_relu_train(args):
    from . import training  # noqa: F401  (registers the training ops)

    dtype = compute_dtype(args.x)
    residual = args.residual
    sc = args.shortcut
    if sc is not None:
        residual = _conv_bn_train(sc.x, sc.weight, sc.bias, sc.bn, args.training, sc.stride, (0, 0), (1, 1), 1,
                                  False, None, dtype)
    return _conv_bn_train(args.x, args.weight, args.bias, args.bn, args.training, args.stride, args.padding,
                          args.dilation, args.groups, args.relu, residual, dtype)


def bn_relu_conv_train(args):
    from . import training  # noqa: F401

    dtype = compute_dtype(args.x)
    r, mean_in, invstd_in = _bn_inputs(args.bn, args.training, dtype)
    y, mean, _, var = torch.ops.resfast_triton.bn_relu_conv_train(
        args.x.to(dtype), r.weight, r.bias, mean_in, invstd_in, args.weight.to(dtype), _cast(args.bias, dtype),
        _cast(args.residual, dtype), list(args.stride), list(args.padding), list(args.dilation), args.groups, r.eps)
    _update_running(r, mean, var, args.x.numel() == 0)
    return y


def res2net_chain_train(args):
    from . import training  # noqa: F401

    dtype = compute_dtype(args.x)
    resolved = [_bn_inputs(bn, args.training, dtype) for bn in args.bns]
    rs = [r for r, _, _ in resolved]
    given = bool(resolved) and resolved[0][1] is not None  # no conv at all: paper order with scale 1
    biases = []
    if any(b is not None for b in args.biases):  # a conv without bias among convs with one: a zero bias
        biases = [b.to(dtype) if b is not None else args.x.new_zeros(args.width, dtype=dtype) for b in args.biases]
    out, _, mean, _, var = torch.ops.resfast_triton.res2net_chain_train(
        args.x.to(dtype), [w.to(dtype) for w in args.weights], biases,
        [r.weight for r in rs] if rs and rs[0].weight is not None else [],
        [r.bias for r in rs] if rs and rs[0].bias is not None else [],
        torch.stack([m for _, m, _ in resolved]) if given else None,
        torch.stack([v for _, _, v in resolved]) if given else None,
        args.scale, args.stride, args.dilation, args.groups, args.order, args.block_type, [r.eps for r in rs])
    for k, r in enumerate(rs):
        _update_running(r, mean[k], var[k], args.x.numel() == 0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# inference


def conv_bn_relu(args):
    from . import library  # noqa: F401  (registers torch.ops.resfast_triton)

    if training_path("conv_bn_relu", args):
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

    if training_path("bn_relu_conv", args):
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

    if training_path("res2net_chain", args):
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


KERNELS = {"conv_bn_relu": conv_bn_relu, "bn_relu_conv": bn_relu_conv, "res2net_chain": res2net_chain,
           "scale_add_relu": scale_add_relu}
