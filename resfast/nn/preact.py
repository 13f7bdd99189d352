"""Drop-in pre-activation (ResNetV2) blocks: seed 004's BasicBlockV2 and BottleneckV2.

Each unit is BN -> ReLU -> conv (resfast.ops.bn_relu_conv); the shortcut (identity or the downsample applied
to the raw input) is added by the last unit. No ReLU after the add, as in the seed.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import block_cache, bn_conv, fusable, fusable_relu, shortcut


class PreActBasicBlock(nn.Module):
    """Seed 004's BasicBlockV2 (ResNet-18/34 v2)."""

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
        if not (fusable((self.conv1, self.bn1), (self.conv2, self.bn2)) and fusable_relu(self.relu)):
            return self._forward_modules(x)
        cache = block_cache(self)
        identity = shortcut(x, self.downsample, cache)
        out = bn_conv(x, self.bn1, self.conv1, cache=cache)
        return bn_conv(out, self.bn2, self.conv2, residual=identity, cache=cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class PreActBottleneck(nn.Module):
    """Seed 004's BottleneckV2 (ResNet-50/101/152 v2): stride on the 3x3 conv."""

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
        if not (fusable((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
                and fusable_relu(self.relu)):
            return self._forward_modules(x)
        cache = block_cache(self)
        identity = shortcut(x, self.downsample, cache)
        out = bn_conv(x, self.bn1, self.conv1, cache=cache)
        out = bn_conv(out, self.bn2, self.conv2, cache=cache)
        return bn_conv(out, self.bn3, self.conv3, residual=identity, cache=cache)

    def _forward_modules(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity
