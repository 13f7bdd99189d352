"""Autograd of the fused training ops: setup_context / backward pairs for ``register_autograd``, one per op family,
shared by every backend's namespace (``ns``: "resfast" or "resfast_triton", whose backward ops are looked up when
the backward runs). What each op saves: raw conv outputs and per-channel statistics; normalised activations are
recomputed (inside a recompute scope, recompute.py, also those one op passes to the next)."""

from __future__ import annotations

import torch

from .recompute import _bn_relu_source, _chain_out_source, _load, _save, _source


def _ops(ns: str):
    return getattr(torch.ops, ns)


def _no_zero_grads(ctx):
    """Outputs that only serve backward (raw conv outputs, statistics) never receive a gradient: without this,
    autograd would materialise a zero tensor of each one's size (a whole activation) for every backward call."""
    ctx.set_materialize_grads(False)


def _grad_or_zeros(g, like):
    """The differentiable output's gradient; None only when autograd had none for it either. `like`: the output,
    or its (shape, dtype, device)."""
    if g is not None:
        return g
    shape, dtype, device = (like.shape, like.dtype, like.device) if isinstance(like, torch.Tensor) else like
    return torch.zeros(shape, dtype=dtype, device=device)


def conv_bn_autograd(ns: str):
    def setup(ctx, inputs, output):
        x, weight, bias, gamma, beta, residual, mean_in, invstd_in, stride, padding, dilation, groups, relu, _ = inputs
        y, z, mean, invstd, _ = output
        _no_zero_grads(ctx)
        y_src = None
        if relu:  # the ReLU mask's source: y itself, or (no residual, in a recompute scope) a rebuild of it from z
            y_src = _bn_relu_source(ns, y, z, mean, invstd, gamma, beta) if residual is None else y
        _save(ctx, _source(x), weight, z, y_src, gamma, mean, invstd)
        ctx.hyper = (stride, padding, dilation, groups, mean_in is None, bias is not None)

    def backward(ctx, dy, dz_, dmean, dinvstd, dvar):
        x, weight, z, y, gamma, mean, invstd = _load(ctx)
        dy = _grad_or_zeros(dy, z)  # y has z's shape and dtype
        stride, padding, dilation, groups, batch_stats, has_bias = ctx.hyper
        n = ctx.needs_input_grad
        need = [n[0], n[1], has_bias and n[2], gamma is not None and n[3], n[4], n[5]]
        if not any(need):
            return (None,) * 14
        g = _ops(ns).conv_bn_train_backward(dy, x, weight, z, y, gamma, mean, invstd, stride, padding, dilation,
                                            groups, batch_stats, has_bias, need)
        return tuple(t if want else None for t, want in zip(g, need)) + (None,) * 8

    return setup, backward


def bn_relu_conv_autograd(ns: str):
    def setup(ctx, inputs, output):
        x, gamma, beta, mean_in, invstd_in, weight, bias, residual, stride, padding, dilation, groups, eps = inputs
        y, mean, invstd, _ = output
        _no_zero_grads(ctx)
        ctx.y_meta = (y.shape, y.dtype, y.device)  # for a missing grad (the output itself is not saved)
        _save(ctx, _source(x), gamma, beta, mean, invstd, weight)
        ctx.hyper = (stride, padding, dilation, groups, mean_in is None, bias is not None)

    def backward(ctx, dy, dmean, dinvstd, dvar):
        x, gamma, beta, mean, invstd, weight = _load(ctx)
        dy = _grad_or_zeros(dy, ctx.y_meta)
        stride, padding, dilation, groups, batch_stats, has_bias = ctx.hyper
        n = ctx.needs_input_grad
        need = [n[0], gamma is not None and n[1], beta is not None and n[2], n[5], has_bias and n[6]]
        g = [None] * 5
        if any(need):
            g = _ops(ns).bn_relu_conv_train_backward(dy, x, gamma, beta, mean, invstd, weight, stride, padding,
                                                     dilation, groups, batch_stats, has_bias, need)
        dx, dgamma, dbeta, dw, db = (t if want else None for t, want in zip(g, need))
        return dx, dgamma, dbeta, None, None, dw, db, (dy if n[7] else None), None, None, None, None, None

    return setup, backward


def _wants(ts) -> list[bool]:
    return [t.requires_grad for t in ts]


def chain_autograd(ns: str):
    def setup(ctx, inputs, output):
        (x, weights, biases, gammas, betas, mean_in, invstd_in, scale, stride, dilation, groups, order, block_type,
         eps) = inputs
        out, Z, mean, invstd, _ = output
        _no_zero_grads(ctx)
        zs = list(Z) if isinstance(Z, (list, tuple)) else [Z]
        x_src = _source(x)
        out_src = _chain_out_source(ns, out, x_src, zs, mean, invstd, gammas, betas, scale, stride, order, block_type)
        _save(ctx, x_src, out_src, mean, invstd, *zs, *weights, *gammas)
        ctx.hyper = (len(zs), isinstance(Z, (list, tuple)), len(weights), scale, stride, dilation, groups, order,
                     block_type, mean_in is None, bool(biases))
        # which inputs want gradients (needs_input_grad flattens the lists in a way not worth relying on)
        ctx.wants = (x.requires_grad, _wants(weights), _wants(biases), _wants(gammas), _wants(betas))

    def backward(ctx, dout, dZ, dmean, dinvstd, dvar):
        n_z, z_list, S, scale, stride, dilation, groups, order, block_type, batch_stats, has_bias = ctx.hyper
        x, out, mean, invstd, *rest = _load(ctx)
        dout = _grad_or_zeros(dout, out)
        zs, weights, gammas = rest[:n_z], rest[n_z:n_z + S], rest[n_z + S:]
        nx, nw, nb, ng, nbeta = ctx.wants
        need = (nx, any(nw), any(nb), any(ng), any(nbeta))
        # mean_in, invstd_in, scale, stride, dilation, groups, order, block_type, eps (an empty list of floats is a
        # list node of the inputs' structure, a non-empty one a leaf: the returned structure must match it)
        none_after = (None,) * 8 + ([] if S == 0 else None,)
        if not any(need):
            return (None, [None] * len(nw), [None] * len(nb), [None] * len(ng), [None] * len(nbeta)) + none_after
        dx, dws, dbs, dgs, dbetas = _ops(ns).res2net_chain_train_backward(
            dout, x, out, list(zs) if z_list else zs[0], list(weights), list(gammas), mean, invstd, scale, stride,
            dilation, groups, order, block_type, batch_stats, has_bias, *need)

        def pick(grads, wanted):
            return [g if w else None for g, w in zip(grads, wanted)]

        return (dx if nx else None, pick(dws, nw), pick(dbs, nb), pick(dgs, ng), pick(dbetas, nbeta)) + none_after

    return setup, backward


