"""bn_relu_conv: the pre-activation (ResNetV2) unit, BatchNorm + ReLU + convolution (+ residual add)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import dispatch
from ._args import prepare_bn_relu_conv
from .fold import FoldCache


def bn_relu_conv(
    x: Tensor,
    bn,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    residual: Optional[Tensor] = None,
    fold_cache: Optional[FoldCache] = None,
) -> Tensor:
    """``conv2d(relu(bn(x)), weight, bias) + residual``, the pre-activation unit of ResNetV2.

    Args:
        x: (N, C_in, H, W), contiguous NCHW or channels_last; ``bn`` normalises its C_in channels
            (BatchNormParams, nn.BatchNorm2d or FrozenBatchNorm2d), in training or eval mode as ``training``.
        weight: (C_out, C_in / groups, kH, kW); ``bias`` (C_out,) or None; stride, padding, dilation, groups as
            ``torch.nn.functional.conv2d``.
        residual: (N, C_out, H_out, W_out) added to the conv output (the block's shortcut), or None.

        fold_cache: a :class:`resfast.ops.fold.FoldCache` the caller keeps (a block passes its own) so the
            backends that fold eval BatchNorm into the weights do it once, not per call.
    Returns:
        (N, C_out, H_out, W_out) in the layout PyTorch's convolution picks, as the original layers do
        (channels_last when ``x`` is channels_last).
    """
    args = prepare_bn_relu_conv(x, bn, weight, bias, stride, padding, dilation, groups, training, residual, fold_cache)
    return dispatch.run("bn_relu_conv", args)
