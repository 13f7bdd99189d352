"""Drop-in Res2Net blocks: timm's Bottle2neck, and from two source articles (docs/sources.md) the "Res2Net in
PyTorch" article's Res2NetBottleneck (+ SEModule) and the "Res2Net in YOLOv5" Q&A's Res2Block.

Same constructors, attribute names and state_dict keys as the originals. The forward runs through
resfast.ops (conv_bn_relu for the 1x1 convs, res2net_chain for the hierarchical 3x3 chain) when every layer
is one the ops reproduce, and otherwise runs the original computation with the modules themselves.
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
    fusable_conv,
    fusable_relu,
    recompute_scope,
    se_gate,
    shortcut,
)
from .layers import is_supported_bn
from .whole_block import res2net_bottleneck_train


def _chain_fusable(convs, bns) -> bool:
    return (
        all(fusable_conv(c) for c in convs)
        and all(is_supported_bn(b) for b in bns)
        and len({b.training for b in bns}) <= 1
    )


def _chain(x: Tensor, convs, bns, scale: int, stride: int, dilation: int, groups: int, order: str, block_type: str,
           cache=None):
    return ops.res2net_chain(
        x,
        [c.weight for c in convs],
        list(bns),
        scale=scale,
        biases=[c.bias for c in convs],
        stride=stride,
        dilation=dilation,
        groups=groups,
        order=order,
        block_type=block_type,
        training=bns[0].training if len(bns) else False,
        fold_cache=cache,
    )


class Bottle2neck(nn.Module):
    """timm.models.res2net.Bottle2neck (Res2Net / Res2NeXt); usable as the ``block`` of timm's ResNet.

    'stage' block (``is_first``: stride > 1 or a downsample): independent strided splits and a pooled last
    split; 'normal' block: the hierarchical chain. See :func:`resfast.ops.res2net_chain` (order "timm").
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        base_width: int = 26,
        scale: int = 4,
        dilation: int = 1,
        first_dilation: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.ReLU,
        norm_layer: Optional[Type[nn.Module]] = None,
        attn_layer: Optional[Type[nn.Module]] = None,
        drop_block: Optional[Type[nn.Module]] = None,
        drop_path: Optional[nn.Module] = None,
        device=None,
        dtype=None,
        **_,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d  # timm's ResNet always passes one; accept None as BatchNorm2d
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.num_scales = max(1, scale - 1)
        width = int(math.floor(planes * (base_width / 64.0))) * cardinality
        self.width = width
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(width * scale, **dd)
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(
                    width, width, kernel_size=3, stride=stride, padding=first_dilation, dilation=first_dilation,
                    groups=cardinality, bias=False, **dd,
                )
                for _ in range(self.num_scales)
            ]
        )
        self.bns = nn.ModuleList([norm_layer(width, **dd) for _ in range(self.num_scales)])
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        # timm keeps count_include_pad=True here to match the original weights
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.se = attn_layer(outplanes, **dd) if attn_layer is not None else None
        self.relu = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self):
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def _fusable(self) -> bool:
        c = self.convs[0]
        pool_ok = self.pool is None or (
            type(self.pool) is nn.AvgPool2d and self.pool.kernel_size == 3 and self.pool.padding == 1
            and self.pool.count_include_pad and not self.pool.ceil_mode and self.pool.stride == c.stride[0]
        )
        return (
            fusable((self.conv1, self.bn1), (self.conv3, self.bn3))
            and _chain_fusable(self.convs, self.bns)
            and fusable_relu(self.relu)
            and pool_ok
            and c.stride[0] == c.stride[1]
            and c.dilation[0] == c.dilation[1] == c.padding[0] == c.padding[1]
            and self.width * self.scale == self.conv1.out_channels
        )

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not self._fusable():
            return self._forward_modules(x)
        c = self.convs[0]
        block_type = "stage" if self.is_first else "normal"
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            if self.se is None and self.drop_path is None and type(self.drop_block) is nn.Identity:
                # training with batch statistics on a backend with a whole-bottleneck op (Triton): one op, the
                # normalised activations applied in the next conv's prologue, never written
                y = res2net_bottleneck_train(
                    x, self.conv1, self.bn1, self.convs, self.bns, self.conv3, self.bn3,
                    lambda: shortcut(x, self.downsample, cache), self.scale, c.stride[0], c.dilation[0], c.groups,
                    "timm", block_type)
                if y is not None:
                    return y
            out = conv_bn(x, self.conv1, self.bn1, cache=cache)
            out = _chain(
                out, self.convs, self.bns, self.scale, c.stride[0], c.dilation[0], c.groups, "timm", block_type,
                cache,
            )
            out = self.drop_block(out)
            if self.se is None and self.drop_path is None:
                return conv_bn_shortcut(out, self.conv3, self.bn3, x, self.downsample, cache)
            identity = shortcut(x, self.downsample, cache)
            out = conv_bn(out, self.conv3, self.bn3, relu=False, cache=cache)
            gate = se_gate(self.se, out) if self.drop_path is None else None
            if gate is not None:  # the excitation, the residual add and the ReLU in one pass
                return ops.scale_add_relu(out, gate, identity)
            if self.se is not None:
                out = self.se(out)
            if self.drop_path is not None:
                out = self.drop_path(out)
            return F.relu(out + identity)

    def _forward_modules(self, x: Tensor) -> Tensor:
        shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or self.is_first else sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        if self.scale > 1:
            if self.pool is not None:  # a None check rather than a conditional expression, for torch.jit.script
                spo.append(self.pool(spx[-1]))
            else:
                spo.append(spx[-1])
        out = self.drop_block(torch.cat(spo, 1))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        return self.relu(out + shortcut)


