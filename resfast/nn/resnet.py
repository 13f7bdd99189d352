"""Drop-in ResNet / ResNeXt blocks: torchvision's BasicBlock and Bottleneck, and the NNDL lab's ResBlock.

Same constructors, attribute names and state_dict keys as the originals; the forward runs through
resfast.ops when every layer is one the ops reproduce (plain Conv2d, BatchNorm2d or FrozenBatchNorm2d,
ReLU), and otherwise runs the original computation with the modules themselves.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    block_cache,
    capturing,
    conv1x1,
    conv3x3,
    conv_bn,
    conv_bn_projection,
    conv_bn_shortcut,
    fusable,
    fusable_relu,
    projection,
    recompute_scope,
    shortcut,
)
from .whole_block import res2net_bottleneck_train


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (ResNet-18/34)."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        if not (fusable((self.conv1, self.bn1), (self.conv2, self.bn2)) and fusable_relu(self.relu)):
            return self._forward_modules(x)
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            out = conv_bn(x, self.conv1, self.bn1, cache=cache)
            return conv_bn_shortcut(out, self.conv2, self.bn2, x, self.downsample, cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (ResNet-50/101/152, ResNeXt with groups/base_width; stride on the 3x3)."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if capturing(x):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(x)
        return self._forward_fused(x)

    @torch.jit.unused
    def _forward_fused(self, x):  # no annotations: see _common.capturing
        pairs = ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
        if not (fusable(*pairs) and fusable_relu(self.relu)):
            return self._forward_modules(x)
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            c2 = self.conv2
            # training with batch statistics on a backend with a whole-bottleneck op (Triton): the Res2Net op with
            # scale 1 (one 3x3 conv over the whole width), each BatchNorm + ReLU in the next conv's prologue
            y = res2net_bottleneck_train(x, self.conv1, self.bn1, [c2], [self.bn2], self.conv3, self.bn3,
                                         lambda: shortcut(x, self.downsample, cache), 1, c2.stride[0],
                                         c2.dilation[0], c2.groups, "timm", "stage")
            if y is not None:
                return y
            out = conv_bn(x, self.conv1, self.bn1, cache=cache)
            out = conv_bn(out, self.conv2, self.bn2, cache=cache)
            return conv_bn_shortcut(out, self.conv3, self.bn3, x, self.downsample, cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResBlock(nn.Module):
    """Residual unit of the NNDL "ResNet18 on MNIST" lab (docs/sources.md): 3x3 conv-BN-ReLU, 3x3 conv-BN,
    optional 1x1-conv+BN shortcut.

    ``use_residual=False`` drops the shortcut (the lab's plain-network experiment); the shortcut layers are
    still created when the shapes differ, as in the lab, so state_dicts match either way.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, use_residual: bool = True) -> None:
        super().__init__()
        self.stride = stride
        self.use_residual = use_residual
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, stride=self.stride, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.use_1x1conv = in_channels != out_channels or stride != 1
        if self.use_1x1conv:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=self.stride, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if self.use_1x1conv:
            self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: Tensor) -> Tensor:
        if capturing(inputs):  # script / trace / fx / ONNX / torch.export: plain aten ops, same numbers
            return self._forward_modules(inputs)
        return self._forward_fused(inputs)

    @torch.jit.unused
    def _forward_fused(self, inputs):  # no annotations: see _common.capturing
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
        if self.use_residual and self.use_1x1conv:
            pairs.append((self.shortcut, self.bn3))
        if not fusable(*pairs):
            return self._forward_modules(inputs)
        with recompute_scope():  # normalised activations rebuilt in backward, not saved
            cache = block_cache(self)
            y = conv_bn(inputs, self.conv1, self.bn1, cache=cache)
            if not self.use_residual:
                return conv_bn(y, self.conv2, self.bn2, cache=cache)
            if self.use_1x1conv:  # the lab's shortcut conv and bn3 are separate attributes, not a Sequential
                proj = projection(inputs, self.shortcut, self.bn3, self.bn2)
                if proj is None:
                    return conv_bn(y, self.conv2, self.bn2, cache=cache,
                                   residual=conv_bn(inputs, self.shortcut, self.bn3, relu=False, cache=cache))
                return conv_bn_projection(y, self.conv2, self.bn2, proj, cache)
            return conv_bn(y, self.conv2, self.bn2, residual=inputs, cache=cache)

    def _forward_modules(self, inputs: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(inputs)))
        y = self.bn2(self.conv2(y))
        if self.use_residual:
            # hasattr: the shortcut layers exist only when the shapes change (a static test under torch.jit.script)
            if hasattr(self, "shortcut") and hasattr(self, "bn3"):
                shortcut = self.bn3(self.shortcut(inputs)) if self.use_1x1conv else inputs
            else:
                shortcut = inputs
            y = shortcut + y
        return F.relu(y)
