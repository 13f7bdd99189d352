"""The Triton backend's training ops (and eval with gradients): dispatcher ops with their backward ops, wired to
autograd with ``register_autograd``.

Declared mirror: csrc/training.cpp orchestrates the same per-op training ops (``torch.ops.resfast``) over other
primitives (ATen convolutions + the csrc BatchNorm kernels, here Triton kernels); the two are kept step for step
in sync, and tests/test_training_mirrors.py runs both on the same inputs and compares every output.

``torch.ops.resfast_triton``:

* ``conv_bn_train``: ``y = relu(bn(conv2d(x, w, b)) + residual)``. The conv kernel writes its raw output ``z`` and,
  in its epilogue, per-tile statistics partials (batchnorm.py); ``finalize`` merges them; one elementwise pass
  writes ``y``. Returns ``(y, z, mean, invstd, var)``: ``z`` and the statistics are what the backward reads (the
  normalised activation is never saved: it is recomputed from ``z``), ``var`` (unbiased) feeds the running
  estimate. With given statistics (``mean_in``/``invstd_in``: eval BatchNorm, FrozenBatchNorm2d) no partials.
* ``bn_relu_conv_train``: ``y = conv2d(relu(bn(x)), w, b) + residual``: statistics of x, then the conv applies
  BatchNorm + ReLU to its input tiles as it loads them (the activation is never written). Returns
  ``(y, mean, invstd, var)``.
* ``res2net_chain_train``: the Res2Net chain (resfast.ops.res2net_chain). Per conv: the conv kernel reads its split
  in place, adds the previous split's output while loading (normal blocks), writes its raw output into a slice of
  one ``Z`` tensor with statistics partials; ``finalize``; the apply pass writes the split's output straight into
  its slice of the chain's output (no split copies, no cat). The pass-through split rides on the first conv launch.
  Returns ``(out, Z, mean, invstd, var)``, statistics stacked (convs, width).
* ``bn_running_update``: running buffers updated in place (mutates its arguments; no autograd).
* ``bn_relu_apply_``: ``out = relu((z - mean) * invstd * gamma + beta)`` in place, the forward's apply pass
  (resfast/ops/recompute.py rebuilds activations in backward with it, as with the C++ ops' op of that name).

The whole-block training ops are in blocks.py.

Autograd (what is saved, which backward op runs) is resfast/ops/training.py's, shared with the C++ ops.

Backward ops: BatchNorm (+ ReLU, + residual) backward in two Triton passes (batchnorm.backward: per-channel sums of
``g`` and ``g * xhat`` in fp32, then ``dz`` and the residual's gradient), and the convolutions' data and weight
gradients through conv_grad.conv_backward: ATen's ``convolution_backward`` (cuDNN on a GPU) by default, the Triton
implicit-GEMM dgrad/wgrad kernels with ``RESFAST_CONV_BACKWARD=triton`` (benchmarks/bench_conv_backward.py
compares them). The Res2Net chain's backward runs the splits in reverse; a split's input gradient also flows
into the previous split's output through the add (``dy2`` of batchnorm.backward), so nothing is summed in memory.
Inputs are recomputed where cheap (a split's conv input ``x_i + y_{i-1}``, bn_relu_conv's activation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from ...ops._args import chain_layout
from ...ops.autograd import AUTOGRAD
from ...ops.checks import conv_output_size
from ...ops.dtypes import acc_dtype
from .kernels import batchnorm
from .kernels.common import _is_fake, interpreting
from .kernels.conv import Add, PassThrough, Prologue, Statistics, conv_bn_act_fwd, pack_weight, passthrough_fwd
from .kernels.conv_grad import conv_backward


def _bias_vector(bias: Optional[Tensor], C: int, like: Tensor) -> Tensor:
    stat = acc_dtype(like.dtype)
    return bias.to(stat) if bias is not None else torch.zeros(C, device=like.device, dtype=stat)


def _given_stats(mean_in: Tensor, invstd_in: Tensor, gamma: Optional[Tensor], stat: torch.dtype):
    """(mean, invstd, var placeholder, scale) from statistics handed in (eval BatchNorm): fresh tensors, since an
    op's outputs may not alias its inputs."""
    mean = mean_in.to(stat, copy=True)
    invstd = invstd_in.to(stat, copy=True)
    scale = invstd * gamma.to(stat) if gamma is not None else invstd
    return mean, invstd, torch.zeros_like(mean), scale


def _empty(like: Tensor) -> Tensor:
    """The placeholder a backward op returns for a gradient nobody asked for."""
    return like.new_empty(0)


# ---------------------------------------------------------------------------------------------------------------
# conv -> BatchNorm (-> + residual) (-> ReLU)


