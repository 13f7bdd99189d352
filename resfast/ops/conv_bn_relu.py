"""conv_bn_relu: convolution + BatchNorm (+ residual add) + ReLU, the ResNet/ResNeXt building block."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import dispatch
from ._args import ConvShortcut, prepare_conv_bn_relu
from .fold import FoldCache


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bn,
    *,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    relu: bool = True,
    residual: Optional[Tensor] = None,
    shortcut: Optional[ConvShortcut] = None,
    fold_cache: Optional[FoldCache] = None,
) -> Tensor:
    """``relu(bn(conv2d(x, weight, bias)) + residual)``: ResNeXt's grouped 3x3, ResNet's 1x1/3x3, Res2Block's.

    Args:
        x: (N, C_in, H, W), contiguous NCHW or channels_last.
        weight: (C_out, C_in / groups, kH, kW) conv weight; ``bias`` (C_out,) or None.
        bn: the BatchNorm over C_out: a :class:`BatchNormParams`, nn.BatchNorm2d or FrozenBatchNorm2d.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d``.
        training: BatchNorm in training mode (batch statistics, running buffers updated in place exactly as
            nn.BatchNorm2d) or eval mode (running statistics).
        relu: apply the ReLU (False gives conv + BN (+ residual), e.g. before an SE module).
        residual: (N, C_out, H_out, W_out) added after BN and before the ReLU.
        shortcut: a :class:`ConvShortcut` ``(x', weight', bn', stride', bias')``: the residual is then
            ``bn'(conv2d(x', weight', bias', stride'))`` (a 1x1 projection shortcut, BatchNorm in the same
            ``training`` mode), computed with the main conv (one kernel on the Triton backend). Not with ``residual``.

        fold_cache: a :class:`resfast.ops.fold.FoldCache` the caller keeps (a block passes its own) so the
            backends that fold eval BatchNorm into the weights do it once, not per call.
    Returns:
        (N, C_out, H_out, W_out) in the layout PyTorch's convolution picks, as the original layers do
        (channels_last when ``x`` is channels_last).
    """
    args = prepare_conv_bn_relu(x, weight, bn, bias, stride, padding, dilation, groups, training, relu, residual,
                                fold_cache, shortcut)
    return dispatch.run("conv_bn_relu", args)
