"""Training (and eval with gradients) through fused forward/backward op pairs: the glue every fused backend shares.

Two backends implement the same family of training ops: Triton (``torch.ops.resfast_triton``, resfast/triton/
training.py) and the C++/CUDA extension (``torch.ops.resfast``, csrc/training.cpp, for CPU and CUDA tensors):

* ``conv_bn_train(x, w, b, gamma, beta, residual, mean_in, invstd_in, ...) -> (y, z, mean, invstd, var)``
* ``bn_relu_conv_train(x, gamma, beta, mean_in, invstd_in, w, b, residual, ...) -> (y, mean, invstd, var)``
* ``res2net_chain_train(x, ws, bs, gammas, betas, mean_in, invstd_in, ...) -> (out, Z, mean, invstd, var)``, where
  ``Z`` is one tensor of every raw conv output (Triton writes each conv's output into its slice) or a list of them
  (a cuDNN / oneDNN convolution allocates its own output);
* each with a ``*_backward`` op, and ``bn_running_update`` (in place).

This module holds what does not depend on the backend: nn.BatchNorm2d's rules at the op boundary (statistics in,
running buffers updated after the op, exactly once per BatchNorm per forward), the autocast dtype, what is saved
for backward (raw conv outputs and per-channel statistics; normalised activations are recomputed, and inside a
block's ``recompute_scope`` the activations one op passes to the next are rebuilt in backward too), and the
autograd wiring (``register_autograd`` of each forward op, calling its backward op in the same namespace).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._args import chain_layout
from .batchnorm import resolve_bn
from .checks import needs_batch_stats


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


def precision_reasons(op: str, args, dtype: torch.dtype) -> list[str]:
    """Why the fused ops, which run in one dtype, cannot reproduce eager here (empty when they can)."""
    reasons = []
    # under autocast: eager normalises bn_relu_conv's input in its own dtype, the chain's pass-through split keeps
    # it (the cat promotes), and a residual add promotes to the residual's dtype; casting them first would round
    residual = getattr(args, "residual", None)
    x = args.x
    kept = [(name, t.dtype) for name, t in (("input", x if op in ("bn_relu_conv", "res2net_chain") else None),
                                            ("residual", residual)) if t is not None and t.dtype != dtype]
    for name, dt in kept:
        reasons.append(f"under autocast the {name} is {dt}, not the autocast dtype {dtype}: eager keeps its "
                       "precision where the fused kernels would round it")
    if op == "res2net_chain" and training_path(op, args):
        if len({needs_batch_stats(bn, args.training) for bn in args.bns}) > 1:
            reasons.append("the chain's BatchNorms mix batch and running statistics (the fused chain takes one kind)")
        if len({bn.weight is None for bn in args.bns}) > 1 or len({bn.bias is None for bn in args.bns}) > 1:
            reasons.append("the chain's BatchNorms mix affine and non-affine (the fused chain takes one kind)")
    return reasons


# ---------------------------------------------------------------------------------------------------------------
# forward glue: prepared op arguments -> one training op call (+ the running buffers' update)


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


# ---------------------------------------------------------------------------------------------------------------
# autograd: setup_context / backward pairs for register_autograd, calling the backward ops of namespace `ns`
# (a name such as "resfast" or "resfast_triton", looked up when the backward runs)


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


# ---------------------------------------------------------------------------------------------------------------
# recompute scope: activations rebuilt in backward instead of saved
#
# Inside ``recompute_scope()`` (the drop-in blocks enter one around their fused training forward) an op does not
# save the normalised activations it produces: conv_bn_train's ``relu(bn(z))`` (no residual) and the chain's
# output are registered with a recipe instead, and every op of this module that would save one of them (the
# producer for its ReLU mask, the next op as its conv input) saves the recipe's ingredients: raw conv outputs,
# per-channel statistics, gamma and beta, tensors that are saved anyway. Backward rebuilds the activation once, at
# its first use, keeps it until its last use in that backward pass, and drops it. What a Res2Net bottleneck keeps
# for backward then is the block input, z1, the chain's raw outputs, z3 and the block output, as the training
# issue asks ("recompute normalised activations in backward"). One difference from eager: the recipe saves the
# BatchNorm's beta, so changing a bias in place between forward and backward raises autograd's in-place error (as
# changing gamma already does in eager) instead of rebuilding a different activation.


class _Rebuild:
    """An activation rebuilt in backward by ``fn(*children values, *own parts)``. Holds no tensor but the rebuilt
    value between its first and last use; the ingredients are saved by each op that uses it (save_for_backward),
    so no context holds its own outputs and no reference cycle forms."""

    def __init__(self, fn, children=()):
        self.fn, self.children = fn, tuple(children)  # children: ((node or None, n_parts), ...)
        self.users = self.left = 0
        self.value = None
        self.armed = False  # a reset is queued for the end of the current backward pass

    def add_user(self):
        self.users += 1
        self.left += 1
        for node, _ in self.children:
            if node is not None:
                node.add_user()

    def get(self, parts):
        """The activation from the saved `parts` (children's parts first, then this node's own)."""
        if self.value is None:
            values, k = [], 0
            for node, n in self.children:
                values.append(_value(node, parts[k:k + n]))
                k += n
            self.value = self.fn(*values, *parts[k:])
        else:
            for node, _ in self.children:
                if node is not None:
                    node.release()
        value = self.value
        self._used()
        return value

    def release(self):
        for node, _ in self.children:
            if node is not None:
                node.release()
        self._used()

    def _used(self):
        if not self.armed:  # the first use in this backward pass: start over when it ends, whatever ran
            self.armed = _at_end_of_backward(self._reset)
        self.left -= 1
        if self.left <= 0:  # the last use in this backward pass: drop it (a retained graph rebuilds it again)
            self._reset()

    def _reset(self):
        """Forget this pass: a partial backward (autograd.grad of some inputs, backward(inputs=...)) uses only some
        of the users, so the value would otherwise stay cached and the count off for the next pass."""
        self.value, self.left, self.armed = None, self.users, False


def _at_end_of_backward(fn) -> bool:
    """Run fn when the current backward pass ends; False outside one (nothing queued)."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(fn)
    except RuntimeError:  # not inside a backward pass (a direct call)
        return False
    return True


