"""``y = relu(x * gate[n, c] + residual)`` in one pass (and its backward): the end of a squeeze-and-excitation
bottleneck.

The SE module multiplies the conv3 + bn3 output by its per-(image, channel) gate, then the block adds the shortcut
and applies the ReLU: three passes over the activation in the originals, one read of x and the residual and one
write here. Any input strides (NHWC/channels_last is the fast path: consecutive channels are contiguous); the
output is channels_last. Arithmetic in fp32 (fp64 for float64 inputs), offsets in int64.
Backward, one pass: the ReLU mask from the saved output, dx = g * gate, dresidual = g, and per-(image, tile) sums
of g * x reduced over H x W for dgate.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ....ops.dtypes import acc_dtype
from .batchnorm import pixel_rows
from .common import _is_fake, launcher
from .conv import tuning_configs


@triton.jit
def _scale_add_relu_fwd_kernel(
    X_ptr, G_ptr, R_ptr, Y_ptr,
    M, C, HW, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, ACC_F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # (n, h, w) per row in int32 from one int64 tile start; int64 offsets per row and per column (no per-element
    # index math)
    n, h, w, m_mask = pixel_rows(tl.program_id(0).to(tl.int64) * BLOCK_M, M, HW // W, W, BLOCK_M)
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = m_mask[:, None] & (offs_c < C)[None, :]
    n = n.to(tl.int64)
    h = h.to(tl.int64)
    w = w.to(tl.int64)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    x = tl.load(X_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + (offs_c * sxc)[None, :], mask=mask, other=0.0)
    g = tl.load(G_ptr + (n * sgn)[:, None] + (offs_c * sgc)[None, :], mask=mask, other=0.0)
    y = x.to(acc_dtype) * g.to(acc_dtype)
    if HAS_RES:
        y += tl.load(R_ptr + (n * srn + h * srh + w * srw)[:, None] + (offs_c * src)[None, :], mask=mask,
                     other=0.0).to(acc_dtype)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y_ptr + (n * syn + h * syh + w * syw)[:, None] + (offs_c * syc)[None, :],
             y.to(Y_ptr.dtype.element_ty), mask=mask)


# two tile heights on the GPU, tuned per (M, C); one under the interpreter (no benchmarking there)
_CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4), triton.Config({"BLOCK_M": 128}, num_warps=8)]
_tuned_kernel = triton.autotune(configs=tuning_configs(_CONFIGS), key=["M", "C"])(
    _scale_add_relu_fwd_kernel)


def _launch(grid, *args, **meta):
    """Every launch goes through here (tests wrap it to count launches), through common.launcher."""
    launcher(_tuned_kernel)[grid](*args, **meta)


def scale_add_relu_fwd(x: Tensor, gate: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    """x (N, C, H, W) any strides, gate (N, C), residual x's shape or None -> (N, C, H, W) channels_last."""
    N, C, H, W = x.shape
    y = torch.empty((N, C, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    M = N * H * W
    if M == 0 or C == 0 or _is_fake(x):
        return y
    r = residual if residual is not None else x
    block_c = max(16, min(64, triton.next_power_of_2(C)))
    _launch(
        lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C, block_c)),
        x, gate, r, y, M, C, H * W, W,
        *x.stride(), *gate.stride(), *r.stride(), *y.stride(),
        HAS_RES=residual is not None, RELU=relu, ACC_F64=x.dtype == torch.float64, BLOCK_C=block_c,
    )
    return y


@triton.jit
def _scale_add_relu_bwd_kernel(
    DY_ptr, X_ptr, G_ptr, Y_ptr, DX_ptr, DR_ptr, PG_ptr,
    C, HW, W, T,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    sgn, sgc,
    syn, syc, syh, syw,
    sen, sec, seh, sew,
    srn, src, srh, srw,
    RELU: tl.constexpr, NEED_DX: tl.constexpr, NEED_DG: tl.constexpr, NEED_DR: tl.constexpr,
    ACC_F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Image n, BLOCK_M of its pixels (program_id 0 = n * T + tile: the large grid axis), BLOCK_C channels (1):
    g = dy where y > 0; dx = g * gate[n, c], dresidual = g, and this tile's sum of g * x per channel (row
    (n, tile) of PG) for dgate."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // T
    pid_t = pid % T
    hw = pid_t.to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)  # < H * W + BLOCK_M: int32
    offs_c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    h = (hw // W).to(tl.int64)
    w = (hw % W).to(tl.int64)
    c_mask = offs_c < C
    mask = (hw < HW)[:, None] & c_mask[None, :]
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    g = tl.load(DY_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + offs_c[None, :] * sdc, mask=mask,
                other=0.0).to(acc_dtype)
    if RELU:
        y = tl.load(Y_ptr + (n * syn + h * syh + w * syw)[:, None] + offs_c[None, :] * syc, mask=mask, other=0.0)
        g = tl.where(y > 0, g, 0.0)
    if NEED_DX:
        gate = tl.load(G_ptr + n * sgn + offs_c * sgc, mask=c_mask, other=0.0).to(acc_dtype)
        tl.store(DX_ptr + (n * sen + h * seh + w * sew)[:, None] + offs_c[None, :] * sec,
                 (g * gate[None, :]).to(DX_ptr.dtype.element_ty), mask=mask)
    if NEED_DR:
        tl.store(DR_ptr + (n * srn + h * srh + w * srw)[:, None] + offs_c[None, :] * src,
                 g.to(DR_ptr.dtype.element_ty), mask=mask)
    if NEED_DG:
        x = tl.load(X_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=mask,
                    other=0.0).to(acc_dtype)
        tl.store(PG_ptr + (n * T + pid_t) * C + offs_c, tl.sum(g * x, axis=0), mask=c_mask)


_BWD_BLOCK_M = 64


def scale_add_relu_bwd(dy: Tensor, x: Tensor, gate: Tensor, y: Optional[Tensor], need_dx: bool, need_dgate: bool,
                       need_dres: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dgate (N, C), dresidual) of ``y = relu(x * gate[n, c] + residual)`` (``y`` the saved output, None
    without the ReLU); unwanted gradients come back empty. dx and dresidual channels_last; dgate in gate's dtype
    (summed over H x W in fp32/fp64)."""
    N, C, H, W = x.shape
    HW = H * W
    acc = acc_dtype(x.dtype)
    T = triton.cdiv(HW, _BWD_BLOCK_M)
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_dx else x.new_empty(0)
    dr = torch.empty_like(x, memory_format=torch.channels_last) if need_dres else x.new_empty(0)
    pg = torch.empty((N, T, C), device=x.device, dtype=acc) if need_dgate else None
    if N * HW > 0 and C > 0 and not _is_fake(x):
        yy = y if y is not None else dy
        e = dx if need_dx else x
        r = dr if need_dres else x
        block_c = max(16, min(64, triton.next_power_of_2(C)))
        launcher(_scale_add_relu_bwd_kernel)[(N * T, triton.cdiv(C, block_c))](
            dy, x, gate, yy, e, r, pg if pg is not None else x, C, HW, W, T,
            *dy.stride(), *x.stride(), *gate.stride(), *yy.stride(), *e.stride(), *r.stride(),
            RELU=y is not None, NEED_DX=need_dx, NEED_DG=need_dgate, NEED_DR=need_dres,
            ACC_F64=x.dtype == torch.float64, BLOCK_M=_BWD_BLOCK_M, BLOCK_C=block_c, num_warps=4)
    if pg is not None:
        dgate = pg.sum(1).to(gate.dtype)
    else:
        dgate = gate.new_empty(0)
    return dx, dgate, dr
