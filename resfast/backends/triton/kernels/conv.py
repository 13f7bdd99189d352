"""Convolution + eval-mode BatchNorm (+ residual) (+ ReLU) as one implicit-GEMM Triton kernel.

What it computes: ``y = relu(conv2d(x, w * s) + b' + residual)`` where eval BatchNorm is folded into the
weights (``s = gamma / sqrt(running_var + eps)``) and the bias (``b' = beta - running_mean * s + conv_bias * s``).

Layout: GEMM over M = N * H_out * W_out output pixels and N = C_out channels; K = C_in/groups * kH * kW runs
over (kh, kw, c_in) with the input read in place through its strides (NHWC/channels_last is the fast path,
any strides work), zero padding by masking. Output is channels_last. Grouped convolutions: see conv_tiling
(one group per program column when groups are wide; G_TILE groups per program with a block-diagonal weight when
they are narrow, as ResNeXt's 4 or 8 channels per group; elementwise FMAs when depthwise).
Offsets are int64 (tensors may pass 2^31 elements).
Accumulation in fp32 (fp64 for float64 inputs, which the interpreter runs).

A 1x1 projection shortcut (the downsample conv + BatchNorm of a ResNet stage's first block) can ride along as a
second GEMM into the same accumulator (HAS_DS): ``y = relu(conv(x, w * s) + conv1x1(x', w' * s') + b' + b'')``, so
conv3 + bn3 + downsample + add + ReLU is one kernel and the shortcut is never written to memory.

Res2Net's pass-through split (a copy, or AvgPool2d(3, s, padding=1) in 'stage' blocks) is done by extra columns
of the first conv launch's grid (program_id(1) >= n_conv_cols): they read the split in place and write its slice
of the chain's output, so a chain of scale - 1 convs is scale - 1 launches and no ATen op.
Tile sizes (BLOCK_M, BLOCK_K, warps, stages) are autotuned per shape on the GPU, one fixed config under
TRITON_INTERPRET=1 (see tuning_configs).
The idea is the implicit-GEMM convolution of cuDNN/CUTLASS and inductor's Triton conv template.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ....ops.checks import conv_output_size
from .batchnorm import STATS_BLOCK_M, pixel_rows, tile_moments
from .common import _is_fake, interpreting, launcher  # noqa: F401  (re-exported: the ops' modules import them from here)


@triton.jit
def _bn_relu_cols(v, mask, M_ptr, S_ptr, B_ptr, cols, c_mask, out_ty: tl.constexpr, ACC_F64: tl.constexpr,
                  HAS_MEAN: tl.constexpr = True):
    """``relu((v - mean) * scale + shift)`` per column (channel) (``relu(v * scale + shift)`` without HAS_MEAN: eval
    BatchNorm folded), zero where ~mask (the padding stays zero), rounded to ``out_ty`` as an eager BatchNorm + ReLU
    would store it. (v - mean) * scale + shift as F.batch_norm computes it: v * scale + (shift - mean * scale)
    cancels catastrophically when |mean| is much larger than the spread."""
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    sc = tl.load(S_ptr + cols, mask=c_mask, other=0.0).to(acc_dtype)
    sh = tl.load(B_ptr + cols, mask=c_mask, other=0.0).to(acc_dtype)
    x = v.to(acc_dtype)
    if HAS_MEAN:
        x -= tl.load(M_ptr + cols, mask=c_mask, other=0.0).to(acc_dtype)[None, :]
    act = tl.maximum(x * sc[None, :] + sh[None, :], 0.0)
    return tl.where(mask, act, 0.0).to(out_ty)


@triton.jit
def _passthrough_tile(
    P_ptr, Q_ptr, QM_ptr, QS_ptr, QB_ptr, pid_m, pid_c,
    N, C, H, W, H_out, W_out,
    spn, spc, sph, spw,
    sqn, sqc, sqh, sqw,
    pool_stride,
    POOL: tl.constexpr, PRE_BN_RELU: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One (BLOCK_M pixels x BLOCK_C channels) tile of Res2Net's pass-through split: a copy, or
    AvgPool2d(3, pool_stride, padding=1) with count_include_pad=True (always divided by 9, as timm's).
    PRE_BN_RELU: the split is first normalised, ``relu((p - QM) * QS + QB)`` (training BatchNorm of the conv before
    the chain, whose output is then never written), each value rounded to the split's dtype before pooling."""
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    p_col = (offs_c.to(tl.int64) * spc)[None, :]
    q_col = (offs_c.to(tl.int64) * sqc)[None, :]
    # PT_ROWS rows at a time: the tile is elementwise, and a whole (BLOCK_M x BLOCK_C) tile per step would hold
    # BLOCK_M * BLOCK_C / threads values, pointers and partial sums per thread (spilled at BLOCK_M = 128)
    PT_ROWS: tl.constexpr = min(BLOCK_M, 8)
    for r0 in range(0, BLOCK_M, PT_ROWS):
        on, oh, ow, m_mask = pixel_rows(pid_m.to(tl.int64) * BLOCK_M + r0, tl.cast(N, tl.int64) * H_out * W_out,
                                        H_out, W_out, PT_ROWS)
        out_mask = m_mask[:, None] & c_mask[None, :]
        if POOL:
            acc_dtype = tl.float64 if ACC_F64 else tl.float32
            acc = tl.zeros((PT_ROWS, BLOCK_C), dtype=acc_dtype)
            p_n = on.to(tl.int64) * spn
            for t in tl.range(9, loop_unroll_factor=1):
                ih = oh * pool_stride - 1 + t // 3
                iw = ow * pool_stride - 1 + t % 3
                ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                p_row = p_n + ih.to(tl.int64) * sph + iw.to(tl.int64) * spw
                tap_mask = ok[:, None] & c_mask[None, :]
                v = tl.load(P_ptr + p_row[:, None] + p_col, mask=tap_mask, other=0.0)
                if PRE_BN_RELU:
                    v = _bn_relu_cols(v, tap_mask, QM_ptr, QS_ptr, QB_ptr, offs_c, c_mask, P_ptr.dtype.element_ty,
                                      ACC_F64)
                acc += v.to(acc_dtype)
            val = acc / 9.0
        else:
            p_row = on.to(tl.int64) * spn + oh.to(tl.int64) * sph + ow.to(tl.int64) * spw
            val = tl.load(P_ptr + p_row[:, None] + p_col, mask=out_mask, other=0.0)
            if PRE_BN_RELU:
                val = _bn_relu_cols(val, out_mask, QM_ptr, QS_ptr, QB_ptr, offs_c, c_mask, P_ptr.dtype.element_ty,
                                    ACC_F64)
        q_row = on.to(tl.int64) * sqn + oh.to(tl.int64) * sqh + ow.to(tl.int64) * sqw
        tl.store(Q_ptr + q_row[:, None] + q_col, val.to(Q_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _load_input(
    X_ptr, A_ptr, PS_ptr, PT_ptr, PC_ptr, AM_ptr, AS_ptr, AB_ptr, x_row, a_row, cin, mask, c_mask, sxc, sac,
    HAS_ADD: tl.constexpr, PRE_BN_RELU: tl.constexpr, ADD_BN_RELU: tl.constexpr, ACC_F64: tl.constexpr,
):
    """The conv input at the pixels whose int64 offsets in X and A are ``x_row``/``a_row`` [rows] and channels
    ``cin`` [columns], zero where ~mask, with the prologues: ``relu(x * ps + pt)`` (PRE_BN_RELU 1: pre-activation
    with eval BatchNorm folded) or ``relu((x - pc) * ps + pt)`` (2: with batch statistics), then ``+ A`` (Res2Net
    adds the previous split's output; never stored), itself ``relu((A - am) * as + ab)`` with ADD_BN_RELU (the
    previous split's raw conv output and its training BatchNorm: the chain's outputs are then never written). Each
    term is rounded to x's dtype before the add, as eager stores them; padding stays zero.
    Pointers are a row vector plus a column vector (no index math per element)."""
    a = tl.load(X_ptr + x_row[:, None] + (cin.to(tl.int64) * sxc)[None, :], mask=mask, other=0.0)
    if PRE_BN_RELU:
        a = _bn_relu_cols(a, mask, PC_ptr, PS_ptr, PT_ptr, cin, c_mask, X_ptr.dtype.element_ty, ACC_F64,
                          PRE_BN_RELU == 2)
    if HAS_ADD:
        b = tl.load(A_ptr + a_row[:, None] + (cin.to(tl.int64) * sac)[None, :], mask=mask, other=0.0)
        if ADD_BN_RELU:
            b = _bn_relu_cols(b, mask, AM_ptr, AS_ptr, AB_ptr, cin, c_mask, X_ptr.dtype.element_ty, ACC_F64)
        a += b
    return a


@triton.jit
def _conv_tile(
    X_ptr, A_ptr, PS_ptr, PT_ptr, PC_ptr, AM_ptr, AS_ptr, AB_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, pid_m, pid_n,
    N, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    D_ptr, WD_ptr, C_d, sdn, sdc, sdh, sdw, ds_stride_h, ds_stride_w, DM_ptr, DS_ptr, DB_ptr, PM_ptr, PV_ptr,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, G_TILE: tl.constexpr,
    DIRECT: tl.constexpr,
    HAS_ADD: tl.constexpr, PRE_BN_RELU: tl.constexpr, ADD_BN_RELU: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, HAS_DS: tl.constexpr, DS_BN_RELU: tl.constexpr, STATS: tl.constexpr, ACC_F64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M output pixels x BLOCK_N output channels) tile of the convolution with its epilogue.

    Index math stays off the (rows x columns) tiles: a row's pixel (n, oh, ow) is decomposed once per tile, its
    input pixel (ih, iw), padding mask and int64 offset once per tap, a column's channel offset once per K chunk;
    every pointer is a row vector plus a column vector."""
    M = tl.cast(N, tl.int64) * H_out * W_out
    on, oh, ow, m_mask = pixel_rows(pid_m.to(tl.int64) * BLOCK_M, M, H_out, W_out, BLOCK_M)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    x_n = on.to(tl.int64) * sxn
    a_n = on.to(tl.int64) * san

    if DIRECT:
        # one input channel per output channel (depthwise, or a channel multiplier): a GEMM would have K = kH*kW
        # per group, so each program takes BLOCK_N consecutive channels (BLOCK_N groups) and accumulates
        # x * w tap by tap with elementwise FMAs, no tl.dot
        cout = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = cout < C_out
        cin = cout // COUT_G
        for t in range(KH * KW):
            ih = oh * stride_h - pad_h + (t // KW) * dil_h
            iw = ow * stride_w - pad_w + (t % KW) * dil_w
            ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_row = x_n + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            a_row = a_n + ih.to(tl.int64) * sah + iw.to(tl.int64) * saw
            a = _load_input(X_ptr, A_ptr, PS_ptr, PT_ptr, PC_ptr, AM_ptr, AS_ptr, AB_ptr, x_row, a_row, cin,
                            ok[:, None] & n_mask[None, :], n_mask, sxc, sac, HAS_ADD, PRE_BN_RELU, ADD_BN_RELU,
                            ACC_F64)
            # packed weights with CIN_G == 1: row t = (kh, kw), column = output channel
            wv = tl.load(W_ptr + t * C_out + cout.to(tl.int64), mask=n_mask, other=0.0)
            acc += a.to(acc_dtype) * wv.to(acc_dtype)[None, :]
    else:
        # G_TILE consecutive groups per program: the GEMM over their TILE_CI input and TILE_CO output channels
        # with the block-diagonal weight (zero where the input and output groups differ), built in registers by
        # masked loads of the ordinary packed weight. G_TILE == 1 is the plain grouped (or dense) GEMM.
        TILE_CI: tl.constexpr = G_TILE * CIN_G
        TILE_CO: tl.constexpr = G_TILE * COUT_G
        n_tiles_per_gt = tl.cdiv(TILE_CO, BLOCK_N)
        gt = pid_n // n_tiles_per_gt
        offs_cn = (pid_n % n_tiles_per_gt) * BLOCK_N + tl.arange(0, BLOCK_N)  # channel within the group tile
        cout = gt * TILE_CO + offs_cn
        n_mask = (offs_cn < TILE_CO) & (cout < C_out)
        co_w = cout.to(tl.int64)[None, :]
        # K runs tap by tap (kh, kw), each tap over the group tile's channels in chunks of BLOCK_K (contiguous in
        # NHWC): one flat loop of KH * KW * N_CB steps, decomposed by scalar arithmetic, so a step's rows share
        # their tap (ih, iw, the padding mask and the row offset: per row, not per element)
        N_CB: tl.constexpr = (TILE_CI + BLOCK_K - 1) // BLOCK_K
        # per row, once: the tap (0, 0)'s input pixel and its int64 offset; rows past M get an input row far
        # below 0, so the padding test masks them too. A tap adds scalars: (kh * dil_h, kw * dil_w) to the pixel,
        # their offset to the row's.
        ih0 = tl.where(m_mask, oh * stride_h - pad_h, -(1 << 30))
        iw0 = ow * stride_w - pad_w
        x_base = x_n + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
        a_base = a_n + ih0.to(tl.int64) * sah + iw0.to(tl.int64) * saw
        for step in range(KH * KW * N_CB):
            t = step // N_CB
            cl = (step % N_CB) * BLOCK_K + tl.arange(0, BLOCK_K)  # channel within the group tile
            dh = (t // KW) * dil_h
            dw = (t % KW) * dil_w
            row_ok = (ih0 >= -dh) & (ih0 < H - dh) & (iw0 >= -dw) & (iw0 < W - dw)
            x_row = x_base + (dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw)
            a_row = a_base + (dh.to(tl.int64) * sah + dw.to(tl.int64) * saw)
            cin = gt * TILE_CI + cl
            k_mask = (cl < TILE_CI) & (cin < C_in)
            a = _load_input(X_ptr, A_ptr, PS_ptr, PT_ptr, PC_ptr, AM_ptr, AS_ptr, AB_ptr, x_row, a_row, cin,
                            row_ok[:, None] & k_mask[None, :], k_mask, sxc, sac, HAS_ADD, PRE_BN_RELU,
                            ADD_BN_RELU, ACC_F64)
            # packed weights: [KH * KW * CIN_G, C_out], row (kh, kw, c within the group), column = output channel
            w_row = (t * CIN_G + cl % CIN_G).to(tl.int64) * C_out
            b_mask = k_mask[:, None] & n_mask[None, :]
            if G_TILE > 1:
                b_mask = b_mask & ((cl // CIN_G)[:, None] == (offs_cn // COUT_G)[None, :])
            b = tl.load(W_ptr + w_row[:, None] + co_w, mask=b_mask, other=0.0)
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    co64 = cout.to(tl.int64)
    if HAS_DS:
        # the projection shortcut: a dense 1x1 GEMM over x' sampled at (oh, ow) * stride into the same accumulator
        # (its BatchNorm scale is folded into WD, its shift into B), so the residual never goes through memory;
        # DS_BN_RELU: x' is first normalised, relu((x' - DM) * DS + DB) (a pre-activation block's shortcut)
        d_row = on.to(tl.int64) * sdn + (oh * ds_stride_h).to(tl.int64) * sdh + (ow * ds_stride_w).to(tl.int64) * sdw
        for k0 in range(0, C_d, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < C_d
            ck = offs_k.to(tl.int64)
            d_mask = m_mask[:, None] & k_mask[None, :]
            a = tl.load(D_ptr + d_row[:, None] + (ck * sdc)[None, :], mask=d_mask, other=0.0)
            if DS_BN_RELU:  # the shortcut reads relu(bn(x')) (timm's pre-activation downsample), never written
                a = _bn_relu_cols(a, d_mask, DM_ptr, DS_ptr, DB_ptr, offs_k, k_mask, D_ptr.dtype.element_ty,
                                  ACC_F64)
            b = tl.load(WD_ptr + (ck * C_out)[:, None] + co64[None, :], mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0)
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    bias = tl.load(B_ptr + cout, mask=n_mask, other=0.0).to(acc_dtype)
    acc = acc + bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if STATS:
        # training BatchNorm: this tile's per-channel mean and variance, from the accumulator (the
        # raw conv output + bias, before any rounding to the output dtype), row pid_m of the partial buffers
        # (the launch runs BLOCK_M == batchnorm.STATS_BLOCK_M); batchnorm.finalize merges the rows
        n_valid = tl.minimum(M - pid_m.to(tl.int64) * BLOCK_M, BLOCK_M).to(acc_dtype)
        t_mean, t_m2 = tile_moments(acc, m_mask, n_valid)
        p_off = pid_m.to(tl.int64) * C_out + co64
        tl.store(PM_ptr + p_off, t_mean, mask=n_mask)
        tl.store(PV_ptr + p_off, t_m2, mask=n_mask)
    if HAS_RES:
        r_row = on.to(tl.int64) * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw
        acc += tl.load(R_ptr + r_row[:, None] + (co64 * src)[None, :], mask=out_mask, other=0.0).to(acc_dtype)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_row = on.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    tl.store(Y_ptr + y_row[:, None] + (co64 * syc)[None, :], acc.to(Y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv_bn_act_fwd_kernel(
    X_ptr, A_ptr, PS_ptr, PT_ptr, PC_ptr, AM_ptr, AS_ptr, AB_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, P_ptr, Q_ptr,
    QM_ptr, QS_ptr, QB_ptr,
    N, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    n_conv_cols, C_pt,
    spn, spc, sph, spw,
    sqn, sqc, sqh, sqw,
    pt_stride,
    D_ptr, WD_ptr, C_d, sdn, sdc, sdh, sdw, ds_stride_h, ds_stride_w, DM_ptr, DS_ptr, DB_ptr, PM_ptr, PV_ptr,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, G_TILE: tl.constexpr,
    DIRECT: tl.constexpr, HAS_CONV: tl.constexpr, HAS_ADD: tl.constexpr, PRE_BN_RELU: tl.constexpr,
    ADD_BN_RELU: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, HAS_PT: tl.constexpr,
    PT_POOL: tl.constexpr, PT_BN_RELU: tl.constexpr, HAS_DS: tl.constexpr, DS_BN_RELU: tl.constexpr,
    STATS: tl.constexpr, ACC_F64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n >= n_conv_cols:
        # extra columns of the grid: Res2Net's pass-through split, copied or pooled into its output slice, so the
        # chain needs no separate launch (nor an ATen op) for it
        if HAS_PT:
            _passthrough_tile(P_ptr, Q_ptr, QM_ptr, QS_ptr, QB_ptr, pid_m, pid_n - n_conv_cols, N, C_pt, H, W,
                              H_out, W_out, spn, spc, sph, spw, sqn, sqc, sqh, sqw, pt_stride,
                              PT_POOL, PT_BN_RELU, ACC_F64, BLOCK_M, BLOCK_C)
    elif HAS_CONV:
        _conv_tile(X_ptr, A_ptr, PS_ptr, PT_ptr, PC_ptr, AM_ptr, AS_ptr, AB_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, pid_m,
                   pid_n,
                   N, C_in, H, W, C_out, H_out, W_out,
                   sxn, sxc, sxh, sxw, san, sac, sah, saw, srn, src, srh, srw, syn, syc, syh, syw,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   D_ptr, WD_ptr, C_d, sdn, sdc, sdh, sdw, ds_stride_h, ds_stride_w, DM_ptr, DS_ptr, DB_ptr,
                   PM_ptr, PV_ptr,
                   CIN_G, COUT_G, KH, KW, G_TILE, DIRECT, HAS_ADD, PRE_BN_RELU, ADD_BN_RELU, HAS_RES, RELU, HAS_DS,
                   DS_BN_RELU, STATS, ACC_F64, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


def pack_weight(weight: Tensor, scale: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """(C_out, C_in/g, kH, kW) * scale[C_out] (in scale's precision) -> the kernels' packed weight
    (kH, kW, C_in/g, C_out), contiguous, in ``dtype``: row k = (kh, kw, c) of the GEMM's (K, C_out) matrix."""
    if scale is not None:
        weight = weight.to(scale.dtype) * scale.reshape(-1, 1, 1, 1)
    return weight.permute(2, 3, 1, 0).to(dtype).contiguous()


def conv_tiling(C_out: int, cin_g: int, cout_g: int, groups: int) -> tuple[int, bool, int, int]:
    """(G_TILE groups per program, DIRECT, BLOCK_N, number of conv program columns) for a conv's channels.

    tl.dot wants N and K tiles of at least 16 (the smallest MMA shapes). A dense conv, or one with >= 16 output
    channels per group, runs one group per program column (N-tiles within the group). ResNeXt's 4 or 8 channels
    per group would fill 4 or 8 of 16 columns and K = 36 or 72 padded to 64 or 96: instead G_TILE consecutive
    groups share a program, which computes the GEMM of their G_TILE * C_in/g input and G_TILE * C_out/g >= 16
    output channels with the block-diagonal weight (zero where the input and output groups differ), formed in
    registers by masked loads of the ordinary packed weight. That costs G_TILE times the multiply-adds of the
    groups alone, paid on MMA units that would otherwise idle, and buys full N tiles, a K loop whose chunks are
    contiguous NHWC channels of one tap, and G_TILE times fewer programs re-reading the same input pixels.
    One input channel per group (depthwise, or a channel multiplier) would give K = kH * kW per group and
    G_TILE = 16 block diagonals of 1 useful column in 16: DIRECT computes those with elementwise FMAs instead,
    BLOCK_N channels per program, tap by tap."""
    if C_out == 0:
        return 1, False, 16, 0
    if cin_g == 1 and groups > 1:
        block_n = max(16, min(64, triton.next_power_of_2(C_out)))
        return 1, True, block_n, triton.cdiv(C_out, block_n)
    g_tile = 1 if groups == 1 else min(groups, max(1, 16 // cout_g))
    tile_co = g_tile * cout_g
    block_n = max(16, min(64, triton.next_power_of_2(tile_co)))
    return g_tile, False, block_n, triton.cdiv(groups, g_tile) * triton.cdiv(tile_co, block_n)


class Projection(NamedTuple):
    """A 1x1 projection shortcut added inside a conv launch: ``conv2d(x, w, stride=stride)`` with ``w_packed``
    (1, 1, C_in', C_out) from pack_weight (its BatchNorm scale folded in; the shift goes into the launch's bias).
    ``x`` (N, C_in', H', W') any strides; its output pixels must be the launch's. ``pre``: (mean, scale, shift),
    each (C_in',), normalises ``x`` first: ``relu((x - mean) * scale + shift)`` (training BatchNorm + ReLU: the
    shortcut of a pre-activation block reads the block's normalised input, which is then never written)."""

    x: Tensor
    w_packed: Tensor
    stride: tuple[int, int]
    pre: Optional[tuple[Tensor, Tensor, Tensor]] = None


def _check_projection(proj: Optional[Projection], like: Tensor, N: int, C_out: int, H_out: int, W_out: int) -> None:
    if proj is None:
        return
    x, w = proj.x, proj.w_packed
    sh, sw = proj.stride
    if x.dim() != 4 or tuple(w.shape) != (1, 1, x.shape[1], C_out):
        raise ValueError(f"projection weight must be packed as (1, 1, {x.shape[1] if x.dim() == 4 else '?'}, "
                         f"{C_out}), got {tuple(w.shape)}")
    if (x.shape[0], (x.shape[2] - 1) // sh + 1, (x.shape[3] - 1) // sw + 1) != (N, H_out, W_out):
        raise ValueError(f"projection input {tuple(x.shape)} with stride {proj.stride} does not give the launch's "
                         f"{N} x {H_out} x {W_out} output pixels")
    if x.dtype != like.dtype or w.dtype != like.dtype or x.device != like.device or w.device != like.device:
        raise ValueError("projection input and weight must have the input's dtype and device")
    _check_channel_vectors("projection pre", proj.pre, x.shape[1], x)


def _projection_launch_args(proj: Optional[Projection], like: Tensor) -> dict:
    """The projection's kernel arguments (checked by _check_projection); ``like`` fills the pointers of an absent
    one."""
    if proj is None:
        return dict(D_ptr=like, WD_ptr=like, C_d=0, sdn=0, sdc=0, sdh=0, sdw=0, ds_stride_h=1, ds_stride_w=1,
                    DM_ptr=like, DS_ptr=like, DB_ptr=like, HAS_DS=False, DS_BN_RELU=False)
    x, w = proj.x, proj.w_packed
    dm, ds, db = proj.pre if proj.pre is not None else (like, like, like)
    return dict(D_ptr=x, WD_ptr=w, C_d=int(x.shape[1]), sdn=x.stride(0), sdc=x.stride(1), sdh=x.stride(2),
                sdw=x.stride(3), ds_stride_h=int(proj.stride[0]), ds_stride_w=int(proj.stride[1]), DM_ptr=dm,
                DS_ptr=ds, DB_ptr=db, HAS_DS=int(x.shape[1]) > 0, DS_BN_RELU=proj.pre is not None)


class PassThrough(NamedTuple):
    """Res2Net's pass-through split, done by extra programs of a conv launch: ``dst = src`` (pool False, stride 1)
    or ``dst = avg_pool2d(src, 3, stride, padding=1)`` with count_include_pad (pool True). Both (N, C, ., .),
    any strides (``dst`` is typically a channel slice of the chain's output). ``pre``: (mean, scale, shift), each
    (C,), normalises ``src`` first: ``relu((src - mean) * scale + shift)`` (training BatchNorm + ReLU)."""

    src: Tensor
    dst: Tensor
    pool: bool
    stride: int
    pre: Optional[tuple[Tensor, Tensor, Tensor]] = None


def _check_passthrough(pt: Optional[PassThrough], M: int, H_out: int, W_out: int) -> None:
    if pt is None:
        return
    src, dst = pt.src, pt.dst
    if src.dim() != 4 or dst.dim() != 4:
        raise ValueError(f"pass-through src and dst must be 4-D, got {src.dim()}-D and {dst.dim()}-D")
    if pt.stride < 1 or (not pt.pool and pt.stride != 1):
        raise ValueError(f"pass-through stride must be >= 1 (1 for a copy), got {pt.stride}")
    N, C, H, W = src.shape
    if pt.pool:
        oh, ow = (H - 1) // pt.stride + 1, (W - 1) // pt.stride + 1  # AvgPool2d(3, stride, padding=1)
    else:
        oh, ow = H, W
    if tuple(dst.shape) != (N, C, oh, ow) or (oh, ow) != (H_out, W_out) or N * oh * ow != M:
        raise ValueError(f"pass-through dst has shape {tuple(dst.shape)}; expected {(N, C, oh, ow)}, with the "
                         f"launch's {H_out}x{W_out} output pixels")
    if src.dtype != dst.dtype or src.device != dst.device:
        raise ValueError("pass-through src and dst must have the same dtype and device")
    _check_channel_vectors("pass-through pre", pt.pre, C, src)


def _check_channel_vectors(what: str, vecs: Optional[tuple[Tensor, ...]], C: int, like: Tensor) -> None:
    """A prologue's per-channel (mean, scale, shift): three contiguous (C,) tensors on like's device."""
    if vecs is None:
        return
    if len(vecs) != 3 or any(v.dim() != 1 or v.shape[0] != C or not v.is_contiguous() or v.device != like.device
                             for v in vecs):
        raise ValueError(f"{what} must be three contiguous ({C},) tensors (mean, scale, shift) on {like.device}")


def _passthrough_launch_args(pt: Optional[PassThrough], like: Tensor) -> dict:
    """The pass-through's kernel arguments (checked by _check_passthrough); ``like`` fills the pointers of an absent
    one. Its programs take cdiv(C_pt, BLOCK_C) grid columns (_passthrough_cols)."""
    if pt is None:
        return dict(P_ptr=like, Q_ptr=like, QM_ptr=like, QS_ptr=like, QB_ptr=like, C_pt=0, spn=0, spc=0, sph=0,
                    spw=0, sqn=0, sqc=0, sqh=0, sqw=0, pt_stride=1, HAS_PT=False, PT_POOL=False, PT_BN_RELU=False,
                    BLOCK_C=16)
    C = int(pt.src.shape[1])
    qm, qs, qb = pt.pre if pt.pre is not None else (like, like, like)
    spn, spc, sph, spw = pt.src.stride()
    sqn, sqc, sqh, sqw = pt.dst.stride()
    return dict(P_ptr=pt.src, Q_ptr=pt.dst, QM_ptr=qm, QS_ptr=qs, QB_ptr=qb, C_pt=C, spn=spn, spc=spc, sph=sph,
                spw=spw, sqn=sqn, sqc=sqc, sqh=sqh, sqw=sqw, pt_stride=pt.stride, HAS_PT=True, PT_POOL=bool(pt.pool),
                PT_BN_RELU=pt.pre is not None, BLOCK_C=max(16, min(64, triton.next_power_of_2(C))))


def _passthrough_cols(args: dict) -> int:
    return triton.cdiv(args["C_pt"], args["BLOCK_C"])


class Prologue(NamedTuple):
    """The input's BatchNorm + ReLU, applied to each input tile as it is loaded: ``relu(x * scale + shift)`` (eval
    BatchNorm folded), or ``relu((x - mean) * scale + shift)`` with ``mean`` (training statistics). Each (C_in,)."""

    scale: Tensor
    shift: Tensor
    mean: Optional[Tensor] = None


def _prologue_launch_args(pro: Optional[Prologue], like: Tensor) -> dict:
    if pro is None:
        return dict(PS_ptr=like, PT_ptr=like, PC_ptr=like, PRE_BN_RELU=0)
    return dict(PS_ptr=pro.scale, PT_ptr=pro.shift, PC_ptr=pro.mean if pro.mean is not None else pro.scale,
                PRE_BN_RELU=2 if pro.mean is not None else 1)


class Add(NamedTuple):
    """A tensor of the input's shape (any strides) added to the input as it is loaded (Res2Net adds the previous
    split's output; the sum is never stored), after the input's Prologue. ``pre``: (mean, scale, shift), each
    (C_in,), normalises it first: ``relu((tensor - mean) * scale + shift)`` (the previous split's raw conv output
    and its training BatchNorm)."""

    tensor: Tensor
    pre: Optional[tuple[Tensor, Tensor, Tensor]] = None


def _check_add(add: Optional[Add], x: Tensor) -> None:
    if add is None:
        return
    if tuple(add.tensor.shape) != tuple(x.shape):
        raise ValueError(f"add has shape {tuple(add.tensor.shape)}, expected the input's {tuple(x.shape)}")
    _check_channel_vectors("add pre", add.pre, x.shape[1], x)


def _add_launch_args(add: Optional[Add], x_args: dict, like: Tensor) -> dict:
    """The added tensor's kernel arguments (checked by _check_add); an absent one reads as the input (``x_args``:
    X_ptr and its strides), ``like`` fills its normalisation's pointers."""
    if add is None:
        return dict(A_ptr=x_args["X_ptr"], san=x_args["sxn"], sac=x_args["sxc"], sah=x_args["sxh"],
                    saw=x_args["sxw"], AM_ptr=like, AS_ptr=like, AB_ptr=like, HAS_ADD=False, ADD_BN_RELU=False)
    t = add.tensor
    am, as_, ab = add.pre if add.pre is not None else (like, like, like)
    san, sac, sah, saw = t.stride()
    return dict(A_ptr=t, san=san, sac=sac, sah=sah, saw=saw, AM_ptr=am, AS_ptr=as_, AB_ptr=ab, HAS_ADD=True,
                ADD_BN_RELU=add.pre is not None)


class Statistics(NamedTuple):
    """Training BatchNorm's per-tile partials of the conv output (conv + bias), written by the launch: two
    (cdiv(M, STATS_BLOCK_M), C_out) buffers (batchnorm.new_partials), each tile's per-channel mean and M2."""

    mean: Tensor
    m2: Tensor


def _statistics_launch_args(stats: Optional[Statistics], like: Tensor) -> dict:
    if stats is None:
        return dict(PM_ptr=like, PV_ptr=like, STATS=False)
    return dict(PM_ptr=stats.mean, PV_ptr=stats.m2, STATS=True)


class _Conv(NamedTuple):
    """The conv of a launch (conv_bn_act_fwd's arguments, checked): ``y`` its output."""

    x: Tensor
    w_packed: Tensor
    bias: Tensor
    y: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    residual: Optional[Tensor]
    relu: bool


def _conv_launch_args(conv: Optional[_Conv], like: Tensor) -> dict:
    """The conv's kernel arguments; an absent one (a pass-through-only launch) has no program columns and reads
    ``like`` with zero strides. Its programs take n_conv_cols grid columns."""
    if conv is None:
        return dict(X_ptr=like, W_ptr=like, B_ptr=like, R_ptr=like, Y_ptr=like, C_in=0, C_out=0,
                    sxn=0, sxc=0, sxh=0, sxw=0, srn=0, src=0, srh=0, srw=0, syn=0, syc=0, syh=0, syw=0,
                    stride_h=1, stride_w=1, pad_h=0, pad_w=0, dil_h=1, dil_w=1, n_conv_cols=0,
                    CIN_G=1, COUT_G=1, KH=1, KW=1, G_TILE=1, DIRECT=False, HAS_CONV=False, HAS_RES=False, RELU=False,
                    INPUT_PRECISION=None, BLOCK_N=16)
    x, y = conv.x, conv.y
    r = conv.residual if conv.residual is not None else y
    # channel counts are compile-time constants of the kernel (specialised if they are symbolic under tracing)
    kh, kw, _, C_out = (int(d) for d in conv.w_packed.shape)
    C_in, groups = int(x.shape[1]), int(conv.groups)
    cin_g, cout_g = C_in // groups, C_out // groups
    g_tile, direct, block_n, n_conv_cols = conv_tiling(C_out, cin_g, cout_g, groups)
    sxn, sxc, sxh, sxw = x.stride()
    srn, src, srh, srw = r.stride()
    syn, syc, syh, syw = y.stride()
    return dict(X_ptr=x, W_ptr=conv.w_packed, B_ptr=conv.bias, R_ptr=r, Y_ptr=y, C_in=C_in, C_out=C_out,
                sxn=sxn, sxc=sxc, sxh=sxh, sxw=sxw, srn=srn, src=src, srh=srh, srw=srw, syn=syn, syc=syc, syh=syh,
                syw=syw, stride_h=conv.stride[0], stride_w=conv.stride[1], pad_h=conv.padding[0],
                pad_w=conv.padding[1], dil_h=conv.dilation[0], dil_w=conv.dilation[1], n_conv_cols=n_conv_cols,
                CIN_G=cin_g, COUT_G=cout_g, KH=kh, KW=kw, G_TILE=g_tile, DIRECT=direct, HAS_CONV=C_out > 0,
                HAS_RES=conv.residual is not None, RELU=conv.relu,
                # fp32 follows cuDNN's TF32 switch, as nn.Conv2d does; other dtypes take Triton's default
                INPUT_PRECISION=("tf32" if torch.backends.cudnn.allow_tf32 and x.is_cuda else "ieee")
                if x.dtype == torch.float32 else None,
                BLOCK_N=block_n)


# Autotuning: a few tile shapes per conv shape, benchmarked once per key on the GPU (Triton's autotuner caches
# the winner per key in memory). BLOCK_N, G_TILE and the pass-through's BLOCK_C follow from the channels
# (conv_tiling), so they are not tuned.
CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 16}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=2, num_stages=3),
    # for inputs Triton cannot load in 16-byte vectors (_vector_loads): at most 8 rows of the A tile per thread
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 16}, num_warps=8, num_stages=4),  # STATS launches need BLOCK_M 64
]
# the configs only unaligned inputs try (the last three above; see _rows_per_thread)
_UNALIGNED_ONLY = 3


def _vector_loads(t, *strides) -> bool:
    """Whether Triton's specialisation lets a kernel load t's channels (stride 1) in 16-byte vectors: its address a
    multiple of 16 bytes and its pixel strides multiples of 16 elements (what triton.jit specialises on). Res2Net's
    splits (26 or 14 channels at a channel offset) are not: each element is then a load of its own."""
    return t.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in strides)


