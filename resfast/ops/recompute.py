"""Activations rebuilt in backward instead of saved (the recompute scope of a block's fused training forward).

Inside ``recompute_scope()`` (the drop-in blocks enter one around their fused training forward) an op does not
save the normalised activations it produces: conv_bn_train's ``relu(bn(z))`` (no residual) and the chain's
output are registered with a recipe instead, and every op of this module that would save one of them (the
producer for its ReLU mask, the next op as its conv input) saves the recipe's ingredients: raw conv outputs,
per-channel statistics, gamma and beta, tensors that are saved anyway. Backward rebuilds the activation once, at
its first use, keeps it until its last use in that backward pass, and drops it. What a Res2Net bottleneck keeps
for backward then is the block input, z1, the chain's raw outputs, z3 and the block output, as the training
issue asks ("recompute normalised activations in backward"). One difference from eager: the recipe saves the
BatchNorm's beta, so changing a bias in place between forward and backward raises autograd's in-place error (as
changing gamma already does in eager) instead of rebuilding a different activation.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from ._args import chain_layout


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
    namespace `ns` (its ``bn_relu_apply_`` op): bit for bit what the forward wrote."""
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
