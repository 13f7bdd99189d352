"""A convolution's data and weight gradients as Triton implicit GEMMs, and the switch between them and ATen.

Every training op's backward asks ``conv_backward`` for a convolution's (dx, dweight, dbias); it has the
contract of ``aten.convolution_backward`` (not transposed). ``RESFAST_CONV_BACKWARD`` picks the implementation
at each call:

* ``aten`` (the default): ATen's ``convolution_backward`` (cuDNN on a GPU);
* ``triton``: the two kernels below (shapes they do not take, depthwise and channel multipliers, stay on ATen).

Which is faster on a GPU is what ``benchmarks/bench_conv_backward.py`` measures, per convolution of the three
target networks; the default stays ATen until a measurement says otherwise (see benchmarks/README.md).

Data gradient (``_dgrad_kernel``): GEMM over the input pixels (rows) and input channels (columns), reducing over
(kh, kw, output channel of the group). ``dx[n, ci, ih, iw] = sum w[co, ci, kh, kw] * dy[n, co, oh, ow]`` over the
taps with ``oh * stride = ih + pad - kh * dil`` (in range). Strided convolutions: the grid's third axis is the
input pixel's phase ``(ih % stride_h, iw % stride_w)``; a phase's rows share which taps hit an output pixel, so
the taps that do not are skipped whole, not masked (no zero-inserted gradient, no wasted MMA).
Weight gradient (``_wgrad_kernel``): GEMM over output channels (rows) and (tap, input channel) (columns),
reducing over the N * H_out * W_out output pixels, split into chunks along the grid's third axis; each chunk
writes its fp32 partial (no atomics: deterministic), the chunks are summed by one reduction.
Grouped convolutions tile as the forward kernel (conv.py, conv_tiling): G_TILE narrow groups per program with a
block-diagonal weight. Any input strides (NHWC is the fast path), offsets in int64, accumulation in fp32 (fp64
for float64, which the interpreter runs), fp32 inputs with TF32 when cuDNN's switch allows it, as nn.Conv2d.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ....ops.checks import conv_output_size
from ....ops.dtypes import acc_dtype
from .batchnorm import pixel_rows
from .common import _is_fake, launcher
from .conv import CONFIGS, _prune_alignment, _prune_store, _vector_loads, capped, conv_tiling, tuning_configs

BACKENDS = ("aten", "triton")


def backend() -> str:
    """The conv-gradient implementation this call uses (``RESFAST_CONV_BACKWARD``, read at each call)."""
    name = os.environ.get("RESFAST_CONV_BACKWARD", "aten")
    if name not in BACKENDS:
        raise ValueError(f"RESFAST_CONV_BACKWARD must be one of {BACKENDS}, got {name!r}")
    return name


@triton.jit
def _dgrad_kernel(
    DY_ptr, W_ptr, DX_ptr,
    N, C_in, H, W, C_out, H_out, W_out,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, G_TILE: tl.constexpr,
    ACC_F64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // stride_w
    pw = phase % stride_w
    Hp = (H - ph + stride_h - 1) // stride_h  # rows of this phase: ih = ph + stride_h * i
    Wp = (W - pw + stride_w - 1) // stride_w
    # the rows' (n, i, j) in int32 from one int64 tile start (int64 offsets per row below: the tensors may pass 2^31)
    on, i_p, j_p, m_mask = pixel_rows(pid_m.to(tl.int64) * BLOCK_M, tl.cast(N, tl.int64) * Hp * Wp, Hp, Wp,
                                      BLOCK_M)
    iw = j_p * stride_w + pw
    ih = i_p * stride_h + ph
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)

    # columns: input channels of G_TILE groups; reduction: those groups' output channels, tap by tap
    TILE_CI: tl.constexpr = G_TILE * CIN_G
    TILE_CO: tl.constexpr = G_TILE * COUT_G
    n_tiles_per_gt = tl.cdiv(TILE_CI, BLOCK_N)
    gt = pid_n // n_tiles_per_gt
    offs_cn = (pid_n % n_tiles_per_gt) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group tile
    cin = gt * TILE_CI + offs_cn
    n_mask = (offs_cn < TILE_CI) & (cin < C_in)
    # per row, once: the int64 offset of dy at (n, i, j); a tap adds the scalar offset of (qh, qw) below. Rows past
    # M get a row far below 0, so the tap's range test masks them too.
    i_m = tl.where(m_mask, i_p, -(1 << 30))
    dy_base = on.to(tl.int64) * sdn + i_p.to(tl.int64) * sdh + j_p.to(tl.int64) * sdw
    for t in range(KH * KW):
        kh = t // KW
        kw = t % KW
        num_h = ph + pad_h - kh * dil_h  # + stride_h * i: divisible by stride_h for all rows or for none
        num_w = pw + pad_w - kw * dil_w
        if (num_h % stride_h == 0) & (num_w % stride_w == 0):
            # exact: oh = (ih + pad_h - kh * dil_h) / stride_h = i + qh, ow = j + qw for every row of the phase
            qh = num_h // stride_h
            qw = num_w // stride_w
            row_ok = (i_m >= -qh) & (i_m < H_out - qh) & (j_p >= -qw) & (j_p < W_out - qw)
            dy_row = dy_base + (qh.to(tl.int64) * sdh + qw.to(tl.int64) * sdw)
            for k0 in range(0, TILE_CO, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)  # output channel within the group tile
                cout = gt * TILE_CO + offs_k
                k_mask = (offs_k < TILE_CO) & (cout < C_out)
                a = tl.load(DY_ptr + dy_row[:, None] + cout.to(tl.int64)[None, :] * sdc,
                            mask=row_ok[:, None] & k_mask[None, :], other=0.0)
                # packed (KH, KW, C_out, CIN_G): row (tap, output channel), column = input channel of its group
                b_mask = k_mask[:, None] & n_mask[None, :]
                if G_TILE > 1:
                    b_mask = b_mask & ((offs_k // COUT_G)[:, None] == (offs_cn // CIN_G)[None, :])
                w_off = ((t * C_out + cout.to(tl.int64)) * CIN_G)[:, None] + (offs_cn % CIN_G)[None, :]
                b = tl.load(W_ptr + w_off, mask=b_mask, other=0.0)
                acc += tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    out_mask = m_mask[:, None] & n_mask[None, :]
    x_row = on.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
    x_ptrs = DX_ptr + x_row[:, None] + (cin.to(tl.int64) * sxc)[None, :]
    tl.store(x_ptrs, acc.to(DX_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wgrad_kernel(
    DY_ptr, X_ptr, P_ptr,
    N, C_in, H, W, C_out, H_out, W_out,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    chunk, n_ci_tiles,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, G_TILE: tl.constexpr,
    ACC_F64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    TILE_CI: tl.constexpr = G_TILE * CIN_G
    TILE_CO: tl.constexpr = G_TILE * COUT_G
    n_tiles_per_gt = tl.cdiv(TILE_CO, BLOCK_N)
    gt = pid_n // n_tiles_per_gt
    offs_cn = (pid_n % n_tiles_per_gt) * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group tile
    cout = gt * TILE_CO + offs_cn
    n_mask = (offs_cn < TILE_CO) & (cout < C_out)
    t = pid_k // n_ci_tiles  # the tap (kh, kw)
    offs_ci = (pid_k % n_ci_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)  # input channel within the group tile
    cin = gt * TILE_CI + offs_ci
    c_mask = (offs_ci < TILE_CI) & (cin < C_in)
    kh = t // KW
    kw = t % KW
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=acc_dtype)
    M = tl.cast(N, tl.int64) * H_out * W_out  # may pass 2^31
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, M)
    dy_col = cout.to(tl.int64) * sdc
    x_col = cin.to(tl.int64) * sxc
    for m0 in range(start, end, BLOCK_M):
        # the rows' (n, oh, ow) in int32 from the int64 chunk position; int64 offsets per row and per column
        on, oh, ow, m_mask = pixel_rows(m0, end, H_out, W_out, BLOCK_M)
        dy_row = on.to(tl.int64) * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        dy = tl.load(DY_ptr + dy_row[:, None] + dy_col[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = on.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        x = tl.load(X_ptr + x_row[:, None] + x_col[None, :], mask=ok[:, None] & c_mask[None, :], other=0.0)
        acc += tl.dot(tl.trans(dy), x, input_precision=INPUT_PRECISION, out_dtype=acc_dtype)

    # this chunk's partial of dweight, packed (KH, KW, CIN_G, C_out): only the block diagonal (a group's own
    # input channels) is a weight; every entry is written by exactly one program per chunk
    keep = n_mask[:, None] & c_mask[None, :]
    if G_TILE > 1:
        keep = keep & ((offs_cn // COUT_G)[:, None] == (offs_ci // CIN_G)[None, :])
    row = t * CIN_G + (offs_ci % CIN_G).to(tl.int64)
    p_off = (split.to(tl.int64) * (KH * KW * CIN_G) + row[None, :]) * C_out + cout.to(tl.int64)[:, None]
    tl.store(P_ptr + p_off, acc, mask=keep)


# Autotuning on the GPU (one config under the interpreter), keyed by the shape as the forward kernel's; dgrad is the
# forward's GEMM with the channel roles swapped and tries the forward's tiles (conv.CONFIGS)
_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 32}, num_warps=2, num_stages=3),
    # for dy or x that Triton cannot load in 16-byte vectors: at most 16 elements of each operand per thread
    triton.Config({"BLOCK_M": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=3),
]
# the configs only unaligned operands try (the last three above; see _prune_wgrad)
_WGRAD_UNALIGNED_ONLY = 3
_KEY = ["N", "C_in", "H", "W", "C_out", "H_out", "W_out", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
        "CIN_G", "COUT_G", "KH", "KW", "G_TILE"]
# wgrad chunks of the output pixels are multiples of the largest BLOCK_M, so every config tiles a chunk exactly
_CHUNK_ALIGN = 128


def _prune_dgrad(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    max_m = max(32, triton.next_power_of_2(a["N"] * a["H"] * a["W"]))
    max_k = max(16, triton.next_power_of_2(a["G_TILE"] * a["COUT_G"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_K"] <= max_k]
    # dy is the GEMM's A operand: tiles that fit its alignment (conv._prune_alignment)
    # dx is the output tile: where it is stored element by element, at most 32 elements per thread, and the 8-warp
    # tiles are tried too
    dx_aligned = a["sxc"] == 1 and _vector_loads(a["DX_ptr"], a["sxn"], a["sxh"], a["sxw"])
    kept = _prune_alignment(kept, a["sdc"] == 1 and _vector_loads(a["DY_ptr"], a["sdn"], a["sdh"], a["sdw"]),
                            a["DY_ptr"].element_size(), a["BLOCK_N"], eight_warps=not dx_aligned)
    kept = _prune_store(kept, dx_aligned, a["BLOCK_N"])
    return kept or configs[:1]


def _prune_wgrad(configs, named_args, **kwargs):
    """Both operands (dy: BLOCK_M x BLOCK_N, x: BLOCK_M x BLOCK_C) are loaded in 16-byte vectors: the configs but the
    unaligned-only ones. Otherwise each element is a load with its own 64-bit address: the configs with at most 16
    elements of an operand per thread (with 32 or 64, as the 128-row tiles on 4 warps have, 255 registers and up
    to 2.3 KB of spills on sm_90)."""
    a = {**named_args, **kwargs}
    aligned = (a["sdc"] == 1 and _vector_loads(a["DY_ptr"], a["sdn"], a["sdh"], a["sdw"])
               and a["sxc"] == 1 and _vector_loads(a["X_ptr"], a["sxn"], a["sxh"], a["sxw"]))
    if aligned:
        kept = [c for c in configs if not any(c is u for u in _WGRAD_CONFIGS[-_WGRAD_UNALIGNED_ONLY:])]
    else:
        width = max(a["BLOCK_N"], a["BLOCK_C"])
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * width <= 16 * 32 * c.num_warps]
    return kept or configs[:1]


def _tuned(kernel, configs, key, prune):
    # one config under the interpreter; with RESFAST_TUNE=quick the first few that the prune keeps (capped)
    use = tuning_configs(configs, pruned=True)
    return triton.autotune(configs=use, key=key, prune_configs_by={"early_config_prune": capped(prune)})(kernel)


_dgrad = _tuned(_dgrad_kernel, CONFIGS, _KEY, _prune_dgrad)
_wgrad = _tuned(_wgrad_kernel, _WGRAD_CONFIGS, _KEY + ["chunk"], _prune_wgrad)


def _precision(t: Tensor):
    return ("tf32" if torch.backends.cudnn.allow_tf32 and t.is_cuda else "ieee") if t.dtype == torch.float32 \
        else None


def supported(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Shapes the Triton kernels take: every conv except one input or output channel per group (depthwise and
    channel multipliers, which a GEMM tile would waste; they stay on ATen)."""
    cin_g, cout_g = weight.shape[1], weight.shape[0] // groups
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and (
        groups == 1 or (cin_g > 1 and cout_g > 1))


