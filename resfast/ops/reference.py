"""Eager references: the semantics every backend must reproduce, and the `eager` backend itself.

`<op>_eager(args)` computes an op from prepared arguments with plain PyTorch; `<op>_ref(...)` is the public
reference with the same signature as the op. BatchNorm follows nn.BatchNorm2d exactly (see batchnorm.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._args import (
    BnReluConvArgs,
    ConvBnReluArgs,
    ConvShortcut,
    Res2NetChainArgs,
    ScaleAddReluArgs,
    prepare_bn_relu_conv,
    prepare_conv_bn_relu,
    prepare_res2net_chain,
    prepare_scale_add_relu,
)
from .batchnorm import BatchNormParams, batch_norm_eager, resolve_bn


def conv_bn_relu_eager(a: ConvBnReluArgs) -> Tensor:
    bn = resolve_bn(a.bn, a.training)
    y = F.conv2d(a.x, a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups)
    # y is a fresh BatchNorm output that no backward needs: add and ReLU may work in place (as the originals do)
    y = batch_norm_eager(y, bn)
    residual = a.residual if a.shortcut is None else shortcut_eager(a.shortcut, a.training)
    if residual is not None:
        y = y.add_(residual)
    if a.relu:
        y = F.relu(y, inplace=True)
    return y


def shortcut_eager(s: ConvShortcut, training: bool) -> Tensor:
    """The projection shortcut of conv_bn_relu: ``bn(conv2d(x, weight, bias, stride))``, after the main conv's
    BatchNorm (the order of the originals, whose downsample runs after bn3)."""
    y = F.conv2d(s.x, s.weight, s.bias, s.stride)
    return batch_norm_eager(y, resolve_bn(s.bn, training))


def bn_relu_conv_eager(a: BnReluConvArgs) -> Tensor:
    bn = resolve_bn(a.bn, a.training)
    y = F.relu(batch_norm_eager(a.x, bn), inplace=True)
    y = F.conv2d(y, a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups)
    if a.residual is not None:
        y = y.add_(a.residual)  # conv2d's backward does not need its output
    return y


def res2net_chain_eager(a: Res2NetChainArgs) -> Tensor:
    bns = [resolve_bn(bn, a.training) for bn in a.bns]
    single = a.passthrough is None  # timm with scale == 1: one conv over the whole input
    spx = (a.x,) if single else torch.split(a.x, a.width, 1)
    outs: list[Optional[Tensor]] = [None] * len(spx)
    prev = None
    for w, b, bn, i in zip(a.weights, a.biases, bns, a.conv_splits):
        sp = spx[i]
        if a.block_type == "normal" and prev is not None:
            sp = prev + sp
        y = F.conv2d(sp, w, b, a.stride, a.dilation, a.dilation, a.groups)
        prev = F.relu(batch_norm_eager(y, bn), inplace=True)
        outs[i] = prev
    if a.passthrough is not None:
        p = spx[a.passthrough]
        # timm pools the pass-through split of every 'stage' block, stride 1 included (count_include_pad=True)
        outs[a.passthrough] = F.avg_pool2d(p, 3, a.stride, 1) if a.block_type == "stage" else p
    # the output's layout follows PyTorch's own rules, as in the originals (channels_last in -> channels_last out)
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0].clone()


def scale_add_relu_eager(a: ScaleAddReluArgs) -> Tensor:
    # the originals: ``x * gate`` in the SE module, then ``relu(out + shortcut)`` in the block
    y = a.x * a.gate.reshape(a.gate.shape[0], a.gate.shape[1], 1, 1)
    if a.residual is not None:
        y = y + a.residual
    return F.relu(y) if a.relu else y


def conv_bn_relu_ref(
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
) -> Tensor:
    """Eager reference of :func:`resfast.ops.conv_bn_relu` (same arguments, same semantics)."""
    return conv_bn_relu_eager(
        prepare_conv_bn_relu(x, weight, bn, bias, stride, padding, dilation, groups, training, relu, residual,
                             None, shortcut)
    )


def bn_relu_conv_ref(
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
) -> Tensor:
    """Eager reference of :func:`resfast.ops.bn_relu_conv`."""
    return bn_relu_conv_eager(
        prepare_bn_relu_conv(x, bn, weight, bias, stride, padding, dilation, groups, training, residual)
    )


def res2net_chain_ref(
    x: Tensor,
    weights: Sequence[Tensor],
    bns: Sequence[BatchNormParams],
    *,
    scale: int,
    biases: Optional[Sequence[Optional[Tensor]]] = None,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    order: str = "timm",
    block_type: str = "normal",
    training: bool = False,
) -> Tensor:
    """Eager reference of :func:`resfast.ops.res2net_chain`."""
    return res2net_chain_eager(
        prepare_res2net_chain(x, weights, bns, scale, biases, stride, dilation, groups, order, block_type, training)
    )


def scale_add_relu_ref(x: Tensor, gate: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """Eager reference of :func:`resfast.ops.scale_add_relu`."""
    return scale_add_relu_eager(prepare_scale_add_relu(x, gate, residual, relu))


EAGER_IMPLS = {
    "res2net_chain": res2net_chain_eager,
    "conv_bn_relu": conv_bn_relu_eager,
    "bn_relu_conv": bn_relu_conv_eager,
    "scale_add_relu": scale_add_relu_eager,
}
for _op, _fn in EAGER_IMPLS.items():
    dispatch.define(_op, _fn)