def _rows_per_thread(c) -> int:
    """The rows of the (BLOCK_M x BLOCK_K) input tile each thread holds when its loads are scalar: Triton lays the
    32 threads of a warp along the (contiguous) channels, so a thread gets BLOCK_M / (warps * (32 / BLOCK_K)) rows,
    each with its own 64-bit address, mask and value. More than 8 fill 255 registers or spill on sm_90."""
    return c.kwargs["BLOCK_M"] // (c.num_warps * max(1, 32 // c.kwargs["BLOCK_K"]))


def _prune_alignment(configs, aligned: bool, elem_bytes: int, block_n: int, eight_warps: bool = False):
    """16-bit inputs: aligned ones try all but the unaligned-only configs, unaligned ones the configs with at most 8
    rows per thread (_rows_per_thread). fp32 with 64 output channels per tile: the configs with at most 16 input
    elements per thread (the 128-row tiles spill on sm_90), not the unaligned-only ones. Otherwise (fp32 with
    narrower tiles, float64: the interpreter's) all but the unaligned-only. ``eight_warps``: keep the
    unaligned-only configs too (8 warps over a 64-row tile: the launches whose 4-warp tiles need more than 128
    registers, so fewer than 16 warps per SM on sm_90: a statistics epilogue, an output stored element by
    element)."""
    if elem_bytes == 2 and not aligned:
        return [c for c in configs if _rows_per_thread(c) <= 8]
    if elem_bytes == 4 and block_n >= 64:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 16 * 32 * c.num_warps]
    return configs if eight_warps else _without_unaligned_only(configs)