def _conv_bn_train(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
                   residual: Optional[Tensor], mean_in: Optional[Tensor], invstd_in: Optional[Tensor],
                   stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW) in x's dtype; gamma/beta/mean_in/invstd_in (C_out,)
    or None. Batch statistics unless mean_in/invstd_in are given. Returns (y, z, mean, invstd, var), y and z
    channels_last, the statistics (C_out,) in fp32 (fp64 for float64)."""
    C_out, _, kh, kw = weight.shape
    N, _, H, W = x.shape
    H_out, W_out = conv_output_size((H, W), (kh, kw), stride, padding, dilation)
    M = N * H_out * W_out
    args = (x, pack_weight(weight, None, x.dtype), _bias_vector(bias, C_out, x), tuple(stride), tuple(padding),
            tuple(dilation), groups)
    if mean_in is None:
        partials = batchnorm.new_partials(M, C_out, x)
        z = conv_bn_act_fwd(*args, relu=False, stats=Statistics(*partials))
        mean, invstd, var, scale = batchnorm.finalize(*partials, M, gamma, eps)
    else:
        z = conv_bn_act_fwd(*args, relu=False)
        mean, invstd, var, scale = _given_stats(mean_in, invstd_in, gamma, acc_dtype(x.dtype))
    y = batchnorm.apply(z, mean, scale, beta, residual, relu)
    return y, z, mean, invstd, var


def _conv_bn_train_backward(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, y: Optional[Tensor],
                            gamma: Optional[Tensor], mean: Tensor, invstd: Tensor, stride: list[int],
                            padding: list[int], dilation: list[int], groups: int, batch_stats: bool, has_bias: bool,
                            need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias, dgamma, dbeta, dresidual) of conv_bn_train; ``y`` is the saved output when the
    forward had a ReLU (its mask), else None. ``need`` says which are wanted; the others come back empty."""
    need_dx, need_dw, need_db, need_dgamma, need_dbeta, need_dres = need
    dz, dgamma, dbeta, dres = batchnorm.backward(dy, None, y, z, mean, invstd, gamma, batch_stats,
                                         need_dweight=need_dgamma or need_dbeta, need_dres=need_dres)
    dx = dw = db = None
    if need_dx or need_dw or (need_db and has_bias):
        dx, dw, db = conv_backward(dz, x, weight, has_bias, stride, padding, dilation, groups,
                                   [need_dx, need_dw, need_db])
    gdt = gamma.dtype if gamma is not None else mean.dtype
    return (dx if need_dx else _empty(x), dw if need_dw else _empty(weight), db if db is not None else _empty(weight),
            dgamma.to(gdt) if need_dgamma else _empty(mean), dbeta.to(gdt) if need_dbeta else _empty(mean),
            dres if dres is not None else _empty(z))


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm -> ReLU -> conv (-> + residual)


def _bn_relu_conv_train(x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], mean_in: Optional[Tensor],
                        invstd_in: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                        residual: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``conv2d(relu(bn(x)), weight, bias) + residual`` with batch statistics of x unless mean_in/invstd_in (C_in,)
    are given. Returns (y channels_last, mean, invstd, var)."""
    N, C, H, W = x.shape
    stat = acc_dtype(x.dtype)
    if mean_in is None:
        partials = batchnorm.stats_partials(x)
        mean, invstd, var, scale = batchnorm.finalize(*partials, N * H * W, gamma, eps)
    else:
        mean, invstd, var, scale = _given_stats(mean_in, invstd_in, gamma, stat)
    shift = beta.to(stat) if beta is not None else torch.zeros_like(mean)
    y = conv_bn_act_fwd(x, pack_weight(weight, None, x.dtype), _bias_vector(bias, weight.shape[0], x),
                        tuple(stride), tuple(padding), tuple(dilation), groups, residual, relu=False,
                        prologue=Prologue(scale, shift, mean))
    return y, mean, invstd, var


def _bn_relu_conv_train_backward(dy: Tensor, x: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                                 mean: Tensor, invstd: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                                 dilation: list[int], groups: int, batch_stats: bool, has_bias: bool,
                                 need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dgamma, dbeta, dweight, dbias) of bn_relu_conv_train (the residual's is dy itself). The
    activation relu(bn(x)) is recomputed here, used by the conv's backward and as the ReLU mask, then dropped."""
    need_dx, need_dgamma, need_dbeta, need_dw, need_db = need
    scale = invstd * gamma.to(invstd.dtype) if gamma is not None else invstd
    act = batchnorm.apply(x, mean, scale, beta, None, True)
    need_dact = need_dx or need_dgamma or need_dbeta
    dact, dw, db = conv_backward(dy, act, weight, has_bias, stride, padding, dilation, groups,
                                 [need_dact, need_dw, need_db])
    dx = dgamma = dbeta = None
    if need_dact:
        dx, dgamma, dbeta, _ = batchnorm.backward(dact, None, act, x, mean, invstd, gamma, batch_stats,
                                          need_dweight=need_dgamma or need_dbeta, need_dres=False)
    gdt = gamma.dtype if gamma is not None else mean.dtype
    return (dx if need_dx else _empty(x), dgamma.to(gdt) if need_dgamma else _empty(mean),
            dbeta.to(gdt) if need_dbeta else _empty(mean), dw if need_dw else _empty(weight),
            db if db is not None else _empty(weight))


