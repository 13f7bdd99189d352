"""The Triton backend's whole-block training ops (``torch.ops.resfast_triton``), with their backward ops wired to
autograd (resfast/ops/training.py's setup/backward pairs). The ops resfast.ops.res2net_bottleneck_train and
resfast.ops.preact_block_train run them (resfast/ops/bottleneck.py).

* ``res2net_bottleneck_train``: a whole Res2Net bottleneck in training (every BatchNorm with batch statistics):
  conv1's raw output and statistics, the chain's convs applying bn1 + ReLU (and the previous split's BatchNorm +
  ReLU before the add) to their input tiles as they load them, conv3 applying the chain's BatchNorms + ReLU in its
  prologue, one apply pass for bn3 + residual + ReLU. No normalised activation is written; its backward op carries
  every BatchNorm (bn1's statistics depend on conv1's output, so no per-op split can do this). Called by the blocks
  through resfast/ops/bottleneck.py.
* ``preact_block_train``: a whole pre-activation block (BN -> ReLU -> conv units; timm's PreActBottleneck /
  PreActBasic, the ResNet50V2 article's v2 blocks) in training: the first BatchNorm's statistics from one pass over
  the input, each later one's from the previous conv's epilogue, each BN + ReLU in the next conv's prologue, timm's
  downsample (a 1x1 conv of the normalised input) as a second GEMM of the last conv's launch. Called by the blocks
  through resfast/ops/bottleneck.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...ops.autograd import WHOLE_BLOCK_AUTOGRAD
from ...ops.checks import conv_output_size
from ...ops.dtypes import acc_dtype
from .kernels import batchnorm
from .kernels.conv import (
    Add,
    PassThrough,
    Projection,
    Prologue,
    Statistics,
    conv_bn_act_fwd,
    pack_weight,
    passthrough_fwd,
)
from .kernels.conv_grad import conv_backward
from .training import _chain_geometry, _empty, _res2net_chain_train_backward, register_ops

# ---------------------------------------------------------------------------------------------------------------
# the whole Res2Net bottleneck: conv1 -> BN -> ReLU -> chain -> conv3 -> BN (-> + residual) -> ReLU, with each
# normalised activation applied in the next conv's prologue (never written)


def _stat_rows(stats: Tensor, lo: int, hi: int) -> tuple[Tensor, ...]:
    """The four contiguous (hi - lo,) rows (mean, invstd, var, scale) of a (4, L) statistics buffer's columns."""
    return tuple(stats[j, lo:hi] for j in range(4))