def _prune_store(configs, aligned: bool, block_n: int):
    """An output tile stored without 16-byte vectors (Res2Net's 26/52/104-channel splits and outputs: each element
    a store of its own, with its own 64-bit address): the configs with at most 32 output elements per thread. The
    128 x 64 tile on 4 warps (64 per thread) fills 255 registers and spills 600 bytes on sm_90 there."""
    if aligned:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * block_n <= 32 * 32 * c.num_warps]


def _without_unaligned_only(configs):
    return [c for c in configs if not any(c is u for u in CONFIGS[-_UNALIGNED_ONLY:])]


# the shape and the structure of the launch; Triton adds every tensor's dtype
AUTOTUNE_KEY = ["N", "C_in", "H", "W", "C_out", "H_out", "W_out", "stride_h", "stride_w", "dil_h", "dil_w", "C_pt",
                "C_d", "CIN_G", "COUT_G", "KH", "KW", "G_TILE", "DIRECT", "HAS_CONV", "HAS_ADD", "PRE_BN_RELU",
                "ADD_BN_RELU", "HAS_PT", "PT_BN_RELU", "HAS_DS", "DS_BN_RELU", "STATS"]


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the problem (BLOCK_M beyond the output pixels, BLOCK_K beyond the reduction), tiles
    that do not fit the input's alignment and dtype in registers (_prune_alignment) and, where no tl.dot reduces
    over K (DIRECT, pass-through only), configs that differ only in BLOCK_K."""
    a = {**named_args, **kwargs}
    if a["STATS"]:  # the statistics partials have one row per STATS_BLOCK_M output pixels
        configs = [c for c in configs if c.kwargs["BLOCK_M"] == STATS_BLOCK_M]
    max_m = max(32, triton.next_power_of_2(a["N"] * a["H_out"] * a["W_out"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m]
    if a["HAS_CONV"] and not a["DIRECT"]:
        max_k = max(16, triton.next_power_of_2(a["KH"] * a["KW"] * a["G_TILE"] * a["CIN_G"]))
        kept = [c for c in kept if c.kwargs["BLOCK_K"] <= max_k]
        aligned = a["sxc"] == 1 and _vector_loads(a["X_ptr"], a["sxn"], a["sxh"], a["sxw"]) and (
            not a["HAS_ADD"] or (a["sac"] == 1 and _vector_loads(a["A_ptr"], a["san"], a["sah"], a["saw"])))
        y_aligned = a["syc"] == 1 and _vector_loads(a["Y_ptr"], a["syn"], a["syh"], a["syw"])
        kept = _prune_alignment(kept, aligned, a["X_ptr"].element_size(), a["BLOCK_N"],
                                eight_warps=bool(a["STATS"]) or not y_aligned)
        kept = _prune_store(kept, y_aligned, a["BLOCK_N"])
        if a["HAS_PT"]:  # with the pass-through's programs, 2 warps spill (4 B on sm_90 at a 3x3 Res2Net conv)
            kept = [c for c in kept if c.num_warps > 2]
    else:
        kept = _without_unaligned_only(kept)
        seen: set = set()
        kept = [c for c in kept if not ((c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in seen
                                        or seen.add((c.kwargs["BLOCK_M"], c.num_warps, c.num_stages)))]
    return kept or configs[:1]


def make_tuned_kernel(configs, do_bench=None):
    """_conv_bn_act_fwd_kernel under triton.autotune over `configs`, keyed by AUTOTUNE_KEY (``do_bench``: Triton's
    benchmark function, replaceable so tests can count benchmarks on the CPU)."""
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": capped(_prune_configs)},
                           do_bench=do_bench)(_conv_bn_act_fwd_kernel)


# RESFAST_TUNE, read at import: "full" (default) autotunes over every config of each list on a GPU; "quick" over
# the first QUICK_CONFIGS only, bounding compile time (each config of each shape is a compile and a benchmark), as
# scripts/gpu_check.sh does on a time-limited GPU: the first of the configs the launch's prune function keeps where
# a kernel has one (capped), else of the list (tuning_configs). The interpreter always runs one config.
TUNE_MODES = ("full", "quick")
QUICK_CONFIGS = 2


def tuning_mode() -> str:
    mode = os.environ.get("RESFAST_TUNE", "full").strip().lower() or "full"
    if mode not in TUNE_MODES:
        warnings.warn(f"RESFAST_TUNE={mode!r} is not one of {TUNE_MODES}; using 'full'", RuntimeWarning, stacklevel=2)
        return "full"
    return mode


def tuning_configs(configs=None, pruned: bool = False):
    """The configs the launches try (``configs``: a list of triton.Config, default CONFIGS): all of them on a GPU,
    the first QUICK_CONFIGS with RESFAST_TUNE=quick (all of them if ``pruned``: the kernel's prune function,
    wrapped in capped, takes the first of those it keeps, so quick tuning never falls back to a config the prune
    rejects); exactly one under TRITON_INTERPRET=1, where benchmarking would be slow and would time numpy, not a
    GPU (with one config Triton's autotuner runs it without benchmarking)."""
    configs = CONFIGS if configs is None else configs
    if interpreting():
        return configs[:1]
    return configs[:QUICK_CONFIGS] if tuning_mode() == "quick" and not pruned else configs


def capped(prune):
    """An early_config_prune function that keeps at most QUICK_CONFIGS of what ``prune`` keeps with
    RESFAST_TUNE=quick (read now, at import, as tuning_configs does), all of them otherwise."""
    if tuning_mode() != "quick":
        return prune

    def prune_quick(configs, named_args, **kwargs):
        return prune(configs, named_args, **kwargs)[:QUICK_CONFIGS]
    prune_quick.__doc__ = prune.__doc__
    return prune_quick


_tuned_kernel = make_tuned_kernel(tuning_configs(pruned=True))


def _launch(M, n_cols, **kwargs):
    """Every launch of the kernel goes through here (tests wrap it to count launches): the autotuned kernel over
    a grid of (M-tiles of the chosen BLOCK_M, n_cols program columns), through common.launcher (wrap_triton on a
    GPU, so torch.compile sees the launch when the resfast_triton ops are decomposed). Every argument by name."""
    launcher(_tuned_kernel)[lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]), n_cols)](**kwargs)


