"""Drop-in blocks for timm's own ResNet family (timm.models.resnet.BasicBlock / Bottleneck): ResNet-18..152 and
their b/c/d/s/t variants, ResNeXt, SE-ResNet(X)t, ECA-ResNet, wide ResNets, ...

Same constructor arguments, attribute names and state_dict keys as timm's blocks (timm 1.0), and ``zero_init_last``.
timm is needed only for what timm itself resolves by name (an ``attn_layer`` / ``aa_layer`` given as a string); the
module imports without it.

The forward runs through resfast.ops when the convs and BatchNorms are ones the ops reproduce and every activation is
a plain nn.ReLU: conv + BN (+ ReLU) per op, the shortcut (timm's ``downsample_conv`` and ``downsample_avg``) folded
into the last op where it can be, an SE module (timm's SEModule) as its gate and one scale + add + ReLU pass, any
other attention module (ECA, ...), anti-aliasing, DropBlock or active drop-path module run as the module itself
between the ops. Anything else (another activation or norm layer, a conv with a custom forward) runs timm's
computation with the modules themselves (``_forward_modules``).
"""

from __future__ import annotations

import math
from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ._common import (
    block_cache,
    capturing,
    conv_bn,
    conv_bn_shortcut,
    fusable,
    fusable_relu,
    recompute_scope,
    se_gate,
    shortcut,
)
from .layers import is_timm
from .whole_block import res2net_bottleneck_train


def _passthrough(m: Optional[nn.Module]) -> bool:
    """The module returns its input unchanged: None, nn.Identity, or timm's DropPath / DropBlock2d while inactive
    (eval mode, or a drop probability of 0)."""
    if m is None or type(m) is nn.Identity:
        return True
    if is_timm(m, "DropPath", "DropBlock2d"):
        return not m.training or not m.drop_prob
    return False


def _act(act_layer, **kw) -> nn.Module:
    if isinstance(act_layer, str):  # timm's ResNet resolves names before building blocks; accept them here too
        from timm.layers import get_act_layer

        act_layer = get_act_layer(act_layer)
    return act_layer(**kw)


def _attn(attn_layer, channels: int, **dd) -> Optional[nn.Module]:
    """timm's create_attn: None when no layer; a name ('se', 'eca', ...) is resolved by timm."""
    if isinstance(attn_layer, (str, nn.Module)):
        from timm.layers import create_attn

        return create_attn(attn_layer, channels, **dd)
    return attn_layer(channels, **dd) if attn_layer else None


def _aa(aa_layer, channels: int, stride: int, enable: bool, **dd) -> nn.Module:
    """timm's create_aa: nn.Identity unless anti-aliasing is asked for and applies (a strided or re-dilated conv)."""
    if not aa_layer or not enable:
        return nn.Identity()
    try:
        from timm.layers import create_aa
    except ImportError:  # a layer class without timm: called as timm's factory would call it
        if isinstance(aa_layer, str):
            raise
        try:
            return aa_layer(channels=channels, stride=stride)
        except TypeError:
            return aa_layer(stride)
    return create_aa(aa_layer, channels=channels, stride=stride, enable=True, **dd)


class _TimmBlock(nn.Module):
    """What timm's two blocks share: the tail ``act(drop_path(se(bn(conv(out)))) + shortcut)`` and the middle
    ``aa(act(drop_block(bn(conv(out)))))``, through the ops."""

    def _mid(self, x: Tensor, conv: nn.Conv2d, bn: nn.Module, cache) -> Tensor:
        """``aa(relu(drop_block(bn(conv(x)))))``: one conv_bn_relu op, DropBlock and anti-aliasing as modules when
        they do something."""
        if _passthrough(self.drop_block):
            out = conv_bn(x, conv, bn, cache=cache)
        else:
            out = F.relu(self.drop_block(conv_bn(x, conv, bn, relu=False, cache=cache)))
        return out if _passthrough(self.aa) else self.aa(out)

    def _tail(self, out: Tensor, x: Tensor, conv: nn.Conv2d, bn: nn.Module, cache) -> Tensor:
        """``relu(drop_path(se(bn(conv(out)))) + shortcut(x))``."""
        drop_path = None if _passthrough(self.drop_path) else self.drop_path
        if self.se is None and drop_path is None:  # the shortcut goes into the last op
            return conv_bn_shortcut(out, conv, bn, x, self.downsample, cache)
        identity = shortcut(x, self.downsample, cache)
        out = conv_bn(out, conv, bn, relu=False, cache=cache)
        gate = se_gate(self.se, out) if drop_path is None else None
        if gate is not None:  # the excitation, the residual add and the ReLU in one pass
            return ops.scale_add_relu(out, gate, identity)
        if self.se is not None:
            out = self.se(out)
        if drop_path is not None:
            out = drop_path(out)
        return F.relu(out + identity)