class _Source(NamedTuple):
    """What an op saves for one tensor it needs in backward: the tensor itself (node None, parts (t,)), or the
    ingredients of a rebuild."""

    node: Optional[_Rebuild]
    parts: tuple


def _value(node, parts):
    return parts[0] if node is None else node.get(parts)


_tls = threading.local()


def recompute_scope():
    """The context a block's fused training forward runs in: ops of this module called inside rebuild the normalised
    activations they produce in backward instead of saving them (see above). A null context while torch.compile
    traces (the compiled graph's partitioner decides what is saved; dynamo sees no generator)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _scope_context()


@contextlib.contextmanager
def _scope_context() -> Iterator[None]:
    stack = _tls.__dict__.setdefault("scopes", [])
    stack.append({})
    try:
        yield
    finally:
        stack.pop()


def _scope() -> Optional[dict]:
    stack = getattr(_tls, "scopes", None)
    return stack[-1] if stack else None


def _register(t: torch.Tensor, src: _Source) -> _Source:
    scope = _scope()
    if scope is not None:  # keyed by identity; the version catches an in-place change made after the op
        scope[id(t)] = (weakref.ref(t), t._version, src)
    return src


def _source(t: Optional[torch.Tensor]) -> _Source:
    """How an op saves `t`: a registered rebuild when `t` is an activation of the current scope, unchanged since."""
    scope = _scope()
    if t is not None and scope is not None:
        entry = scope.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == t._version:
            return entry[2]
    return _Source(None, (t,))


def _save(ctx, *items) -> None:
    """save_for_backward of tensors and _Sources; :func:`_load` gives back one value per item."""
    tensors, layout = [], []
    for item in items:
        src = item if isinstance(item, _Source) else _Source(None, (item,))
        if src.node is not None:
            src.node.add_user()
        tensors += src.parts
        layout.append((src.node, len(src.parts)))
    ctx.save_for_backward(*tensors)
    ctx.rebuild_layout = layout


def _load(ctx) -> list:
    saved, values, k = ctx.saved_tensors, [], 0
    for node, n in ctx.rebuild_layout:
        values.append(_value(node, saved[k:k + n]))
        k += n
    return values


def _bn_relu(z, mean, invstd, gamma, beta, ns: str, out=None):
    """``relu((z - mean) * gamma * invstd + beta)`` into ``out`` (or a new tensor) by the forward's own apply pass of
    backend `ns` (Triton's apply kernel, the C++ ops' ``bn_relu_apply_``): bit for bit what the forward wrote."""
    if ns == "resfast_triton":
        from ..triton import batchnorm

        scale = invstd if gamma is None else invstd * gamma.to(invstd.dtype)
        return batchnorm.apply(z, mean, scale, beta, None, True, out=out)
    out = torch.empty_like(z) if out is None else out
    getattr(torch.ops, ns).bn_relu_apply_(out, z, mean, invstd, gamma, beta)
    return out


def _bn_relu_source(ns, y, z, mean, invstd, gamma, beta) -> Union[torch.Tensor, _Source]:
    """conv_bn_train's ReLU output without a residual: itself, or inside a scope a registered rebuild from z."""
    if _scope() is None:
        return y

    def build(z, mean, invstd, gamma, beta):
        return _bn_relu(z, mean, invstd, gamma, beta, ns)

    return _register(y, _Source(_Rebuild(build), (z, mean, invstd, gamma, beta)))


def _chain_out_source(ns, out, x_src: _Source, zs, mean, invstd, gammas, betas, scale, stride, order, block_type):
    """The chain's output: itself, or inside a scope a registered rebuild from its input and raw outputs."""
    if _scope() is None:
        return out
    n_z, cl = len(zs), out.is_contiguous(memory_format=torch.channels_last)
    shape = tuple(out.shape)
    conv_splits, passthrough = chain_layout(scale, order)
    n_g = len(gammas)

    def build(x, mean, invstd, *rest):
        zs, gs, bs = rest[:n_z], rest[n_z:n_z + n_g], rest[n_z + n_g:]
        o = torch.empty(shape, device=x.device, dtype=x.dtype,
                        memory_format=torch.channels_last if cl else torch.contiguous_format)
        wd = shape[1] // scale if passthrough is not None else shape[1]
        for k, i in enumerate(conv_splits):
            z = zs[k] if n_z > 1 else zs[0].narrow(1, k * wd, wd)
            _bn_relu(z, mean[k], invstd[k], gs[k] if gs else None, bs[k] if bs else None, ns,
                     out=o.narrow(1, i * wd, wd))
        if passthrough is not None:
            p = x.narrow(1, passthrough * wd, wd)
            if block_type == "stage":  # timm pools the pass-through split of a stage block (count_include_pad)
                p = F.avg_pool2d(p, 3, stride, 1, ceil_mode=False, count_include_pad=True)
            o.narrow(1, passthrough * wd, wd).copy_(p)
        return o

    node = _Rebuild(build, ((x_src.node, len(x_src.parts)),))
    return _register(out, _Source(node, (*x_src.parts, mean, invstd, *zs, *gammas, *betas)))


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