def _launch_fwd(conv: Optional[_Conv] = None, prologue: Optional[Prologue] = None, add: Optional[Add] = None,
                passthrough: Optional[PassThrough] = None, projection: Optional[Projection] = None,
                stats: Optional[Statistics] = None) -> None:
    """One launch of the kernel from its (checked) parts, each absent one by its own defaults: the output pixels
    are the conv's (its input and output), or the pass-through's without a conv. Absent per-channel vectors point
    at the conv's bias, absent tensors at its input (the pass-through's source without a conv)."""
    if conv is not None:
        (N, _, H, W), (H_out, W_out), like, vec_like = conv.x.shape, conv.y.shape[2:], conv.x, conv.bias
    else:
        (N, _, H, W), (H_out, W_out), like = passthrough.src.shape, passthrough.dst.shape[2:], passthrough.src
        vec_like = like
    conv_part = _conv_launch_args(conv, like)
    pt_part = _passthrough_launch_args(passthrough, like)
    _launch(
        N * H_out * W_out, conv_part["n_conv_cols"] + _passthrough_cols(pt_part),
        N=N, H=H, W=W, H_out=H_out, W_out=W_out,
        **conv_part,
        **_prologue_launch_args(prologue, vec_like),
        **_add_launch_args(add, conv_part, vec_like),
        **pt_part,
        **_projection_launch_args(projection, like),
        **_statistics_launch_args(stats, vec_like),
        ACC_F64=like.dtype == torch.float64,
    )