def _check(dy: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> None:
    if dy.dim() != 4 or x.dim() != 4 or weight.dim() != 4:
        raise ValueError("conv gradients need 4-D grad_output, input and weight")
    C_out, cin_g, kh, kw = weight.shape
    if cin_g * groups != x.shape[1] or C_out % groups:
        raise ValueError(f"weight {tuple(weight.shape)} with groups={groups} does not fit an input with "
                         f"{x.shape[1]} channels")
    want = (x.shape[0], C_out, *conv_output_size(tuple(x.shape[2:]), (kh, kw), stride, padding, dilation))
    if tuple(dy.shape) != want:
        raise ValueError(f"grad_output has shape {tuple(dy.shape)}, expected {want}")
    if not (dy.dtype == x.dtype == weight.dtype) or not (dy.device == x.device == weight.device):
        raise ValueError("grad_output, input and weight must share dtype and device")


def _wgrad_split(M: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(chunk, chunks): enough programs to fill the GPU (about 4 per SM), chunks at least 4 tiles of pixels."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, min(triton.cdiv(4 * sms, max(n_tiles, 1)), triton.cdiv(M, 4 * _CHUNK_ALIGN)))
    chunk = triton.cdiv(triton.cdiv(M, want), _CHUNK_ALIGN) * _CHUNK_ALIGN
    return chunk, triton.cdiv(M, chunk)


def conv_dgrad(dy: Tensor, x_shape, weight: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """The input gradient of ``conv2d(x, weight, stride, padding, dilation, groups)``: (N, C_in, H, W),
    channels_last, dy's dtype."""
    N, C_in, H, W = (int(v) for v in x_shape)
    C_out, cin_g, kh, kw = (int(v) for v in weight.shape)
    cout_g = C_out // groups
    dx = torch.empty((N, C_in, H, W), device=dy.device, dtype=dy.dtype, memory_format=torch.channels_last)
    if dx.numel() == 0 or _is_fake(dy):
        return dx
    if dy.numel() == 0 or C_out == 0:
        return dx.zero_()
    # the data gradient is the forward conv with the channel roles swapped: tile its columns (input channels)
    g_tile, _, block_n, n_cols = conv_tiling(C_in, cout_g, cin_g, groups)
    w_packed = weight.permute(2, 3, 0, 1).contiguous()  # (KH, KW, C_out, C_in/g)
    sh, sw = int(stride[0]), int(stride[1])
    m_max = N * triton.cdiv(H, sh) * triton.cdiv(W, sw)
    launcher(_dgrad)[lambda cfg: (triton.cdiv(m_max, cfg["BLOCK_M"]), n_cols, sh * sw)](
        dy, w_packed, dx, N, C_in, H, W, C_out, dy.shape[2], dy.shape[3], *dy.stride(), *dx.stride(),
        sh, sw, int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
        CIN_G=cin_g, COUT_G=cout_g, KH=kh, KW=kw, G_TILE=g_tile, ACC_F64=dy.dtype == torch.float64,
        INPUT_PRECISION=_precision(dy), BLOCK_N=block_n)
    return dx


def conv_wgrad(dy: Tensor, x: Tensor, weight_shape, stride, padding, dilation, groups: int) -> Tensor:
    """The weight gradient of ``conv2d(x, weight, ...)``: (C_out, C_in/g, kH, kW), contiguous, x's dtype."""
    C_out, cin_g, kh, kw = (int(v) for v in weight_shape)
    N, C_in = int(x.shape[0]), int(x.shape[1])
    H_out, W_out = int(dy.shape[2]), int(dy.shape[3])
    acc = acc_dtype(x.dtype)
    M = N * H_out * W_out
    if C_out * cin_g * kh * kw == 0 or _is_fake(dy):
        return torch.empty((C_out, cin_g, kh, kw), device=x.device, dtype=x.dtype)
    if M == 0:
        return torch.zeros((C_out, cin_g, kh, kw), device=x.device, dtype=x.dtype)
    cout_g = C_out // groups
    g_tile, _, block_n, n_cols = conv_tiling(C_out, cin_g, cout_g, groups)
    block_c = max(16, min(64, triton.next_power_of_2(g_tile * cin_g)))
    n_ci_tiles = triton.cdiv(g_tile * cin_g, block_c)
    chunk, chunks = _wgrad_split(M, n_cols * kh * kw * n_ci_tiles, x.device)
    partial = torch.empty((chunks, kh * kw * cin_g, C_out), device=x.device, dtype=acc)
    launcher(_wgrad)[(n_cols, kh * kw * n_ci_tiles, chunks)](
        dy, x, partial, N, C_in, x.shape[2], x.shape[3], C_out, H_out, W_out, *dy.stride(), *x.stride(),
        int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
        chunk, n_ci_tiles,
        CIN_G=cin_g, COUT_G=cout_g, KH=kh, KW=kw, G_TILE=g_tile, ACC_F64=x.dtype == torch.float64,
        INPUT_PRECISION=_precision(x), BLOCK_N=block_n, BLOCK_C=block_c)
    dw = partial[0] if chunks == 1 else partial.sum(0)
    return dw.view(kh, kw, cin_g, C_out).permute(3, 2, 0, 1).to(x.dtype).contiguous()


def conv_backward(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, stride, padding, dilation, groups: int,
                  mask) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``aten.convolution_backward(dy, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups,
    mask)`` (with a bias of C_out when ``has_bias``) through the implementation ``RESFAST_CONV_BACKWARD`` picks;
    entries ``mask`` does not ask for come back None."""
    need_dx, need_dw, need_db = mask
    need_db = need_db and has_bias
    if backend() == "aten" or not supported(x, weight, groups):
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy, x, weight, [weight.shape[0]] if has_bias else None, list(stride), list(padding), list(dilation),
            False, [0, 0], groups, [need_dx, need_dw, need_db])
        return (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None)
    _check(dy, x, weight, stride, padding, dilation, groups)
    dx = conv_dgrad(dy, x.shape, weight, stride, padding, dilation, groups) if need_dx else None
    dw = conv_wgrad(dy, x, weight.shape, stride, padding, dilation, groups) if need_dw else None
    db = dy.sum((0, 2, 3), dtype=acc_dtype(dy.dtype)).to(dy.dtype) \
        if need_db else None
    return dx, dw, db