def _res2net_bottleneck_train(x: Tensor, w1: Tensor, gamma1: Tensor, beta1: Tensor, weights: list[Tensor],
                              gammas: list[Tensor], betas: list[Tensor], w3: Tensor, gamma3: Tensor, beta3: Tensor,
                              residual: Optional[Tensor], scale: int, stride: int, dilation: int, groups: int,
                              order: str, block_type: str, eps: list[float]
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``relu(bn3(conv3(chain(relu(bn1(conv1(x)))))) + residual)`` with batch statistics for every BatchNorm, the
    1x1 convs w1 (C, C_in, 1, 1) and w3 (C_out, C, 1, 1) without bias, the chain as res2net_chain_train (no conv
    bias). ``eps``: bn1's, the chain's, bn3's. Returns (y, z1, Zc, z3, stats):

    * z1 = conv1(x) raw, written by the conv with its statistics partials; never normalised in memory: the chain's
      convs apply bn1 + ReLU to their input tiles as they load them, the pass-through split's programs too;
    * Zc (N, C, H', W'): each chain conv's raw output in its split's slot (a normal block's next conv adds
      ``relu(bn(.))`` of it in its prologue), the pass-through split's output (copied or pooled, normalised) in its
      slot: what the chain's output would be before its BatchNorms;
    * z3 = conv3 of Zc with the chain's BatchNorms + ReLU in its prologue (identity on the pass-through slot, which
      is already normalised and >= 0), with statistics partials; one apply pass writes y;
    * stats (4, C + convs * width + C_out): mean, invstd, unbiased var and scale = gamma * invstd of bn1, the chain's
      BatchNorms, bn3 (fp32, fp64 for float64).

    The only activations written are z1, Zc, z3 and y, and those are all backward keeps (with x and the statistics).
    """
    dt = x.dtype
    stat = acc_dtype(dt)
    N, _, H, W = x.shape
    C, C_out = w1.shape[0], w3.shape[0]
    z1 = torch.empty((N, C, H, W), device=x.device, dtype=dt, memory_format=torch.channels_last)
    conv_splits, passthrough, wd, H2, W2, split = _chain_geometry(z1, scale, order, stride)
    S = len(conv_splits)
    L = C + S * wd + C_out
    stats = torch.empty((4, L), device=x.device, dtype=stat)
    s1, s3 = _stat_rows(stats, 0, C), _stat_rows(stats, C + S * wd, L)
    sc = [_stat_rows(stats, C + k * wd, C + (k + 1) * wd) for k in range(S)]
    one = (1, 1)
    # conv1, its statistics
    p1 = batchnorm.new_partials(N * H * W, C, x)
    conv_bn_act_fwd(x, pack_weight(w1, None, dt), torch.zeros(C, device=x.device, dtype=stat), one, (0, 0), one, 1,
                    relu=False, out=z1, stats=Statistics(*p1))
    batchnorm.finalize(*p1, N * H * W, gamma1, eps[0], outs=s1)
    b1 = beta1.to(stat)
    bcs = [b.to(stat) for b in betas]

    def bn1(i: int) -> tuple[Tensor, Tensor, Tensor]:  # (mean, scale, shift) of bn1 over split i
        lo, hi = (i * wd, (i + 1) * wd) if passthrough is not None else (0, C)
        return s1[0][lo:hi], s1[3][lo:hi], b1[lo:hi]

    # the chain: conv k reads relu(bn1(z1_i)) (+ relu(bn_{k-1}(Zc_{i-1})) in a normal block) as it loads
    Zc = torch.empty((N, C, H2, W2), device=x.device, dtype=dt, memory_format=torch.channels_last)
    M2 = N * H2 * W2
    pt = None
    if passthrough is not None:
        pt = PassThrough(split(z1, passthrough), split(Zc, passthrough), pool=block_type == "stage", stride=stride,
                         pre=bn1(passthrough))
    s, d = (stride, stride), (dilation, dilation)
    zero_wd = torch.zeros(wd, device=x.device, dtype=stat)
    for k, i in enumerate(conv_splits):
        m, sc_, sh = bn1(i)
        chained = block_type == "normal" and k > 0
        prev = conv_splits[k - 1] if chained else None
        p = batchnorm.new_partials(M2, wd, x)
        conv_bn_act_fwd(split(z1, i), pack_weight(weights[k], None, dt), zero_wd, s, d, d, groups, relu=False,
                        prologue=Prologue(sc_, sh, m),
                        add=Add(split(Zc, prev), pre=(sc[k - 1][0], sc[k - 1][3], bcs[k - 1])) if chained else None,
                        out=split(Zc, i), passthrough=pt, stats=Statistics(*p))
        batchnorm.finalize(*p, M2, gammas[k], eps[1 + k], outs=sc[k])
        pt = None
    if pt is not None:  # no conv (paper order, scale 1): the caller does not send such a block here
        passthrough_fwd(pt)
    # conv3 with the chain's BatchNorms + ReLU in its prologue: per channel of Zc, identity on the pass-through slot
    pm3 = torch.zeros(C, device=x.device, dtype=stat)
    ps3 = torch.ones(C, device=x.device, dtype=stat)
    pb3 = torch.zeros(C, device=x.device, dtype=stat)
    for k, i in enumerate(conv_splits):
        lo = i * wd if passthrough is not None else 0
        pm3[lo:lo + wd] = sc[k][0]
        ps3[lo:lo + wd] = sc[k][3]
        pb3[lo:lo + wd] = bcs[k]
    z3 = torch.empty((N, C_out, H2, W2), device=x.device, dtype=dt, memory_format=torch.channels_last)
    p3 = batchnorm.new_partials(M2, C_out, x)
    conv_bn_act_fwd(Zc, pack_weight(w3, None, dt), torch.zeros(C_out, device=x.device, dtype=stat), one, (0, 0),
                    one, 1, relu=False, prologue=Prologue(ps3, pb3, pm3), out=z3, stats=Statistics(*p3))
    batchnorm.finalize(*p3, M2, gamma3, eps[-1], outs=s3)
    y = batchnorm.apply(z3, s3[0], s3[3], beta3, residual, True)
    return y, z1, Zc, z3, stats


def _chain_out_from(Zc: Tensor, stats: Tensor, betas: list[Tensor], C: int, scale: int, order: str) -> Tensor:
    """The chain's output (conv3's input) rebuilt from Zc by the apply kernel, bit for bit what conv3's prologue
    computed."""
    conv_splits, passthrough, wd, _, _, split = _chain_geometry(Zc, scale, order, 1)
    a = torch.empty_like(Zc, memory_format=torch.channels_last)
    for k, i in enumerate(conv_splits):
        m, _, _, sc = _stat_rows(stats, C + k * wd, C + (k + 1) * wd)
        batchnorm.apply(split(Zc, i), m, sc, betas[k], None, True, out=split(a, i))
    if passthrough is not None:
        split(a, passthrough).copy_(split(Zc, passthrough))
    return a


def _res2net_bottleneck_train_backward(dy: Tensor, x: Tensor, w1: Tensor, gamma1: Tensor, beta1: Tensor,
                                       weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor], w3: Tensor,
                                       gamma3: Tensor, y: Tensor, z1: Tensor, Zc: Tensor, z3: Tensor, stats: Tensor,
                                       scale: int, stride: int, dilation: int, groups: int, order: str,
                                       block_type: str, need_dx: bool, need_dres: bool
                                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor],
                                                  list[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dw1, dgamma1, dbeta1, dweights, dgammas, dbetas, dw3, dgamma3, dbeta3, dresidual) of
    res2net_bottleneck_train (dx and dresidual empty unless asked for). In reverse: bn3 (+ ReLU) backward from y's
    mask; conv3's gradients with the chain's output rebuilt from Zc; the chain's backward
    (_res2net_chain_train_backward) into the gradient of bn1's activation, rebuilt from z1; bn1 (+ ReLU) backward;
    conv1's gradients. Each BatchNorm's backward runs once, over the whole gradient reaching it."""
    C = w1.shape[0]
    conv_splits, _, wd, _, _, _ = _chain_geometry(z1, scale, order, stride)
    S = len(conv_splits)
    L = stats.shape[1]
    m1, i1, _, sc1 = _stat_rows(stats, 0, C)
    m3, i3, _, _ = _stat_rows(stats, C + S * wd, L)
    one, zero = [1, 1], [0, 0]
    dz3, dg3, db3, dres = batchnorm.backward(dy, None, y, z3, m3, i3, gamma3, True, need_dweight=True,
                                             need_dres=need_dres)
    a3 = _chain_out_from(Zc, stats, betas, C, scale, order)
    da3, dw3, _ = conv_backward(dz3, a3, w3, False, one, zero, one, 1, [True, True, False])
    del dz3
    a1 = batchnorm.apply(z1, m1, sc1, beta1, None, True)
    mc = stats[0, C:C + S * wd].view(S, wd)
    ic = stats[1, C:C + S * wd].view(S, wd)
    da1, dws, _, dgs, dbs = _res2net_chain_train_backward(
        da3, a1, a3, Zc.narrow(1, conv_splits[0] * wd, S * wd), weights, gammas, mc, ic, scale,
        stride, dilation, groups, order, block_type, True, False, True, True, False, True, True)
    del a3, da3
    dz1, dg1, db1, _ = batchnorm.backward(da1, None, a1, z1, m1, i1, gamma1, True, need_dweight=True, need_dres=False)
    del a1, da1
    dx, dw1, _ = conv_backward(dz1, x, w1, False, one, zero, one, 1, [need_dx, True, False])
    gdt = gamma1.dtype
    return (dx if need_dx else _empty(x), dw1, dg1.to(gdt), db1.to(gdt), dws, dgs, dbs, dw3, dg3.to(gdt),
            db3.to(gdt), dres if dres is not None else _empty(z3))