# ---------------------------------------------------------------------------------------------------------------
# the Res2Net chain


def _chain_geometry(x: Tensor, scale: int, order: str, stride: int):
    conv_splits, passthrough = chain_layout(scale, order)
    N, C, H, W = x.shape
    wd = C // scale if passthrough is not None else C
    H_out, W_out = (H - 1) // stride + 1, (W - 1) // stride + 1

    def split(t: Tensor, i: int) -> Tensor:
        return t if passthrough is None else t[:, i * wd:(i + 1) * wd]

    return conv_splits, passthrough, wd, H_out, W_out, split


def _res2net_chain_train(x: Tensor, weights: list[Tensor], biases: list[Tensor], gammas: list[Tensor],
                         betas: list[Tensor], mean_in: Optional[Tensor], invstd_in: Optional[Tensor], scale: int,
                         stride: int, dilation: int, groups: int, order: str, block_type: str,
                         eps: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chain with every conv's BatchNorm from batch statistics, or from the given ``mean_in``/``invstd_in``
    (convs, width). weights[k] (width, width/groups, 3, 3) in x's dtype; ``biases``, ``gammas``, ``betas``: one
    (width,) tensor per conv, or empty lists (no conv bias, affine=False). Returns (out, Z, mean, invstd, var): out
    (N, C, H_out, W_out) and Z (N, convs * width, H_out, W_out) channels_last, statistics (convs, width)."""
    conv_splits, passthrough, wd, H_out, W_out, split = _chain_geometry(x, scale, order, stride)
    N, C = x.shape[:2]
    S = len(conv_splits)
    stat = acc_dtype(x.dtype)
    out = torch.empty((N, C, H_out, W_out), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    Z = torch.empty((N, S * wd, H_out, W_out), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    M = N * H_out * W_out
    if mean_in is None:
        stats = torch.empty((4, S, wd), device=x.device, dtype=stat)  # mean, invstd, var, scale
    else:
        mean, invstd, var, sc = _given_stats(mean_in, invstd_in, torch.stack(gammas) if gammas else None, stat)
        stats = torch.stack((mean, invstd, var, sc))
    pt = None if passthrough is None else PassThrough(split(x, passthrough), split(out, passthrough),
                                                      pool=block_type == "stage", stride=stride)
    s, d = (stride, stride), (dilation, dilation)
    prev = None
    for k, i in enumerate(conv_splits):
        z = Z[:, k * wd:(k + 1) * wd]
        conv = (split(x, i), pack_weight(weights[k], None, x.dtype),
                _bias_vector(biases[k] if biases else None, wd, x), s, d, d, groups)
        add = Add(prev) if block_type == "normal" and prev is not None else None
        if mean_in is None:
            partials = batchnorm.new_partials(M, wd, x)
            conv_bn_act_fwd(*conv, relu=False, add=add, out=z, passthrough=pt, stats=Statistics(*partials))
            batchnorm.finalize(*partials, M, gammas[k] if gammas else None, eps[k], outs=tuple(stats[:, k]))
        else:
            conv_bn_act_fwd(*conv, relu=False, add=add, out=z, passthrough=pt)
        prev = batchnorm.apply(z, stats[0, k], stats[3, k], betas[k] if betas else None, None, True, out=split(out, i))
        pt = None
    if pt is not None:  # no conv at all (paper order, scale 1)
        passthrough_fwd(pt)
    return out, Z, stats[0].clone(), stats[1].clone(), stats[2].clone()


def _res2net_chain_train_backward(dout: Tensor, x: Tensor, out: Tensor, Z: Tensor, weights: list[Tensor],
                                  gammas: list[Tensor], mean: Tensor, invstd: Tensor, scale: int, stride: int,
                                  dilation: int, groups: int, order: str, block_type: str, batch_stats: bool,
                                  has_bias: bool, need_dx: bool, need_dw: bool, need_db: bool, need_dgamma: bool,
                                  need_dbeta: bool
                                  ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients (dx, dweights, dbiases, dgammas, dbetas) of res2net_chain_train, the lists in chain order (empty
    tensors where not wanted). Splits in reverse order: conv k's input gradient is also the gradient of the
    previous split's output (the add), passed to that split's BatchNorm backward as its second incoming gradient."""
    conv_splits, passthrough, wd, _, _, split = _chain_geometry(x, scale, order, stride)
    S = len(conv_splits)
    normal = block_type == "normal"
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_dx else _empty(x)
    # distinct placeholders: an op's outputs may not alias each other
    dws, dbs = [_empty(x) for _ in range(S)], [_empty(x) for _ in range(S)]
    dgammas, dbetas = [_empty(mean) for _ in range(S)], [_empty(mean) for _ in range(S)]
    s, d = [stride, stride], [dilation, dilation]
    dnext = None
    for k in reversed(range(S)):
        i = conv_splits[k]
        gamma = gammas[k] if gammas else None
        dz, dgamma, dbeta, _ = batchnorm.backward(split(dout, i), dnext, split(out, i), Z[:, k * wd:(k + 1) * wd],
                                                  mean[k], invstd[k], gamma, batch_stats,
                                                  need_dweight=need_dgamma or need_dbeta, need_dres=False)
        gdt = gamma.dtype if gamma is not None else mean.dtype
        if need_dgamma:
            dgammas[k] = dgamma.to(gdt)
        if need_dbeta:
            dbetas[k] = dbeta.to(gdt)
        chained = normal and k > 0
        inp = split(x, i)
        if chained:  # the conv's input, recomputed: this split plus the previous split's output
            inp = inp + split(out, conv_splits[k - 1])
        want_din = need_dx or chained
        din, dw, db = conv_backward(dz, inp, weights[k], has_bias, s, d, d, groups, [want_din, need_dw, need_db])
        if need_dw:
            dws[k] = dw
        if db is not None:
            dbs[k] = db
        if need_dx:
            split(dx, i).copy_(din)
        dnext = din if chained else None
    if need_dx and passthrough is not None:
        g = split(dout, passthrough)
        if block_type == "stage":  # timm's AvgPool2d(3, stride, padding=1), count_include_pad
            g = torch.ops.aten.avg_pool2d_backward(g, split(x, passthrough), [3, 3], s, [1, 1], False, True, None)
        split(dx, passthrough).copy_(g)
    return dx, dws, dbs, dgammas, dbetas




# ---------------------------------------------------------------------------------------------------------------


def _bn_running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float) -> None:
    """``running = factor * batch + (1 - factor) * running`` in place (nn.BatchNorm2d's update; var unbiased)."""
    batchnorm.running_update(running_mean, running_var, mean, var, factor)


