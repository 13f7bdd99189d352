"""Convolution + eval-mode BatchNorm (+ residual) (+ ReLU) as one implicit-GEMM Triton kernel.

What it computes: ``y = relu(conv2d(x, w * s) + b' + residual)`` where eval BatchNorm is folded into the
weights (``s = gamma / sqrt(running_var + eps)``) and the bias (``b' = beta - running_mean * s + conv_bias * s``).

Layout: GEMM over M = N * H_out * W_out output pixels and N = C_out channels; K = C_in/groups * kH * kW runs
over (kh, kw, c_in) with the input read in place through its strides (NHWC/channels_last is the fast path,
any strides work), zero padding by masking. Output is channels_last. Grouped convolutions run one group per
program column (grid axis 1 covers groups x C_out-tiles). Offsets are int64 (tensors may pass 2^31 elements).
Accumulation in fp32 (fp64 for float64 inputs, which the interpreter runs).
The idea is the implicit-GEMM convolution of cuDNN/CUTLASS and inductor's Triton conv template.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _conv_bn_act_fwd_kernel(
    X_ptr, A_ptr, PS_ptr, PT_ptr, W_ptr, B_ptr, R_ptr, Y_ptr,
    N, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_ADD: tl.constexpr, PRE_BN_RELU: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    ACC_F64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles_per_group = tl.cdiv(COUT_G, BLOCK_N)
    group = pid_n // n_tiles_per_group
    tile_n = pid_n % n_tiles_per_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_cn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # channel within the group
    m_mask = offs_m < N * H_out * W_out
    n_mask = offs_cn < COUT_G
    cout = group * COUT_G + offs_cn  # absolute output channel

    ow = offs_m % W_out
    oh = (offs_m // W_out) % H_out
    on = offs_m // (W_out * H_out)

    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    K_TOTAL: tl.constexpr = CIN_G * KH * KW
    for k0 in range(0, K_TOTAL, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K_TOTAL
        # k -> (kh, kw, c) with c fastest: consecutive k read consecutive channels (contiguous in NHWC)
        c = offs_k % CIN_G
        kw_ = (offs_k // CIN_G) % KW
        kh_ = offs_k // (CIN_G * KW)
        ih = oh[:, None] * stride_h - pad_h + kh_[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw_[None, :] * dil_w
        a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cin = (group * CIN_G + c).to(tl.int64)
        a_ptrs = X_ptr + on[:, None] * sxn + cin[None, :] * sxc + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if HAS_ADD:  # prologue: the conv input is x + A (Res2Net adds the previous split's output), never stored
            ad_ptrs = (A_ptr + on[:, None] * san + cin[None, :] * sac + ih.to(tl.int64) * sah
                       + iw.to(tl.int64) * saw)
            a += tl.load(ad_ptrs, mask=a_mask, other=0.0)
        if PRE_BN_RELU:  # pre-activation: relu(x * s[c] + t[c]) as the tile is loaded; padding stays zero after it
            ps = tl.load(PS_ptr + cin, mask=k_mask, other=0.0).to(acc_dtype)
            pt = tl.load(PT_ptr + cin, mask=k_mask, other=0.0).to(acc_dtype)
            act = tl.maximum(a.to(acc_dtype) * ps[None, :] + pt[None, :], 0.0)
            a = tl.where(a_mask, act, 0.0).to(X_ptr.dtype.element_ty)
        # packed weights: [K_TOTAL, C_out], row k, column = absolute output channel
        b_ptrs = W_ptr + offs_k.to(tl.int64)[:, None] * C_out + cout.to(tl.int64)[None, :]
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    bias = tl.load(B_ptr + cout, mask=n_mask, other=0.0).to(acc_dtype)
    acc = acc + bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    co64 = cout.to(tl.int64)
    if HAS_RES:
        r_ptrs = R_ptr + on[:, None] * srn + co64[None, :] * src + oh[:, None] * srh + ow[:, None] * srw
        acc += tl.load(r_ptrs, mask=out_mask, other=0.0).to(acc_dtype)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_ptrs = Y_ptr + on[:, None] * syn + co64[None, :] * syc + oh[:, None] * syh + ow[:, None] * syw
    tl.store(y_ptrs, acc.to(Y_ptr.dtype.element_ty), mask=out_mask)


def pack_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """(C_out, C_in/g, kH, kW) * scale[C_out] -> (kH * kW * C_in/g, C_out), k ordered (kh, kw, c)."""
    w = weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype)
    return w.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def conv_bn_act_fwd(
    x: Tensor,
    w_packed: Tensor,
    bias: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual: Optional[Tensor] = None,
    relu: bool = True,
    add: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    pre_scale: Optional[Tensor] = None,
    pre_shift: Optional[Tensor] = None,
) -> Tensor:
    """Launch the kernel. x (N, C_in, H, W) any strides; ``add`` (x's shape) is added to x while loading;
    writes ``out`` (any strides, e.g. a channel slice of a larger tensor) or returns a new channels_last tensor.
    ``pre_scale``/``pre_shift`` (C_in,) apply ``relu(x * pre_scale + pre_shift)`` to the input as it is loaded."""
    N, C_in, H, W = x.shape
    C_out = w_packed.shape[1]
    kh, kw = kernel_size
    H_out = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    W_out = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out is None:
        y = torch.empty((N, C_out, H_out, W_out), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    else:
        if tuple(out.shape) != (N, C_out, H_out, W_out):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(N, C_out, H_out, W_out)}")
        y = out
    if add is not None and tuple(add.shape) != tuple(x.shape):
        raise ValueError(f"add has shape {tuple(add.shape)}, expected the input's {tuple(x.shape)}")
    M = N * H_out * W_out
    if M == 0 or C_out == 0:
        return y
    cin_g, cout_g = C_in // groups, C_out // groups
    # tl.dot needs tiles of at least 16 on GPUs
    BLOCK_M = 64
    BLOCK_N = max(16, min(64, triton.next_power_of_2(cout_g)))
    BLOCK_K = max(16, min(32, triton.next_power_of_2(cin_g * kh * kw)))
    r = residual if residual is not None else y
    a = add if add is not None else x
    pre = pre_scale is not None
    ps = pre_scale if pre else bias
    pt = pre_shift if pre else bias
    grid = (triton.cdiv(M, BLOCK_M), groups * triton.cdiv(cout_g, BLOCK_N))
    _conv_bn_act_fwd_kernel[grid](
        x, a, ps, pt, w_packed, bias, r, y,
        N, C_in, H, W, C_out, H_out, W_out,
        *x.stride(), *a.stride(), *r.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        CIN_G=cin_g, COUT_G=cout_g, KH=kh, KW=kw,
        HAS_ADD=add is not None, PRE_BN_RELU=pre, HAS_RES=residual is not None, RELU=relu,
        ACC_F64=x.dtype == torch.float64,
        # fp32 follows cuDNN's TF32 switch, as nn.Conv2d does; other dtypes take Triton's default
        INPUT_PRECISION=("tf32" if torch.backends.cudnn.allow_tf32 and x.is_cuda else "ieee")
        if x.dtype == torch.float32 else None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return y