# ---------------------------------------------------------------------------------------------------------------
# a whole pre-activation (ResNetV2) block: BN -> ReLU -> conv units, each BatchNorm's statistics from the epilogue of
# the conv before it, each BN + ReLU applied in the prologue of the conv after it


def _geometry(geometry: list[int], i: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """Conv i's (stride, padding, dilation, groups) from the flat ``geometry`` list (7 ints per conv)."""
    g = geometry[7 * i:7 * i + 7]
    return (g[0], g[1]), (g[2], g[3]), (g[4], g[5]), g[6]


def _bn_bounds(weights: list[Tensor], geometry: list[int]) -> list[int]:
    """Where each BatchNorm's columns start in the statistics buffer (and where the last ends): bn_i normalises
    conv i's input channels."""
    bounds = [0]
    for i, w in enumerate(weights):
        bounds.append(bounds[-1] + w.shape[1] * _geometry(geometry, i)[3])
    return bounds


def _preact_block_train(x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
                        geometry: list[int], w_ds: Optional[Tensor], ds_stride: list[int],
                        residual: Optional[Tensor], eps: list[float]) -> tuple[Tensor, list[Tensor], Tensor]:
    """``conv_n(relu(bn_n(... conv_1(relu(bn_1(x))) ...))) + shortcut``, the shortcut ``residual`` or, with ``w_ds``
    (C_out, C_in, 1, 1), ``conv2d(relu(bn_1(x)), w_ds, stride=ds_stride)`` (timm's pre-activation downsample), every
    BatchNorm with batch statistics. weights[i] (C_i+1, C_i/groups_i, kH, kW) in x's dtype, no conv bias; gammas[i],
    betas[i] (C_i,) bn_i's; ``geometry``: per conv (stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups); ``eps``
    per BatchNorm. Returns (y, zs, stats):

    * bn_1's statistics from one pass over x (the block's input is not a conv output of this op);
    * zs: each conv's raw output but the last's, written by the conv with the statistics partials of the next
      BatchNorm in its epilogue; never normalised in memory: the next conv applies BN + ReLU to its input tiles as
      it loads them;
    * y: the last conv's output with the shortcut added in its epilogue; the downsample is a second GEMM of the same
      launch, reading relu(bn_1(x)) through its own prologue, so neither the block's normalised input nor the
      shortcut is written;
    * stats (4, C_1 + ... + C_n): mean, invstd, unbiased var and scale = gamma * invstd of each BatchNorm (fp32,
      fp64 for float64).

    Backward keeps x, zs and stats: exactly the per-op path's (which writes the same raw outputs), less the
    normalised input the per-op path keeps for a downsample block."""
    if not weights:
        raise ValueError("preact_block_train needs at least one conv")
    dt = x.dtype
    stat = acc_dtype(dt)
    N, _, H, W = x.shape
    bounds = _bn_bounds(weights, geometry)
    stats = torch.empty((4, bounds[-1]), device=x.device, dtype=stat)
    rows = [_stat_rows(stats, bounds[i], bounds[i + 1]) for i in range(len(weights))]
    shifts = [b.to(stat) for b in betas]
    batchnorm.finalize(*batchnorm.stats_partials(x), N * H * W, gammas[0], eps[0], outs=rows[0])
    def conv(i: int, inp: Tensor) -> tuple:  # conv i's launch arguments, its input normalised by bn_i as it loads
        s, p, d, groups = _geometry(geometry, i)
        w = weights[i]
        args = (inp, pack_weight(w, None, dt), torch.zeros(w.shape[0], device=x.device, dtype=stat), s, p, d, groups)
        return args, dict(prologue=Prologue(rows[i][3], shifts[i], rows[i][0]))

    inp, zs = x, []
    for i in range(len(weights) - 1):
        args, pre = conv(i, inp)
        C_out = weights[i].shape[0]
        H_out, W_out = conv_output_size(tuple(inp.shape[2:]), tuple(weights[i].shape[2:]), *args[3:6])
        M = N * H_out * W_out
        partials = batchnorm.new_partials(M, C_out, x)
        inp = conv_bn_act_fwd(*args, relu=False, stats=Statistics(*partials), **pre)
        batchnorm.finalize(*partials, M, gammas[i + 1], eps[i + 1], outs=rows[i + 1])
        zs.append(inp)
    args, pre = conv(len(weights) - 1, inp)
    proj = None
    if w_ds is not None:
        proj = Projection(x, pack_weight(w_ds, None, dt), (ds_stride[0], ds_stride[1]),
                          pre=(rows[0][0], rows[0][3], shifts[0]))
    y = conv_bn_act_fwd(*args, residual, relu=False, projection=proj, **pre)
    return y, zs, stats


def _preact_block_train_backward(dy: Tensor, x: Tensor, weights: list[Tensor], gammas: list[Tensor],
                                 betas: list[Tensor], geometry: list[int], w_ds: Optional[Tensor], ds_stride: list[int],
                                 zs: list[Tensor], stats: Tensor, need_dx: bool
                                 ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Gradients (dx, dweights, dgammas, dbetas, dw_ds) of preact_block_train (the shortcut's is dy itself; dx and
    dw_ds empty unless asked for / without a downsample). Units in reverse: each conv's input relu(bn_i(.)) is
    rebuilt from the saved raw tensor by the apply kernel (bit for bit the prologue's), used by the conv's backward
    and as the ReLU mask, then dropped; bn_1's backward takes the downsample's input gradient as its second
    incoming gradient."""
    n = len(weights)
    inputs = [x, *zs]
    bounds = _bn_bounds(weights, geometry)
    dws, dgs, dbs = [None] * n, [None] * n, [None] * n  # every entry is set below
    dx, dw_ds = _empty(x), _empty(x)  # distinct placeholders: an op's outputs may not alias each other
    g = dy
    for i in reversed(range(n)):
        mean, invstd, _, scale = _stat_rows(stats, bounds[i], bounds[i + 1])
        a = batchnorm.apply(inputs[i], mean, scale, betas[i], None, True)
        s, p, d, groups = _geometry(geometry, i)
        da, dws[i], _ = conv_backward(g, a, weights[i], False, s, p, d, groups, [True, True, False])
        da2 = None
        if i == 0 and w_ds is not None:
            da2, dw_ds, _ = conv_backward(dy, a, w_ds, False, ds_stride, [0, 0], [1, 1], 1, [True, True, False])
        g, dgamma, dbeta, _ = batchnorm.backward(da, da2, a, inputs[i], mean, invstd, gammas[i], True,
                                                 need_dweight=True, need_dres=False)
        dgs[i], dbs[i] = dgamma.to(gammas[i].dtype), dbeta.to(gammas[i].dtype)
        del a, da, da2
    if need_dx:
        dx = g
    return dx, dws, dgs, dbs, dw_ds


FORWARD = {"res2net_bottleneck_train": _res2net_bottleneck_train, "preact_block_train": _preact_block_train}
BACKWARD = {"res2net_bottleneck_train_backward": _res2net_bottleneck_train_backward,
            "preact_block_train_backward": _preact_block_train_backward}
OPS = register_ops(FORWARD, BACKWARD, WHOLE_BLOCK_AUTOGRAD)