def _bn_relu_apply_(out: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor],
                    beta: Optional[Tensor]) -> None:
    """``out = relu((z - mean) * invstd * gamma + beta)``: the apply pass conv_bn_train's forward ran, bit for bit."""
    scale = invstd if gamma is None else invstd * gamma.to(invstd.dtype)
    batchnorm.apply(z, mean, scale, beta, None, True, out=out)


FORWARD = {
    "conv_bn_train": _conv_bn_train,
    "bn_relu_conv_train": _bn_relu_conv_train,
    "res2net_chain_train": _res2net_chain_train,
}
BACKWARD = {
    "conv_bn_train_backward": _conv_bn_train_backward,
    "bn_relu_conv_train_backward": _bn_relu_conv_train_backward,
    "res2net_chain_train_backward": _res2net_chain_train_backward,
}
def register_ops(forward: dict, backward: dict, autograd: dict, mutating: Optional[dict] = None) -> dict:
    """The ``torch.ops.resfast_triton`` ops: each forward function with its autograd (resfast/ops/autograd.py's
    setup/backward pair from ``autograd``), each backward function, and the in-place ops of ``mutating`` (name ->
    (function, mutated argument names)). Under the interpreter every op stays opaque under functionalisation (as in
    library.py), so the interpreter never sees a tracer."""
    ops = {}
    for name, fn in forward.items():
        ops[name] = triton_op(f"resfast_triton::{name}", fn, mutates_args=())
        setup, bwd = autograd[name]("resfast_triton")
        ops[name].register_autograd(bwd, setup_context=setup)
    for name, fn in backward.items():
        ops[name] = triton_op(f"resfast_triton::{name}", fn, mutates_args=())
    for name, (fn, mutated) in (mutating or {}).items():
        ops[name] = triton_op(f"resfast_triton::{name}", fn, mutates_args=mutated)
    if interpreting():
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        from .library import _keep_opaque

        for op in ops.values():
            op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
    return ops


OPS = register_ops(FORWARD, BACKWARD, AUTOGRAD, {
    "bn_running_update": (_bn_running_update, ("running_mean", "running_var")),
    "bn_relu_apply_": (_bn_relu_apply_, ("out",)),
})

__all__ = ["OPS", "_is_fake"]
