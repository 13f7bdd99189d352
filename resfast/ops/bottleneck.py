"""A whole Res2Net bottleneck in one training op, where the backend has one (Triton: res2net_bottleneck_train);
a whole pre-activation (ResNetV2) block likewise (Triton: preact_block_train).

A ResNet/ResNeXt bottleneck (torchvision's: conv1 1x1, conv2 3x3 with the stride and groups, conv3 1x1) is the
same op with scale 1: one conv over the whole width, no pass-through split.

Per op, a block's training forward writes each normalised activation (``relu(bn1(conv1(x)))``, the chain's split
outputs and the chain's output) for the next op to read. One op over the whole bottleneck applies each BatchNorm +
ReLU in the next convolution's prologue instead, so those activations are never written; its backward carries bn1
(whose statistics depend on conv1's output) and rebuilds the activations from the raw conv outputs it saved.

:func:`res2net_bottleneck_train` is what a block calls first: it returns None when the whole-block op does not
apply (another backend, a BatchNorm with running statistics or synchronised, a conv with a bias, a 1x1 conv that is
not plain, autocast, a batch too small for statistics), and the block then runs its per-op path, which checks and
reports everything as usual. ``RESFAST_WHOLE_BLOCK=0`` (or ``WHOLE_BLOCK.enabled = False``) turns it off, e.g. to
compare the two paths.

A pre-activation block's units (BN -> ReLU -> conv) already apply each BatchNorm + ReLU in the conv's prologue per
op; what the whole op adds is where the statistics come from: each BatchNorm after the first takes them from the
epilogue of the conv before it (per op, a separate pass reads that conv's output again), and timm's downsample
(a 1x1 conv of the normalised input) becomes a second GEMM of the last conv's launch, so neither the normalised
input nor the shortcut is written. :func:`preact_block_train` returns None when it does not apply, as above.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from . import dispatch
from ._args import prepare_bn_relu_conv, prepare_conv_bn_relu
from .batchnorm import as_bn_params, is_bn_relu, is_supported_bn, resolve_bn
from .checks import check_residual, needs_batch_stats
from .training import _update_running, compute_dtype


class _Switch:
    enabled = os.environ.get("RESFAST_WHOLE_BLOCK", "1").strip() != "0"


WHOLE_BLOCK = _Switch()
OP = "resfast.res2net_bottleneck"


def _batch_stats_bn(bn: nn.Module, act: bool = False) -> bool:
    """An affine nn.BatchNorm2d (``act``: or timm's BatchNormAct2d with a plain ReLU) that normalises with this
    batch's statistics on this process alone."""
    if not (is_supported_bn(bn) or (act and is_bn_relu(bn))):
        return False
    p = as_bn_params(bn)
    return (not p.frozen and p.process_group is None and needs_batch_stats(p, bn.training)
            and p.weight is not None and p.bias is not None)


def _plain_1x1(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and tuple(conv.padding) == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


def _chain_convs(convs, scale: int, stride: int, dilation: int, groups: int) -> bool:
    """The chain's convs are what the op computes: 3x3, the given stride and dilation in both dimensions, padding =
    dilation, the given groups."""
    return all(c.kernel_size == (3, 3) and c.stride == (stride, stride) and c.dilation == (dilation, dilation)
               and tuple(c.padding) == (dilation, dilation) and c.groups == groups for c in convs)


def _applies(x: Tensor, conv1, bn1, convs, bns, conv3, bn3, stride: int, dilation: int, groups: int,
             scale: int) -> bool:
    if (not WHOLE_BLOCK.enabled or not isinstance(x, Tensor) or x.dim() != 4 or len(convs) == 0
            or x.device.type not in ("cpu", "cuda")):
        return False
    if not all(_batch_stats_bn(b) for b in (bn1, *bns, bn3)):
        return False
    if compute_dtype(x) != x.dtype:  # autocast: the per-op path reproduces eager's casts
        return False
    if any(c.bias is not None for c in (conv1, *convs, conv3)) or not (_plain_1x1(conv1) and _plain_1x1(conv3)):
        return False
    if not _chain_convs(convs, scale, stride, dilation, groups):
        return False
    N, _, H, W = x.shape
    H2, W2 = (H - 1) // stride + 1, (W - 1) // stride + 1
    if N * H * W <= 1 or N * H2 * W2 <= 1:  # the per-op path raises nn.BatchNorm2d's error
        return False
    args = prepare_conv_bn_relu(x, conv1.weight, bn1, None, 1, 0, 1, 1, bn1.training, True, None)
    return dispatch.select("conv_bn_relu", args).name == "triton"


def res2net_bottleneck_train(x: Tensor, conv1: nn.Conv2d, bn1: nn.Module, convs: Sequence[nn.Conv2d],
                             bns: Sequence[nn.Module], conv3: nn.Conv2d, bn3: nn.Module,
                             residual: Callable[[], Tensor], scale: int, stride: int, dilation: int, groups: int,
                             order: str, block_type: str) -> Optional[Tensor]:
    """``relu(bn3(conv3(chain(relu(bn1(conv1(x)))))) + residual())`` (the chain: resfast.ops.res2net_chain with
    ``convs``/``bns``, 3x3 with padding = dilation) through the backend's whole-block op, every
    BatchNorm with batch statistics (running buffers updated exactly as nn.BatchNorm2d); None, without touching
    anything, when that op does not apply (see the module's docstring). ``residual`` is called only when it does."""
    if not _applies(x, conv1, bn1, convs, bns, conv3, bn3, stride, dilation, groups, scale):
        return None
    from ..triton import training as _registered  # noqa: F401  (registers torch.ops.resfast_triton)

    res = residual()
    N, _, H, W = x.shape
    out_shape = (N, conv3.out_channels, (H - 1) // stride + 1, (W - 1) // stride + 1)
    check_residual(OP, x, res, out_shape)
    if res.dtype != x.dtype:
        raise ValueError(f"{OP}: the residual has dtype {res.dtype}, the input {x.dtype}")
    rs = [resolve_bn(as_bn_params(b), b.training) for b in (bn1, *bns, bn3)]
    ns = torch.ops.resfast_triton
    y, _, _, _, stats = ns.res2net_bottleneck_train(
        x, conv1.weight.to(x.dtype), rs[0].weight, rs[0].bias, [c.weight.to(x.dtype) for c in convs],
        [r.weight for r in rs[1:-1]], [r.bias for r in rs[1:-1]], conv3.weight.to(x.dtype), rs[-1].weight,
        rs[-1].bias, res, scale, stride, dilation, groups, order, block_type, [r.eps for r in rs])
    lo = 0
    for r in rs:
        C = r.weight.shape[0]
        _update_running(ns, r, stats[0, lo:lo + C], stats[2, lo:lo + C])
        lo += C
    return y


PREACT_OP = "resfast.preact_block"


def _conv_out_hw(conv: nn.Conv2d, H: int, W: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _preact_applies(x: Tensor, units, downsample: Optional[nn.Conv2d]) -> Optional[tuple[int, int]]:
    """The last conv's output size when the whole pre-activation op applies, else None."""
    if (not WHOLE_BLOCK.enabled or not isinstance(x, Tensor) or x.dim() != 4 or not units
            or x.device.type not in ("cpu", "cuda")):
        return None
    norms, convs = [n for n, _ in units], [c for _, c in units]
    if not all(_batch_stats_bn(n, act=True) for n in norms) or compute_dtype(x) != x.dtype:
        return None
    if any(c.bias is not None for c in convs):
        return None
    if downsample is not None and (downsample.bias is not None or downsample.kernel_size != (1, 1)
                                   or tuple(downsample.padding) != (0, 0) or downsample.dilation != (1, 1)
                                   or downsample.groups != 1):
        return None
    # shapes that fit, each BatchNorm with more than one value per channel; anything else: the per-op path's errors
    N, C, H, W = x.shape
    for norm, conv in units:
        if norm.num_features != C or conv.in_channels != C or N * H * W <= 1:
            return None
        C, (H, W) = conv.out_channels, _conv_out_hw(conv, H, W)
        if H < 1 or W < 1:
            return None
    if downsample is not None:
        if (downsample.in_channels != x.shape[1] or downsample.out_channels != C
                or _conv_out_hw(downsample, x.shape[2], x.shape[3]) != (H, W)):
            return None
    norm, conv = units[0]
    args = prepare_bn_relu_conv(x, norm, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups,
                                norm.training, None)
    return (H, W) if dispatch.select("bn_relu_conv", args).name == "triton" else None


def preact_block_train(x: Tensor, units: Sequence[tuple[nn.Module, nn.Conv2d]], downsample: Optional[nn.Conv2d],
                       residual: Callable[[], Tensor]) -> Optional[Tensor]:
    """``conv_n(relu(bn_n(... conv_1(relu(bn_1(x))) ...))) + shortcut`` for the ``units`` (bn_i, conv_i) of a
    pre-activation block through the backend's whole-block op, every BatchNorm (nn.BatchNorm2d, or timm's
    BatchNormAct2d with a plain ReLU) with batch statistics and its running buffers updated exactly as the module
    does. The shortcut is ``downsample(relu(bn_1(x)))`` when ``downsample`` (a plain 1x1 conv, timm's
    DownsampleConv.conv) is given, else ``residual()``. None, without touching anything, when the op does not apply
    (see the module's docstring); ``residual`` is called only when it does."""
    hw = _preact_applies(x, units, downsample)
    if hw is None:
        return None
    from ..triton import training as _registered  # noqa: F401  (registers torch.ops.resfast_triton)

    res = None
    if downsample is None:
        res = residual()
        check_residual(PREACT_OP, x, res, (x.shape[0], units[-1][1].out_channels, *hw))
        if res.dtype != x.dtype:
            raise ValueError(f"{PREACT_OP}: the residual has dtype {res.dtype}, the input {x.dtype}")
    rs = [resolve_bn(as_bn_params(n), n.training) for n, _ in units]
    geometry = [v for _, c in units for v in (*c.stride, *c.padding, *c.dilation, c.groups)]
    y, _, stats = torch.ops.resfast_triton.preact_block_train(
        x, [c.weight.to(x.dtype) for _, c in units], [r.weight for r in rs], [r.bias for r in rs], geometry,
        downsample.weight.to(x.dtype) if downsample is not None else None,
        list(downsample.stride) if downsample is not None else [1, 1], res, [r.eps for r in rs])
    lo = 0
    for r in rs:
        C = r.weight.shape[0]
        _update_running(torch.ops.resfast_triton, r, stats[0, lo:lo + C], stats[2, lo:lo + C])
        lo += C
    return y