def passthrough_fwd(pt: PassThrough) -> None:
    """Only the pass-through programs, for a chain with no conv (paper order with scale 1): one launch."""
    N, C, H, W = pt.src.shape
    H_out, W_out = pt.dst.shape[2], pt.dst.shape[3]
    M = N * H_out * W_out
    _check_passthrough(pt, M, H_out, W_out)
    if M == 0 or C == 0 or _is_fake(pt.src):
        return
    _launch_fwd(passthrough=pt)


def conv_bn_act_fwd(
    x: Tensor,
    w_packed: Tensor,
    bias: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    out: Optional[Tensor] = None,
    prologue: Optional[Prologue] = None,
    add: Optional[Add] = None,
    passthrough: Optional[PassThrough] = None,
    projection: Optional[Projection] = None,
    stats: Optional[Statistics] = None,
) -> Tensor:
    """Launch the kernel. x (N, C_in, H, W) any strides; ``w_packed`` (kH, kW, C_in/groups, C_out) from pack_weight;
    ``bias`` (C_out,) the folded shift (plus the projection's); writes ``out`` (any strides, e.g. a channel slice of
    a larger tensor) or returns a new channels_last tensor.
    ``prologue`` normalises the input as it is loaded; ``add`` (x's shape) is added to it while loading (see
    Prologue, Add). ``passthrough`` (same output pixels) is copied/pooled by extra programs of the same launch;
    ``projection`` (a 1x1 shortcut conv, same output pixels) is added to the accumulator before the bias, residual
    and ReLU. ``stats`` (Statistics) receive the per-tile mean and variance of the output (conv + bias) for training
    BatchNorm; no residual or ReLU with them."""
    N, C_in, H, W = x.shape
    kh, kw, cin_g_w, C_out = w_packed.shape
    if cin_g_w * groups != C_in:
        raise ValueError(f"packed weight {tuple(w_packed.shape)} with groups={groups} does not fit an input with "
                         f"{C_in} channels")
    H_out, W_out = conv_output_size((H, W), (kh, kw), stride, padding, dilation)
    if out is None:
        y = torch.empty((N, C_out, H_out, W_out), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        if tuple(out.shape) != (N, C_out, H_out, W_out):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(N, C_out, H_out, W_out)}")
        y = out
    _check_add(add, x)
    M = N * H_out * W_out
    _check_passthrough(passthrough, M, H_out, W_out)
    _check_projection(projection, x, N, C_out, H_out, W_out)
    if M == 0 or _is_fake(x):
        return y
    if C_out == 0 and (passthrough is None or passthrough.src.shape[1] == 0):
        return y
    if stats is not None and (residual is not None or relu or projection is not None):
        raise ValueError("stats are the conv output's: no residual, projection or ReLU in the same launch")
    conv = _Conv(x, w_packed, bias, y, stride, padding, dilation, groups, residual, relu)
    _launch_fwd(conv, prologue, add, passthrough, projection, stats)
    return y