class SEModule(nn.Module):
    """The squeeze-and-excitation module of the "Res2Net in PyTorch" article (docs/sources.md):
    ``input * sigmoid(fc2(relu(fc1(avgpool(input)))))``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0)
        self.sigmoid = nn.Sigmoid()

    def forward(self, input: Tensor) -> Tensor:
        x = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(input)))))
        return input * x


class Res2NetBottleneck(nn.Module):
    """Res2NetBottleneck of the "Res2Net in PyTorch" article (docs/sources.md): paper order (split 0 passes
    through), biased convs, stride on the 1x1 conv1, ``groups * planes`` bottleneck channels, optional SE before
    the residual add."""

    expansion = 4

    def __init__(self, inplanes, planes, downsample=None, stride=1, scales=4, groups=1, se=True, norm_layer=True):
        super().__init__()
        if planes % scales != 0:
            raise ValueError("Planes must be divisible by scales")
        if not norm_layer:
            raise ValueError("norm_layer must be truthy: Res2NetBottleneck always uses nn.BatchNorm2d (as the article)")
        norm_layer = nn.BatchNorm2d
        bottleneck_planes = groups * planes
        self.scales = scales
        self.stride = stride
        self.downsample = downsample
        self.conv1 = nn.Conv2d(inplanes, bottleneck_planes, kernel_size=1, stride=stride)
        self.bn1 = norm_layer(bottleneck_planes)
        self.conv2 = nn.ModuleList(
            [
                nn.Conv2d(
                    bottleneck_planes // scales, bottleneck_planes // scales, kernel_size=3, stride=1, padding=1,
                    groups=groups,
                )
                for _ in range(scales - 1)
            ]
        )
        self.bn2 = nn.ModuleList([norm_layer(bottleneck_planes // scales) for _ in range(scales - 1)])
        self.conv3 = nn.Conv2d(bottleneck_planes, planes * self.expansion, kernel_size=1, stride=1)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.se = SEModule(planes * self.expansion) if se else None

    def _fusable(self) -> bool:
        convs = list(self.conv2)
        return (
            fusable((self.conv1, self.bn1), (self.conv3, self.bn3))
            and _chain_fusable(convs, self.bn2)
            and all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) and c.dilation == (1, 1)
                    for c in convs)
            and fusable_relu(self.relu)
        )

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not self._fusable():
            return self._forward_modules(x)
        groups = self.conv2[0].groups if len(self.conv2) else 1
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            out = conv_bn(x, self.conv1, self.bn1, cache=cache)
            out = _chain(out, self.conv2, self.bn2, self.scales, 1, 1, groups, "paper", "normal", cache)
            downsample = self.downsample if self.downsample else None  # the article passes an empty Sequential for none
            if self.se is None:
                return conv_bn_shortcut(out, self.conv3, self.bn3, x, downsample, cache)
            identity = shortcut(x, downsample, cache)
            out = conv_bn(out, self.conv3, self.bn3, relu=False, cache=cache)
            gate = se_gate(self.se, out)
            if gate is not None:  # the excitation, the residual add and the ReLU in one pass
                return ops.scale_add_relu(out, gate, identity)
            return F.relu(self.se(out) + identity)

    def _forward_modules(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        xs = torch.chunk(out, self.scales, 1)
        ys = [xs[0]]
        # zip over the ModuleLists rather than indexing them: torch.jit.script indexes a ModuleList by literals only
        for s, (conv, bn) in enumerate(zip(self.conv2, self.bn2)):
            sp = xs[s + 1] if s == 0 else xs[s + 1] + ys[-1]
            ys.append(self.relu(bn(conv(sp))))
        out = self.bn3(self.conv3(torch.cat(ys, 1)))
        if self.se is not None:
            out = self.se(out)
        if self.downsample is not None:  # the article's "no downsample" is an empty nn.Sequential: the identity
            identity = self.downsample(identity)
        return self.relu(out + identity)


class Res2Block(nn.Module):
    """Res2Block of the "Res2Net in YOLOv5" Q&A (docs/sources.md): 1x1 conv-BN-ReLU, 3x3 conv with
    ``groups=scale`` -BN-ReLU, 1x1 conv-BN, plus a shortcut (identity, or 1x1 conv + BN when the stride or
    channels change), then ReLU."""

    def __init__(self, in_channels, mid_channels, out_channels, stride=1, scale=4):
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=3, stride=stride, padding=1, groups=scale, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def _fusable(self) -> bool:
        rf = self.residual_function
        return (
            len(rf) == 8
            and fusable((rf[0], rf[1]), (rf[3], rf[4]), (rf[6], rf[7]))
            and fusable_relu(rf[2])
            and fusable_relu(rf[5])
        )

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not self._fusable():
            return self._forward_modules(x)
        rf = self.residual_function
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            out = conv_bn(x, rf[0], rf[1], cache=cache)
            out = conv_bn(out, rf[3], rf[4], cache=cache)
            return conv_bn_shortcut(out, rf[6], rf[7], x, self.shortcut if len(self.shortcut) else None, cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x))
