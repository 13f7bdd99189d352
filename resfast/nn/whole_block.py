"""The whole-block training ops for the blocks: whether a block's modules are what resfast.ops.bottleneck's ops
compute (module inspection), then the op on their tensors. Each returns None when the op does not apply, and the
block runs its per-op path."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor, nn

from ..ops import bottleneck
from ..ops.batchnorm import as_bn_params
from .layers import is_bn_relu, is_supported_bn


def _plain_1x1(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and tuple(conv.padding) == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None)


def _chain_convs(convs, stride: int, dilation: int, groups: int) -> bool:
    """The chain's convs are what the op computes: 3x3, the given stride and dilation in both dimensions, padding =
    dilation, the given groups, no bias."""
    return all(c.kernel_size == (3, 3) and c.stride == (stride, stride) and c.dilation == (dilation, dilation)
               and tuple(c.padding) == (dilation, dilation) and c.groups == groups and c.bias is None for c in convs)


def res2net_bottleneck_train(x: Tensor, conv1: nn.Conv2d, bn1: nn.Module, convs: Sequence[nn.Conv2d],
                             bns: Sequence[nn.Module], conv3: nn.Conv2d, bn3: nn.Module,
                             residual: Callable[[], Tensor], scale: int, stride: int, dilation: int, groups: int,
                             order: str, block_type: str) -> Optional[Tensor]:
    """resfast.ops.bottleneck.res2net_bottleneck_train for a block's modules (conv1 and conv3 plain 1x1 convs, the
    chain's 3x3 convs, nn.BatchNorm2d everywhere, no conv bias); None when they are not, or the op does not apply."""
    norms = (bn1, *bns, bn3)
    if not (all(is_supported_bn(b) for b in norms) and _plain_1x1(conv1) and _plain_1x1(conv3)
            and _chain_convs(convs, stride, dilation, groups)):
        return None
    return bottleneck.res2net_bottleneck_train(
        x, conv1.weight, as_bn_params(bn1), [c.weight for c in convs], [as_bn_params(b) for b in bns], conv3.weight,
        as_bn_params(bn3), residual, scale, stride, dilation, groups, order, block_type,
        training=[b.training for b in norms])


def preact_block_train(x: Tensor, units: Sequence[tuple[nn.Module, nn.Conv2d]], downsample: Optional[nn.Conv2d],
                       residual: Callable[[], Tensor]) -> Optional[Tensor]:
    """resfast.ops.bottleneck.preact_block_train for a pre-activation block's (norm, conv) units: each norm an
    nn.BatchNorm2d or timm's BatchNormAct2d with a plain ReLU, convs without bias; ``downsample`` a plain 1x1 conv
    (timm's DownsampleConv.conv) or None. None when they are not, or the op does not apply."""
    if not units or not all((is_supported_bn(n) or is_bn_relu(n)) and c.bias is None for n, c in units):
        return None
    if downsample is not None and (downsample.bias is not None or downsample.kernel_size != (1, 1)
                                   or tuple(downsample.padding) != (0, 0) or downsample.dilation != (1, 1)
                                   or downsample.groups != 1):
        return None
    return bottleneck.preact_block_train(
        x, [as_bn_params(n) for n, _ in units], [c.weight for _, c in units],
        [(c.stride, c.padding, c.dilation, c.groups) for _, c in units],
        downsample.weight if downsample is not None else None,
        downsample.stride if downsample is not None else (1, 1), residual, training=[n.training for n, _ in units])
