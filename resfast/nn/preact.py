"""Drop-in pre-activation (ResNetV2) blocks: BasicBlockV2 and BottleneckV2 of the ResNet50V2 article
(docs/sources.md), and timm's resnetv2 PreActBottleneck and PreActBasic.

Each unit is BN -> ReLU -> conv (resfast.ops.bn_relu_conv); the shortcut is added by the last unit. No ReLU
after the add. The article applies its downsample to the raw input; timm applies it to the pre-activated input
``relu(norm1(x))``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.batchnorm import BatchNormParams, as_bn_params
from ..ops.bn_act import BnActArgs
from ..ops.fold import FoldCache, fold_scale_shift
from ._common import block_cache, bn_conv, capturing, conv_bn, fusable, fusable_conv, fusable_relu, shortcut
from .layers import is_bn_relu, is_timm
from .whole_block import preact_block_train


class PreActBasicBlock(nn.Module):
    """BasicBlockV2 of the ResNet50V2 article (ResNet-18/34 v2)."""

    expansion = 1

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not (fusable((self.conv1, self.bn1), (self.conv2, self.bn2)) and fusable_relu(self.relu)):
            return self._forward_modules(x)
        cache = block_cache(self)
        # training with batch statistics on a backend with a whole-block op (Triton): one op
        y = preact_block_train(x, [(self.bn1, self.conv1), (self.bn2, self.conv2)], None,
                               lambda: shortcut(x, self.downsample, cache))
        if y is not None:
            return y
        identity = shortcut(x, self.downsample, cache)
        out = bn_conv(x, self.bn1, self.conv1, cache=cache)
        return bn_conv(out, self.bn2, self.conv2, residual=identity, cache=cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


class PreActBottleneck(nn.Module):
    """BottleneckV2 of the ResNet50V2 article (ResNet-50/101/152 v2): stride on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels, out_channels, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels * self.expansion, kernel_size=1, bias=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not (fusable((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
                and fusable_relu(self.relu)):
            return self._forward_modules(x)
        cache = block_cache(self)
        y = preact_block_train(x, [(self.bn1, self.conv1), (self.bn2, self.conv2), (self.bn3, self.conv3)], None,
                               lambda: shortcut(x, self.downsample, cache))
        if y is not None:
            return y
        identity = shortcut(x, self.downsample, cache)
        out = bn_conv(x, self.bn1, self.conv1, cache=cache)
        out = bn_conv(out, self.bn2, self.conv2, cache=cache)
        return bn_conv(out, self.bn3, self.conv3, residual=identity, cache=cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


# ---------------------------------------------------------------------------------------------------------------
# timm.models.resnetv2: PreActBottleneck, PreActBasic


def _make_divisible(v, divisor=8, min_value=None, round_limit=0.9) -> int:
    """timm.layers.make_divisible, copied so that building a block does not import timm."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:  # rounding down must not lose more than 10%
        new_v += divisor
    return new_v


def _timm_layers(conv_layer: Optional[Callable], norm_layer: Optional[Callable]) -> tuple[Callable, Callable]:
    """timm's defaults (StdConv2d, GroupNormAct with 32 groups), imported from timm only when one is needed."""
    if conv_layer is None or norm_layer is None:
        from timm.layers import GroupNormAct, StdConv2d

        conv_layer = conv_layer or StdConv2d
        norm_layer = norm_layer or functools.partial(GroupNormAct, num_groups=32)
    return conv_layer, norm_layer


def _drop_path(drop_path_rate: float) -> nn.Module:
    if drop_path_rate > 0:
        from timm.layers import DropPath

        return DropPath(drop_path_rate)
    return nn.Identity()


def _drop_path_is_identity(dp: nn.Module) -> bool:
    """nn.Identity, or timm's DropPath where it returns its input (eval mode, or drop_prob 0)."""
    if type(dp) is nn.Identity:
        return True
    return is_timm(dp, "DropPath") and (not dp.training or dp.drop_prob == 0.0)


def _plain_downsample(ds: Optional[nn.Module]) -> bool:
    """timm's pre-activation DownsampleConv: a conv alone (its norm is nn.Identity) that the ops can run."""
    return is_timm(ds, "DownsampleConv") and type(ds.norm) is nn.Identity and fusable_conv(ds.conv)


def _identity_bn(channels: int, like: Tensor, cache: Optional[FoldCache]) -> BatchNormParams:
    """An eval BatchNorm that is exactly the identity: mean 0, var 0.5, eps 0.5 and no affine fold to scale
    rsqrt(0.5 + 0.5) = rsqrt(1) = 1 and shift -0, so ``conv_bn_relu(..., relu=False)`` is the bare conv (+ residual):
    0.5 + 0.5 is exactly 1 in every floating dtype, and eps stays positive (torch >= 2.11's batch_norm rejects eps
    0, even in eval, so a var-1/eps-0 identity would fail on the eager path). resfast.ops has
    no conv op without a BatchNorm; this one keeps the conv in the backends' fused path (on the cpu backend:
    prepacked oneDNN weights, the residual add as a post-op). Kept in the block's cache, so the folded weights
    made from it are reused."""

    def build():
        return BatchNormParams(running_mean=torch.zeros(channels, dtype=like.dtype, device=like.device),
                               running_var=torch.full((channels,), 0.5, dtype=like.dtype, device=like.device),
                               momentum=0.0, eps=0.5)

    return FoldCache.get_or_build(cache, ("identity_bn", channels), (), build, (like.dtype, like.device))


def _conv(x: Tensor, conv: nn.Conv2d, residual: Optional[Tensor] = None,
          cache: Optional[FoldCache] = None) -> Tensor:
    """``conv(x) + residual`` through ops.conv_bn_relu with an identity BatchNorm (eval use only)."""
    return ops.conv_bn_relu(
        x, conv.weight, _identity_bn(conv.out_channels, x, cache), bias=conv.bias, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, training=False, relu=False,
        residual=residual, fold_cache=cache,
    )


def _bn_relu_eval(x: Tensor, norm: nn.Module, cache: Optional[FoldCache]) -> Tensor:
    """``relu(norm(x))`` for an eval BatchNormAct2d: on CPU one pass of resfast.ops.bn_act with the BatchNorm folded
    to a cached (scale, shift); elsewhere, and where bn_act would run its eager reference, the module itself
    (timm's computation)."""
    if x.device.type != "cpu":
        return norm(x)

    def build():
        scale, shift = fold_scale_shift(as_bn_params(norm), None, x.dtype)
        return scale.to(x.dtype), shift.to(x.dtype)

    scale, shift = FoldCache.get_or_build(cache, ("bn_act", id(norm)),
                                          (norm.weight, norm.bias, norm.running_mean, norm.running_var), build,
                                          (norm.eps, x.dtype))
    if ops.dispatch.runs_reference("bn_act", BnActArgs(x, scale, shift, None, True)):
        return norm(x)
    return ops.bn_act(x, scale, shift)


class _TimmPreActBlock(nn.Module):
    """The forward shared by timm's PreActBottleneck and PreActBasic: ``_units()`` are the (norm, conv) pairs.

    timm: ``z = norm1(x); shortcut = downsample(z) if downsample else x``; ``conv1(z)``, then ``conv_i(norm_i(.))``
    for the other units; ``drop_path(.) + shortcut``. Fused when every norm is a BatchNormAct2d with a plain ReLU
    (BN then ReLU) and every conv a plain nn.Conv2d; any downsample and drop_path module is run as it is.
    """

    def _units(self) -> list[tuple[nn.Module, nn.Module]]:
        raise NotImplementedError

    def _fusable(self) -> bool:
        return all(is_bn_relu(n) and fusable_conv(c) for n, c in self._units())

    def _regrouped(self, x: Tensor, units) -> bool:
        """Eval BatchNorms with running statistics and nothing needing grad: the regrouped form applies."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return all(not n.training and n.running_mean is not None for n, _ in units)

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not self._fusable():
            return self._forward_modules(x)
        units = self._units()
        cache = block_cache(self)
        if self._regrouped(x, units):
            return self._forward_regrouped(x, units, cache)
        return self._forward_preact(x, units, cache)

    def _forward_preact(self, x: Tensor, units, cache) -> Tensor:
        """Pre-activation form (training, grads): each BN + ReLU is the prologue of the following conv."""
        if _drop_path_is_identity(self.drop_path) and (self.downsample is None
                                                       or _plain_downsample(self.downsample)):
            # training with batch statistics on a backend with a whole-block op (Triton): one op, the downsample
            # included (it reads relu(norm1(x)), which is then never written)
            y = preact_block_train(x, units, self.downsample.conv if self.downsample is not None else None,
                                   lambda: x)
            if y is not None:
                return y
        (norm1, conv1), (norm_last, conv_last) = units[0], units[-1]
        if self.downsample is None:
            shortcut = x
            out = bn_conv(x, norm1, conv1, cache=cache)
        else:
            # The downsample and conv1 both read relu(norm1(x)): it is made once, by the module. Two bn_relu_conv
            # calls would normalise twice and, in training, update norm1's running statistics twice; and both
            # convs' backward keep this tensor anyway.
            z = norm1(x)
            shortcut = self.downsample(z)
            out = conv1(z)
        for norm, conv in units[1:-1]:
            out = bn_conv(out, norm, conv, cache=cache)
        if _drop_path_is_identity(self.drop_path):
            return bn_conv(out, norm_last, conv_last, residual=shortcut, cache=cache)
        return self.drop_path(bn_conv(out, norm_last, conv_last, cache=cache)) + shortcut

    def _forward_regrouped(self, x: Tensor, units, cache) -> Tensor:
        """Eval form without grads: ``relu(norm1(x))`` once, then each conv with the next unit's BN + ReLU as its
        epilogue (conv_bn_relu), and the last conv with the shortcut add. The same computation, regrouped so that
        the BatchNorms fold into the preceding conv's weights and oneDNN fuses the epilogues (it cannot fuse a
        prologue)."""
        z = _bn_relu_eval(x, units[0][0], cache)
        if self.downsample is None:
            shortcut = x
        elif _plain_downsample(self.downsample):
            shortcut = _conv(z, self.downsample.conv, cache=cache)
        else:
            shortcut = self.downsample(z)
        out = z
        for (_, conv), (norm_next, _) in zip(units[:-1], units[1:]):
            out = conv_bn(out, conv, norm_next, cache=cache)
        conv_last = units[-1][1]
        if _drop_path_is_identity(self.drop_path):
            return _conv(out, conv_last, residual=shortcut, cache=cache)
        return self.drop_path(_conv(out, conv_last, cache=cache)) + shortcut

    def _forward_modules(self, x: Tensor) -> Tensor:
        raise NotImplementedError  # each block spells timm's forward out (torch.jit.script takes no list of modules)


class TimmPreActBottleneck(_TimmPreActBlock):
    """timm.models.resnetv2.PreActBottleneck (ResNetV2-50/101/152, resnetv2_50d, BiT): stride on the 3x3 conv,
    the downsample (timm's DownsampleConv / DownsampleAvg, built by ``proj_layer``) reads ``relu(norm1(x))``."""

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        bottle_ratio: float = 0.25,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        groups: int = 1,
        act_layer: Optional[Callable] = None,
        conv_layer: Optional[Callable] = None,
        norm_layer: Optional[Callable] = None,
        proj_layer: Optional[Callable] = None,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        first_dilation = first_dilation or dilation
        conv_layer, norm_layer = _timm_layers(conv_layer, norm_layer)
        out_chs = out_chs or in_chs
        mid_chs = _make_divisible(out_chs * bottle_ratio)

        if proj_layer is not None:
            self.downsample = proj_layer(
                in_chs, out_chs, stride=stride, dilation=dilation, first_dilation=first_dilation, preact=True,
                conv_layer=conv_layer, norm_layer=norm_layer, **dd,
            )
        else:
            self.downsample = None

        self.norm1 = norm_layer(in_chs, **dd)
        self.conv1 = conv_layer(in_chs, mid_chs, 1, **dd)
        self.norm2 = norm_layer(mid_chs, **dd)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, dilation=first_dilation, groups=groups, **dd)
        self.norm3 = norm_layer(mid_chs, **dd)
        self.conv3 = conv_layer(mid_chs, out_chs, 1, **dd)
        self.drop_path = _drop_path(drop_path_rate)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def _units(self):
        return [(self.norm1, self.conv1), (self.norm2, self.conv2), (self.norm3, self.conv3)]

    def _forward_modules(self, x: Tensor) -> Tensor:
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        out = self.conv1(x_preact)
        out = self.conv2(self.norm2(out))
        out = self.conv3(self.norm3(out))
        out = self.drop_path(out)
        return out + shortcut


class TimmPreActBasic(_TimmPreActBlock):
    """timm.models.resnetv2.PreActBasic (resnetv2_18/34): two 3x3 convs, the stride on the first; a downsample only
    when the stride, dilation or channels change."""

    def __init__(
        self,
        in_chs: int,
        out_chs: Optional[int] = None,
        bottle_ratio: float = 1.0,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        groups: int = 1,
        act_layer: Optional[Callable] = None,
        conv_layer: Optional[Callable] = None,
        norm_layer: Optional[Callable] = None,
        proj_layer: Optional[Callable] = None,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        first_dilation = first_dilation or dilation
        conv_layer, norm_layer = _timm_layers(conv_layer, norm_layer)
        out_chs = out_chs or in_chs
        mid_chs = _make_divisible(out_chs * bottle_ratio)

        if proj_layer is not None and (stride != 1 or first_dilation != dilation or in_chs != out_chs):
            self.downsample = proj_layer(
                in_chs, out_chs, stride=stride, dilation=dilation, first_dilation=first_dilation, preact=True,
                conv_layer=conv_layer, norm_layer=norm_layer, **dd,
            )
        else:
            self.downsample = None

        self.norm1 = norm_layer(in_chs, **dd)
        self.conv1 = conv_layer(in_chs, mid_chs, 3, stride=stride, dilation=first_dilation, groups=groups, **dd)
        self.norm2 = norm_layer(mid_chs, **dd)
        self.conv2 = conv_layer(mid_chs, out_chs, 3, dilation=dilation, groups=groups, **dd)
        self.drop_path = _drop_path(drop_path_rate)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def _units(self):
        return [(self.norm1, self.conv1), (self.norm2, self.conv2)]

    def _forward_modules(self, x: Tensor) -> Tensor:
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        out = self.conv1(x_preact)
        out = self.conv2(self.norm2(out))
        out = self.drop_path(out)
        return out + shortcut
