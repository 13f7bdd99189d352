"""Training (and eval with gradients) through fused forward/backward op pairs: the forward glue every fused backend
shares, from prepared op arguments to one training op call of namespace ``ns`` plus the running buffers' update.

Two backends implement the same family of training ops, declared mirrors of each other (tests/test_training_mirrors.py
runs both on the same inputs): Triton (``torch.ops.resfast_triton``, resfast/backends/triton/training.py and
blocks.py) and the C++/CUDA extension (``torch.ops.resfast``, csrc/training.cpp, for CPU and CUDA tensors):

* ``conv_bn_train(x, w, b, gamma, beta, residual, mean_in, invstd_in, ...) -> (y, z, mean, invstd, var)``
* ``bn_relu_conv_train(x, gamma, beta, mean_in, invstd_in, w, b, residual, ...) -> (y, mean, invstd, var)``
* ``res2net_chain_train(x, ws, bs, gammas, betas, mean_in, invstd_in, ...) -> (out, Z, mean, invstd, var)``, where
  ``Z`` is one tensor of every raw conv output (Triton writes each conv's output into its slice) or a list of them
  (a cuDNN / oneDNN convolution allocates its own output);
* each with a ``*_backward`` op, ``bn_running_update`` and ``bn_relu_apply_`` (in place);
* Triton only: the whole-block ops ``res2net_bottleneck_train`` and ``preact_block_train`` (resfast/ops/bottleneck.py).

Here: nn.BatchNorm2d's rules at the op boundary (statistics in, running buffers updated after the op, exactly once
per BatchNorm per forward). What is saved for backward and the autograd wiring: autograd.py; activations rebuilt in
backward: recompute.py; the autocast dtype: dtypes.py.
"""

from __future__ import annotations

import torch

from .batchnorm import resolve_bn
from .dtypes import acc_dtype, compute_dtype

# ---------------------------------------------------------------------------------------------------------------
# forward glue: prepared op arguments -> one training op call (+ the running buffers' update)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _bn_inputs(bn, training, dtype):
    """(resolved BatchNorm, mean_in, invstd_in): the statistics handed to a training op, None for batch statistics.
    resolve_bn increments num_batches_tracked, once per BatchNorm per forward, as nn.BatchNorm2d does."""
    r = resolve_bn(bn, training)
    if r.use_batch_stats:
        return r, None, None
    stat = acc_dtype(dtype)
    return r, r.running_mean.detach().to(stat), (r.running_var.detach().to(stat) + r.eps).rsqrt()


def _update_running(ns, r, mean, var, empty=False):
    """The running buffers' update; none for an empty batch (F.batch_norm leaves them alone then)."""
    if r.update_running and not empty:
        ns.bn_running_update(r.running_mean, r.running_var, mean, var, r.factor)


def _conv_bn_train(ns, x, weight, bias, bn, training, stride, padding, dilation, groups, relu, residual, dtype):
    r, mean_in, invstd_in = _bn_inputs(bn, training, dtype)
    y, _, mean, _, var = ns.conv_bn_train(
        x.to(dtype), weight.to(dtype), _cast(bias, dtype), r.weight, r.bias, _cast(residual, dtype), mean_in,
        invstd_in, list(stride), list(padding), list(dilation), groups, relu, r.eps)
    _update_running(ns, r, mean, var, x.numel() == 0)
    return y


def conv_bn_relu_train(ns, args):
    """conv_bn_relu through ``ns.conv_bn_train`` (the projection shortcut is its own op, whose output is the
    main op's residual)."""
    dtype = compute_dtype(args.x)
    residual = args.residual
    sc = args.shortcut
    if sc is not None:
        residual = _conv_bn_train(ns, sc.x, sc.weight, sc.bias, sc.bn, args.training, sc.stride, (0, 0), (1, 1), 1,
                                  False, None, dtype)
    return _conv_bn_train(ns, args.x, args.weight, args.bias, args.bn, args.training, args.stride, args.padding,
                          args.dilation, args.groups, args.relu, residual, dtype)


def bn_relu_conv_train(ns, args):
    dtype = compute_dtype(args.x)
    r, mean_in, invstd_in = _bn_inputs(args.bn, args.training, dtype)
    y, mean, _, var = ns.bn_relu_conv_train(
        args.x.to(dtype), r.weight, r.bias, mean_in, invstd_in, args.weight.to(dtype), _cast(args.bias, dtype),
        _cast(args.residual, dtype), list(args.stride), list(args.padding), list(args.dilation), args.groups, r.eps)
    _update_running(ns, r, mean, var, args.x.numel() == 0)
    return y


def res2net_chain_train(ns, args):
    dtype = compute_dtype(args.x)
    resolved = [_bn_inputs(bn, args.training, dtype) for bn in args.bns]
    rs = [r for r, _, _ in resolved]
    given = bool(resolved) and resolved[0][1] is not None  # no conv at all: paper order with scale 1
    biases = []
    if any(b is not None for b in args.biases):  # a conv without bias among convs with one: a zero bias
        biases = [b.to(dtype) if b is not None else args.x.new_zeros(args.width, dtype=dtype) for b in args.biases]
    out, _, mean, _, var = ns.res2net_chain_train(
        args.x.to(dtype), [w.to(dtype) for w in args.weights], biases,
        [r.weight for r in rs] if rs and rs[0].weight is not None else [],
        [r.bias for r in rs] if rs and rs[0].bias is not None else [],
        torch.stack([m for _, m, _ in resolved]) if given else None,
        torch.stack([v for _, _, v in resolved]) if given else None,
        args.scale, args.stride, args.dilation, args.groups, args.order, args.block_type, [r.eps for r in rs])
    for k, r in enumerate(rs):
        _update_running(ns, r, mean[k], var[k], args.x.numel() == 0)
    return out


def res2net_bottleneck_train(ns, args):
    """res2net_bottleneck_train through ``ns.res2net_bottleneck_train`` (prepared arguments: bottleneck.py)."""
    x = args.x
    rs = [resolve_bn(bn, True) for bn in (args.bn1, *args.bns, args.bn3)]
    y, _, _, _, stats = ns.res2net_bottleneck_train(
        x, args.w1.to(x.dtype), rs[0].weight, rs[0].bias, [w.to(x.dtype) for w in args.weights],
        [r.weight for r in rs[1:-1]], [r.bias for r in rs[1:-1]], args.w3.to(x.dtype), rs[-1].weight,
        rs[-1].bias, args.residual, args.scale, args.stride, args.dilation, args.groups, args.order,
        args.block_type, [r.eps for r in rs])
    _update_running_rows(ns, rs, stats)
    return y


def preact_block_train(ns, args):
    """preact_block_train through ``ns.preact_block_train`` (prepared arguments: bottleneck.py)."""
    x = args.x
    rs = [resolve_bn(bn, True) for bn in args.bns]
    y, _, stats = ns.preact_block_train(
        x, [w.to(x.dtype) for w in args.weights], [r.weight for r in rs], [r.bias for r in rs], list(args.geometry),
        args.w_ds.to(x.dtype) if args.w_ds is not None else None, list(args.ds_stride), args.residual,
        [r.eps for r in rs])
    _update_running_rows(ns, rs, stats)
    return y


def _update_running_rows(ns, rs, stats):
    """The running buffers of the BatchNorms ``rs``, whose (mean, _, var) rows are consecutive in ``stats``."""
    lo = 0
    for r in rs:
        C = r.weight.shape[0]
        _update_running(ns, r, stats[0, lo:lo + C], stats[2, lo:lo + C])
        lo += C