def bottleneck_autograd(ns: str):
    """res2net_bottleneck_train: saves x, the weights, gammas and betas, y, the raw conv outputs (z1, Zc, z3) and the
    statistics; its backward op rebuilds the normalised activations (relu(bn1(z1)) and the chain's output)."""

    def setup(ctx, inputs, output):
        (x, w1, gamma1, beta1, weights, gammas, betas, w3, gamma3, beta3, residual, scale, stride, dilation, groups,
         order, block_type, eps) = inputs
        y, z1, Zc, z3, stats = output
        _no_zero_grads(ctx)
        ctx.save_for_backward(x, w1, gamma1, beta1, w3, gamma3, y, z1, Zc, z3, stats, *weights, *gammas, *betas)
        ctx.hyper = (len(weights), scale, stride, dilation, groups, order, block_type, residual is not None)

    def backward(ctx, dy, dz1, dZc, dz3, dstats):
        S, scale, stride, dilation, groups, order, block_type, has_res = ctx.hyper
        x, w1, gamma1, beta1, w3, gamma3, y, z1, Zc, z3, stats, *rest = ctx.saved_tensors
        weights, gammas, betas = rest[:S], rest[S:2 * S], rest[2 * S:]
        dy = _grad_or_zeros(dy, y)
        n = ctx.needs_input_grad
        need_dx, need_dres = n[0], has_res and n[10]
        g = _ops(ns).res2net_bottleneck_train_backward(
            dy, x, w1, gamma1, beta1, list(weights), list(gammas), list(betas), w3, gamma3, y, z1, Zc, z3, stats,
            scale, stride, dilation, groups, order, block_type, need_dx, need_dres)
        dx, dw1, dg1, db1, dws, dgs, dbs, dw3, dg3, db3, dres = g
        # parameters' gradients are always computed (cheap next to the convs' data gradients); autograd drops the
        # ones nobody asked for
        return (dx if need_dx else None, dw1, dg1, db1, list(dws), list(dgs), list(dbs), dw3, dg3, db3,
                dres if need_dres else None) + (None,) * 7

    return setup, backward


def preact_autograd(ns: str):
    """preact_block_train: saves x, the weights, gammas and betas, the raw conv outputs and the statistics; its
    backward op rebuilds each conv's normalised input. The shortcut's gradient is dy itself."""

    def setup(ctx, inputs, output):
        x, weights, gammas, betas, geometry, w_ds, ds_stride, residual, eps = inputs
        _, zs, stats = output
        _no_zero_grads(ctx)
        ctx.save_for_backward(x, stats, w_ds, *zs, *weights, *gammas, *betas)
        ctx.hyper = (len(weights), list(geometry), list(ds_stride), residual is not None)

    def backward(ctx, dy, dzs, dstats):
        n, geometry, ds_stride, has_res = ctx.hyper
        if dy is None:  # y unused: no gradient reaches the block
            return (None, [None] * n, [None] * n, [None] * n) + (None,) * 5
        x, stats, w_ds, *rest = ctx.saved_tensors
        zs, weights, gammas, betas = rest[:n - 1], rest[n - 1:2 * n - 1], rest[2 * n - 1:3 * n - 1], rest[3 * n - 1:]
        need_dx = ctx.needs_input_grad[0]
        dx, dws, dgs, dbs, dw_ds = _ops(ns).preact_block_train_backward(
            dy, x, list(weights), list(gammas), list(betas), geometry, w_ds, ds_stride, list(zs), stats, need_dx)
        return (dx if need_dx else None, list(dws), list(dgs), list(dbs), None, dw_ds if w_ds is not None else None,
                None, dy if has_res and ctx.needs_input_grad[7] else None, None)

    return setup, backward


# the ops every fused backend has (the C++ ops register these too); the whole-block ops are Triton's alone
AUTOGRAD = {"conv_bn_train": conv_bn_autograd, "bn_relu_conv_train": bn_relu_conv_autograd,
            "res2net_chain_train": chain_autograd}
WHOLE_BLOCK_AUTOGRAD = {"res2net_bottleneck_train": bottleneck_autograd, "preact_block_train": preact_autograd}


def bn_act_autograd(ns: str):
    """bn_act(x, scale, shift, residual, relu): saves x, scale and (with the ReLU) the output, its mask."""

    def setup(ctx, inputs, output):
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

    return setup, backward
