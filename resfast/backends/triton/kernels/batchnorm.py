"""Training-mode BatchNorm pieces around the Triton convolutions: statistics, finalize, apply, and backward.

The pattern cuDNN uses for fused ResNet training, in four small kernels:

* statistics: per (tile of STATS_BLOCK_M pixels, channel) the tile's mean and (biased) variance, both computed
  from the values in registers (two passes over the tile: the variance is a mean of squared deviations, never a
  sum of squares of the values). The
  conv kernel writes the same partials from its fp32 accumulator (conv.py, STATS); ``_stats_partial_kernel`` does
  it for a tensor in memory (pre-activation BatchNorm, whose input is not a conv output here).
* finalize: merges the tiles' partials per channel (Chan et al.'s merge, as weighted averages with weights
  ``w_t = n_t / M``: ``mean = sum(w_t mean_t)``, ``var = sum(w_t (var_t + (mean_t - mean)^2))``; every partial
  result is bounded by the data's own magnitude and spread, so |x| up to 1e30 in fp32 does not overflow as a sum
  of squares, or a sum of M squared deviations, would) into mean, invstd, the unbiased variance for the running
  estimate, and the per-channel ``scale = gamma * invstd`` the apply step uses.
* ``bn_running_update``: ``running = (1 - factor) * running + factor * batch`` in place, nn.BatchNorm2d's formula.
* apply: ``y = relu((z - mean) * scale + beta + residual)`` into any strides (a channel slice of a larger output
  included).
* backward: ``g = dy (+ dy2)`` masked by ``y > 0`` when the forward had a ReLU (``y`` is the saved output; ``dy2``
  is the Res2Net chain's gradient that reaches a split through the add into the next split); partial sums of ``g``
  and ``g * xhat`` per tile (``xhat`` recomputed from the saved raw conv output z and the statistics, never saved),
  then ``dz = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))`` (batch statistics) or
  ``gamma * invstd * g`` (running statistics), and ``g`` itself as the residual's gradient.

Any input strides (NHWC/channels_last is the fast path); new outputs are channels_last; arithmetic in fp32 (fp64
for float64 inputs, which the interpreter runs); offsets in int64.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ....ops.dtypes import acc_dtype
from .common import _is_fake, launcher

# the tile height of every statistics partial (conv epilogue and _stats_partial_kernel): the partial buffers have
# cdiv(M, STATS_BLOCK_M) rows, and the finalize kernel derives each row's count from it
STATS_BLOCK_M = 64


def _block_c(C: int) -> int:
    return max(16, min(64, triton.next_power_of_2(C)))


@triton.jit
def pixel_rows(start, M, H, W, ROWS: tl.constexpr):
    """The (n, h, w) of the ROWS consecutive pixels ``start``, ``start + 1``, ... of an (N, ., H, W) tensor with M
    pixels, as int32 vectors, and which of them exist. ``start`` is an int64 scalar (M may pass 2^31); only it is
    decomposed in int64, each row adds its in-tile offset in int32 (an int64 division
    per row costs a subroutine call and its registers). The callers form int64 offsets per row from these."""
    w0 = start % W
    rest = start // W
    r = tl.arange(0, ROWS)
    w = w0.to(tl.int32) + r  # < W + ROWS
    h = (rest % H).to(tl.int32) + w // W  # < H + ROWS
    n = (rest // H).to(tl.int32) + h // H
    return n, h % H, w % W, r < tl.minimum(M - start, ROWS).to(tl.int32)


@triton.jit
def _rows(pid_m, M, HW, W, BLOCK_M: tl.constexpr):
    """The (n, h, w) of BLOCK_M consecutive pixels of an (N, ., H, W) tensor, and which of them exist."""
    return pixel_rows(pid_m.to(tl.int64) * BLOCK_M, M, HW // W, W, BLOCK_M)


# rows per step of the elementwise kernels (apply, backward): a (BLOCK_M x BLOCK_C) tile whole would hold
# BLOCK_M * BLOCK_C / threads values of every operand, and a pointer each where the channels are not aligned for
# vector loads (Res2Net's splits), per thread; SUB_M rows at a time keep them within 64 registers
SUB_M = tl.constexpr(8)
# the data-gradient pass reads up to four operands and writes two per row: 4 rows per step keep it within 64
# registers (8 took 72-78 on sm_90)
BWD_SUB_M = tl.constexpr(4)


@triton.jit
def _tile(r0, M, HW, W, c_mask, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows r0 .. r0 + ROWS of this program's (BLOCK_M pixels x BLOCK_C channels) tile of an elementwise grid (pixel
    tiles on axis 0, channel tiles on axis 1; ``c_mask``: which of its channels exist): (n, h, w) per row and the
    tile's mask."""
    n, h, w, m_mask = pixel_rows(tl.program_id(0).to(tl.int64) * BLOCK_M + r0, M, HW // W, W, ROWS)
    return n, h, w, m_mask[:, None] & c_mask[None, :]


@triton.jit
def _at(ptr, n, h, w, offs_c, sn, sc, sh, sw):
    """Pointers to the tile's elements of a strided (N, C, H, W) tensor: an int64 offset per row plus one per
    column (n, h, w, offs_c are int32; the tensor may pass 2^31 elements)."""
    row = n.to(tl.int64) * sn + h.to(tl.int64) * sh + w.to(tl.int64) * sw
    return ptr + row[:, None] + (offs_c.to(tl.int64) * sc)[None, :]


@triton.jit
def tile_moments(v, row_mask, n_valid):
    """Per column of a (BLOCK_M, BLOCK_C) tile: the mean and the biased variance of the rows in ``row_mask``, from
    the values in registers (``n_valid`` rows, >= 1, row 0 always among them).

    Shifted by the column's first value: ``mean = v_0 + sum(v - v_0) / n``, so a column of equal values gets its
    value back exactly (a plain sum / n rounds, and at |x| ~ 1e30 the rounding error squared overflows fp32)."""
    first = tl.arange(0, v.shape[0]) == 0
    ref = tl.sum(tl.where(first[:, None], v, 0.0), axis=0)
    mean = ref + tl.sum(tl.where(row_mask[:, None], v - ref[None, :], 0.0), axis=0) / n_valid
    d = tl.where(row_mask[:, None], v - mean[None, :], 0.0)
    return mean, tl.sum(d * d, axis=0) / n_valid


@triton.jit
def _stats_partial_kernel(
    X_ptr, PM_ptr, PV_ptr,
    M, C, HW, W,
    sxn, sxc, sxh, sxw,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, h, w, m_mask = _rows(pid_m, M, HW, W, BLOCK_M)
    c_mask = offs_c < C
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    x = tl.load(_at(X_ptr, n, h, w, offs_c, sxn, sxc, sxh, sxw),
                mask=m_mask[:, None] & c_mask[None, :], other=0.0).to(acc_dtype)
    n_valid = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(acc_dtype)
    mean, m2 = tile_moments(x, m_mask, n_valid)
    row = pid_m.to(tl.int64) * C
    tl.store(PM_ptr + row + offs_c, mean, mask=c_mask)
    tl.store(PV_ptr + row + offs_c, m2, mask=c_mask)


@triton.jit
def _finalize_kernel(
    PM_ptr, PV_ptr, G_ptr,
    MEAN_ptr, INVSTD_ptr, VAR_ptr, SCALE_ptr,
    M, T, C, eps,
    HAS_WEIGHT: tl.constexpr, ACC_F64: tl.constexpr,
    TILE_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    Mf = M.to(acc_dtype)
    # pass 1: the mean as a weighted average of the tile means (weights n_t / M, so no sum grows past the data),
    # shifted by tile 0's mean (equal tile means give that mean back exactly, as in tile_moments)
    ref = tl.load(PM_ptr + offs_c, mask=c_mask, other=0.0)
    mean = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = t < T
        n_t = tl.minimum(M - t * TILE_M, TILE_M).to(acc_dtype)
        mask = t_mask[:, None] & c_mask[None, :]
        pm = tl.load(PM_ptr + t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        mean += tl.sum(tl.where(mask, (pm - ref[None, :]) * (n_t / Mf)[:, None], 0.0), axis=0)
    mean += ref
    # pass 2: var = sum over tiles of w_t (var_t + (mean_t - mean)^2)
    var = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = t < T
        n_t = tl.minimum(M - t * TILE_M, TILE_M).to(acc_dtype)
        mask = t_mask[:, None] & c_mask[None, :]
        pm = tl.load(PM_ptr + t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        pv = tl.load(PV_ptr + t[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
        d = pm - mean[None, :]
        var += tl.sum(tl.where(mask, (pv + d * d) * (n_t / Mf)[:, None], 0.0), axis=0)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(G_ptr + offs_c, mask=c_mask, other=1.0).to(acc_dtype)
    tl.store(MEAN_ptr + offs_c, mean, mask=c_mask)
    tl.store(INVSTD_ptr + offs_c, invstd, mask=c_mask)
    # unbiased (the running estimate's); M == 1 never reaches training BatchNorm (the ops refuse it)
    tl.store(VAR_ptr + offs_c, var * (Mf / tl.maximum(Mf - 1.0, 1.0)), mask=c_mask)
    tl.store(SCALE_ptr + offs_c, scale, mask=c_mask)


@triton.jit
def _running_update_kernel(RM_ptr, RV_ptr, MEAN_ptr, VAR_ptr, C, factor, BLOCK_C: tl.constexpr):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs_c < C
    rm = tl.load(RM_ptr + offs_c, mask=mask, other=0.0)
    rv = tl.load(RV_ptr + offs_c, mask=mask, other=0.0)
    # the batch statistics are fp32/fp64; running buffers keep their own dtype (as nn.BatchNorm2d under autocast)
    mean = tl.load(MEAN_ptr + offs_c, mask=mask, other=0.0).to(rm.dtype)
    var = tl.load(VAR_ptr + offs_c, mask=mask, other=0.0).to(rv.dtype)
    tl.store(RM_ptr + offs_c, factor * mean + (1.0 - factor) * rm, mask=mask)
    tl.store(RV_ptr + offs_c, factor * var + (1.0 - factor) * rv, mask=mask)


@triton.jit
def _apply_kernel(
    Z_ptr, MEAN_ptr, SCALE_ptr, BETA_ptr, R_ptr, Y_ptr,
    M, C, HW, W,
    szn, szc, szh, szw,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    HAS_BETA: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean = tl.load(MEAN_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    a = tl.load(SCALE_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    if HAS_BETA:
        beta = tl.load(BETA_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    for r0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _tile(r0, M, HW, W, c_mask, SUB_M, BLOCK_M)
        z = tl.load(_at(Z_ptr, n, h, w, offs_c, szn, szc, szh, szw), mask=mask, other=0.0)
        # (z - mean) * scale + beta, as F.batch_norm: z * scale + (beta - mean * scale) cancels catastrophically
        # when |mean| is much larger than the spread
        y = (z.to(acc_dtype) - mean[None, :]) * a[None, :]
        if HAS_BETA:
            y += beta[None, :]
        if HAS_RES:
            y += tl.load(_at(R_ptr, n, h, w, offs_c, srn, src, srh, srw), mask=mask,
                         other=0.0).to(acc_dtype)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(_at(Y_ptr, n, h, w, offs_c, syn, syc, syh, syw), y.to(Y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _grad_tile(
    DY_ptr, DY2_ptr, Y_ptr, n, h, w, offs_c, mask,
    sdn, sdc, sdh, sdw, s2n, s2c, s2h, s2w, syn, syc, syh, syw,
    HAS_DY2: tl.constexpr, RELU: tl.constexpr, acc_dtype: tl.constexpr,
):
    """g = (dy + dy2) where y > 0 (RELU), else dy + dy2: the gradient reaching the BatchNorm's output."""
    g = tl.load(_at(DY_ptr, n, h, w, offs_c, sdn, sdc, sdh, sdw), mask=mask,
                other=0.0).to(acc_dtype)
    if HAS_DY2:
        g += tl.load(_at(DY2_ptr, n, h, w, offs_c, s2n, s2c, s2h, s2w), mask=mask,
                     other=0.0).to(acc_dtype)
    if RELU:
        y = tl.load(_at(Y_ptr, n, h, w, offs_c, syn, syc, syh, syw), mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    return g


@triton.jit
def _bwd_reduce_kernel(
    DY_ptr, DY2_ptr, Y_ptr, Z_ptr, MEAN_ptr, INVSTD_ptr, PG_ptr, PGX_ptr,
    M, C, HW, W,
    sdn, sdc, sdh, sdw,
    s2n, s2c, s2h, s2w,
    syn, syc, syh, syw,
    szn, szc, szh, szw,
    HAS_DY2: tl.constexpr, RELU: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mean = tl.load(MEAN_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    invstd = tl.load(INVSTD_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    # the tile's sums of g and g * xhat, SUB_M rows at a time
    s_g = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    s_gx = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    for r0 in range(0, BLOCK_M, SUB_M):
        n, h, w, mask = _tile(r0, M, HW, W, c_mask, SUB_M, BLOCK_M)
        g = _grad_tile(DY_ptr, DY2_ptr, Y_ptr, n, h, w, offs_c, mask, sdn, sdc, sdh, sdw, s2n, s2c, s2h, s2w,
                       syn, syc, syh, syw, HAS_DY2, RELU, acc_dtype)
        z = tl.load(_at(Z_ptr, n, h, w, offs_c, szn, szc, szh, szw), mask=mask,
                    other=0.0).to(acc_dtype)
        xhat = (z - mean[None, :]) * invstd[None, :]
        s_g += tl.sum(g, axis=0)
        s_gx += tl.sum(tl.where(mask, g * xhat, 0.0), axis=0)
    row = pid_m.to(tl.int64) * C
    tl.store(PG_ptr + row + offs_c, s_g, mask=c_mask)
    tl.store(PGX_ptr + row + offs_c, s_gx, mask=c_mask)


@triton.jit
def _bwd_apply_kernel(
    DY_ptr, DY2_ptr, Y_ptr, Z_ptr, MEAN_ptr, INVSTD_ptr, G_ptr, SG_ptr, SGX_ptr, DZ_ptr, DR_ptr,
    M, C, HW, W,
    sdn, sdc, sdh, sdw,
    s2n, s2c, s2h, s2w,
    syn, syc, syh, syw,
    szn, szc, szh, szw,
    son, soc, soh, sow,
    srn, src, srh, srw,
    HAS_DY2: tl.constexpr, RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, BATCH_STATS: tl.constexpr,
    WRITE_DR: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    invstd = tl.load(INVSTD_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    a = invstd
    if HAS_WEIGHT:
        a = a * tl.load(G_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
    if BATCH_STATS:
        mean = tl.load(MEAN_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype)
        Mf = M.to(acc_dtype)
        sg = tl.load(SG_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype) / Mf
        sgx = tl.load(SGX_ptr + offs_c, mask=c_mask, other=0.0).to(acc_dtype) / Mf
    for r0 in range(0, BLOCK_M, BWD_SUB_M):
        n, h, w, mask = _tile(r0, M, HW, W, c_mask, BWD_SUB_M, BLOCK_M)
        g = _grad_tile(DY_ptr, DY2_ptr, Y_ptr, n, h, w, offs_c, mask, sdn, sdc, sdh, sdw, s2n, s2c, s2h, s2w,
                       syn, syc, syh, syw, HAS_DY2, RELU, acc_dtype)
        if BATCH_STATS:
            z = tl.load(_at(Z_ptr, n, h, w, offs_c, szn, szc, szh, szw), mask=mask,
                        other=0.0).to(acc_dtype)
            xhat = (z - mean[None, :]) * invstd[None, :]
            dz = (g - sg[None, :] - xhat * sgx[None, :]) * a[None, :]
        else:
            dz = g * a[None, :]
        tl.store(_at(DZ_ptr, n, h, w, offs_c, son, soc, soh, sow),
                 dz.to(DZ_ptr.dtype.element_ty), mask=mask)
        if WRITE_DR:
            tl.store(_at(DR_ptr, n, h, w, offs_c, srn, src, srh, srw),
                     g.to(DR_ptr.dtype.element_ty), mask=mask)


# Elementwise tiles: one shape on the GPU and under the interpreter alike (the statistics' tile height is fixed by
# the partial buffers' layout; the others follow it, so a launch's cost is predictable without autotuning).
_NUM_WARPS = 4


def _launch(kernel, grid, *args, **meta):
    """Every launch of this module goes through here (tests wrap it to count launches), through
    common.launcher."""
    launcher(kernel)[grid](*args, **meta, num_warps=_NUM_WARPS)


def _grid(M: int, C: int, block_c: int):
    return (triton.cdiv(M, STATS_BLOCK_M), triton.cdiv(C, block_c))


def new_partials(M: int, C: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialised (cdiv(M, STATS_BLOCK_M), C) buffers for the tiles' means and variances (every row is
    written)."""
    T = triton.cdiv(M, STATS_BLOCK_M)
    dt = acc_dtype(like.dtype)
    return (torch.empty((T, C), device=like.device, dtype=dt), torch.empty((T, C), device=like.device, dtype=dt))


def stats_partials(x: Tensor) -> tuple[Tensor, Tensor]:
    """The per-tile (mean, variance) partials of x (N, C, H, W) over N * H * W, any strides."""
    N, C, H, W = x.shape
    M = N * H * W
    pm, pv = new_partials(M, C, x)
    if M == 0 or C == 0 or _is_fake(x):
        return pm, pv
    bc = _block_c(C)
    _launch(_stats_partial_kernel, _grid(M, C, bc), x, pm, pv, M, C, H * W, W, *x.stride(),
            ACC_F64=x.dtype == torch.float64, BLOCK_M=STATS_BLOCK_M, BLOCK_C=bc)
    return pm, pv


def finalize(pm: Tensor, pv: Tensor, M: int, weight: Optional[Tensor], eps: float,
             outs: Optional[tuple[Tensor, ...]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, unbiased var, scale = weight * invstd), each (C,) in the partials' dtype, from the tile
    partials of M values per channel (M >= 1; the ops refuse M == 1 in training before they get here); written
    into ``outs`` (four contiguous (C,) tensors) when given."""
    T, C = pm.shape
    if outs is None:
        outs = tuple(torch.empty(C, device=pm.device, dtype=pm.dtype) for _ in range(4))
    if C == 0 or T == 0 or _is_fake(pm):  # T == 0: an empty batch (no statistics; nothing reads them)
        return outs
    bc = _block_c(C)
    _launch(_finalize_kernel, (triton.cdiv(C, bc),), pm, pv, weight if weight is not None else pm,
            *outs, M, T, C, float(eps), HAS_WEIGHT=weight is not None, ACC_F64=pm.dtype == torch.float64,
            TILE_M=STATS_BLOCK_M, BLOCK_T=16, BLOCK_C=bc)  # BLOCK_T 32 took 66 registers on sm_90
    return outs


def running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float) -> None:
    """In place: ``running = factor * batch + (1 - factor) * running`` (nn.BatchNorm2d's update; ``var`` unbiased)."""
    C = running_mean.shape[0]
    if C == 0 or _is_fake(running_mean):
        return
    bc = _block_c(C)
    _launch(_running_update_kernel, (triton.cdiv(C, bc),), running_mean, running_var, mean, var, C, float(factor),
            BLOCK_C=bc)


def apply(z: Tensor, mean: Tensor, scale: Tensor, beta: Optional[Tensor], residual: Optional[Tensor], relu: bool,
          out: Optional[Tensor] = None) -> Tensor:
    """``relu((z - mean[c]) * scale[c] + beta[c] + residual)`` into ``out`` (any strides) or a new channels_last
    tensor."""
    N, C, H, W = z.shape
    y = out if out is not None else torch.empty_like(z, memory_format=torch.channels_last)
    M = N * H * W
    if M == 0 or C == 0 or _is_fake(z):
        return y
    r = residual if residual is not None else z
    bc = _block_c(C)
    _launch(_apply_kernel, _grid(M, C, bc), z, mean, scale, beta if beta is not None else scale, r, y,
            M, C, H * W, W, *z.stride(), *r.stride(), *y.stride(),
            HAS_BETA=beta is not None, HAS_RES=residual is not None, RELU=relu, ACC_F64=scale.dtype == torch.float64,
            BLOCK_M=STATS_BLOCK_M, BLOCK_C=bc)
    return y


def backward(dy: Tensor, dy2: Optional[Tensor], y: Optional[Tensor], z: Tensor, mean: Tensor, invstd: Tensor,
             weight: Optional[Tensor], batch_stats: bool, need_dweight: bool, need_dres: bool,
             dz_out: Optional[Tensor] = None):
    """The backward of ``y = relu(bn(z) + residual)`` (ReLU iff ``y`` is given, the saved output): returns
    (dz, dgamma, dbeta, dresidual); dgamma/dbeta are (C,) sums in the statistics' dtype (None unless
    ``need_dweight``), dresidual None unless ``need_dres``. ``dy2`` (z's shape or None) is added to ``dy``.
    ``dz_out`` (any strides) receives dz when given."""
    N, C, H, W = z.shape
    M = N * H * W
    dz = dz_out if dz_out is not None else torch.empty_like(z, memory_format=torch.channels_last)
    dres = torch.empty_like(z, memory_format=torch.channels_last) if need_dres else None
    sums = need_dweight or batch_stats
    T = triton.cdiv(M, STATS_BLOCK_M)
    pg = torch.empty((T, C), device=z.device, dtype=mean.dtype) if sums else None
    pgx = torch.empty((T, C), device=z.device, dtype=mean.dtype) if sums else None
    if M == 0 or C == 0 or _is_fake(z):
        sg = None if pg is None else pg.sum(0)
        sgx = None if pgx is None else pgx.sum(0)
        return dz, (sgx if need_dweight else None), (sg if need_dweight else None), dres
    d2 = dy2 if dy2 is not None else dy
    yy = y if y is not None else dy
    bc = _block_c(C)
    f64 = mean.dtype == torch.float64
    common = dict(HAS_DY2=dy2 is not None, RELU=y is not None, ACC_F64=f64, BLOCK_M=STATS_BLOCK_M, BLOCK_C=bc)
    sg = sgx = None
    if sums:
        _launch(_bwd_reduce_kernel, _grid(M, C, bc), dy, d2, yy, z, mean, invstd, pg, pgx, M, C, H * W, W,
                *dy.stride(), *d2.stride(), *yy.stride(), *z.stride(), **common)
        sg, sgx = pg.sum(0), pgx.sum(0)
    r = dres if dres is not None else dz
    _launch(_bwd_apply_kernel, _grid(M, C, bc), dy, d2, yy, z, mean, invstd, weight if weight is not None else mean,
            sg if sg is not None else mean, sgx if sgx is not None else mean, dz, r, M, C, H * W, W,
            *dy.stride(), *d2.stride(), *yy.stride(), *z.stride(), *dz.stride(), *r.stride(),
            HAS_WEIGHT=weight is not None, BATCH_STATS=batch_stats, WRITE_DR=need_dres, **common)
    return dz, (sgx if need_dweight else None), (sg if need_dweight else None), dres