class TimmBasicBlock(_TimmBlock):
    """timm.models.resnet.BasicBlock (ResNet-18/34 and their variants): 3x3 conv1 (the stride, ``first_dilation``)
    -> bn1 -> drop_block -> act1 -> aa, 3x3 conv2 -> bn2 -> se, drop_path, + shortcut, act2."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 64,
        reduce_first: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        attn_layer: Optional[Type[nn.Module]] = None,
        aa_layer: Optional[Type[nn.Module]] = None,
        drop_block: Optional[Type[nn.Module]] = None,
        drop_path: Optional[nn.Module] = None,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if cardinality != 1:  # timm asserts both: the same exception type, whatever python -O does
            raise AssertionError("BasicBlock only supports a cardinality of 1")
        if base_width != 64:
            raise AssertionError("BasicBlock does not support changing the base width")
        norm_layer = norm_layer or nn.BatchNorm2d
        mid = planes // reduce_first
        out = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, mid, 3, stride=1 if use_aa else stride, padding=first_dilation,
                               dilation=first_dilation, bias=False, **dd)
        self.bn1 = norm_layer(mid, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act1 = _act(act_layer, inplace=True)
        self.aa = _aa(aa_layer, mid, stride, use_aa, **dd)
        self.conv2 = nn.Conv2d(mid, out, 3, padding=dilation, dilation=dilation, bias=False, **dd)
        self.bn2 = norm_layer(out, **dd)
        self.se = _attn(attn_layer, out, **dd)
        self.act2 = _act(act_layer, inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def _fusable(self) -> bool:
        return (fusable((self.conv1, self.bn1), (self.conv2, self.bn2))
                and fusable_relu(self.act1) and fusable_relu(self.act2))

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not self._fusable():
            return self._forward_modules(x)
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            out = self._mid(x, self.conv1, self.bn1, cache)
            return self._tail(out, x, self.conv2, self.bn2, cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """timm's forward, with the modules themselves."""
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class TimmBottleneck(_TimmBlock):
    """timm.models.resnet.Bottleneck (ResNet-50+, ResNeXt, SE-ResNeXt, ECA-ResNet, wide ResNet, ...): 1x1 conv1 ->
    bn1 -> act1, 3x3 conv2 (the stride, groups = cardinality, ``first_dilation``) -> bn2 -> drop_block -> act2 -> aa,
    1x1 conv3 -> bn3 -> se, drop_path, + shortcut, act3."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 64,
        reduce_first: int = 1,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        attn_layer: Optional[Type[nn.Module]] = None,
        aa_layer: Optional[Type[nn.Module]] = None,
        drop_block: Optional[Type[nn.Module]] = None,
        drop_path: Optional[nn.Module] = None,
        device=None,
        dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        mid = width // reduce_first
        out = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False, **dd)
        self.bn1 = norm_layer(mid, **dd)
        self.act1 = _act(act_layer, inplace=True)
        self.conv2 = nn.Conv2d(mid, width, 3, stride=1 if use_aa else stride, padding=first_dilation,
                               dilation=first_dilation, groups=cardinality, bias=False, **dd)
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = _act(act_layer, inplace=True)
        self.aa = _aa(aa_layer, width, stride, use_aa, **dd)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False, **dd)
        self.bn3 = norm_layer(out, **dd)
        self.se = _attn(attn_layer, out, **dd)
        self.act3 = _act(act_layer, inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def _fusable(self) -> bool:
        return (fusable((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
                and fusable_relu(self.act1) and fusable_relu(self.act2) and fusable_relu(self.act3))

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not self._fusable():
            return self._forward_modules(x)
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            c2 = self.conv2
            if (self.se is None and _passthrough(self.drop_path) and _passthrough(self.drop_block)
                    and _passthrough(self.aa) and c2.in_channels == c2.out_channels):
                # training with batch statistics on a backend with a whole-bottleneck op (Triton): the Res2Net op
                # with scale 1 (one 3x3 conv over the whole width), as torchvision's Bottleneck
                y = res2net_bottleneck_train(x, self.conv1, self.bn1, [c2], [self.bn2], self.conv3, self.bn3,
                                             lambda: shortcut(x, self.downsample, cache), 1, c2.stride[0],
                                             c2.dilation[0], c2.groups, "timm", "stage")
                if y is not None:
                    return y
            out = conv_bn(x, self.conv1, self.bn1, cache=cache)
            out = self._mid(out, c2, self.bn2, cache)
            return self._tail(out, x, self.conv3, self.bn3, cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """timm's forward, with the modules themselves."""
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)
