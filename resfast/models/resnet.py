"""ResNet / ResNeXt (torchvision keys) and Res2Net / Res2NeXt (timm keys) built from resfast blocks.

Both libraries lay a ResNet out the same way (conv1, bn1, maxpool, layer1-4 with downsample.0/.1, fc), so one
class serves both key sets; the block decides which family it is.
"""

from __future__ import annotations

from typing import Optional, Sequence, Type

import torch
from torch import Tensor, nn

from ..nn import BasicBlock, Bottle2neck, Bottleneck
from ._load import Weights, load_weights


class ResNet(nn.Module):
    """The ResNet trunk: 7x7/2 stem, max-pool, four stages of `block`, global average pool, fc.

    ``groups``/``width_per_group`` are torchvision's (ResNeXt); for Bottle2neck they are timm's
    ``cardinality``/``base_width`` and ``block_args`` carries e.g. ``{"scale": 4}``.
    ``zero_init_residual`` zeroes the last BatchNorm of each block (timm does so for Res2Net by default).
    """

    def __init__(
        self,
        block: Type[nn.Module],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        block_args: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.block = block
        self.groups = groups
        self.base_width = width_per_group
        self.block_args = dict(block_args or {})
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) if isinstance(m, (Bottleneck, Bottle2neck)) else None
                if isinstance(m, BasicBlock):
                    last_bn = m.bn2
                if last_bn is not None and last_bn.weight is not None:
                    nn.init.constant_(last_bn.weight, 0)

    def _block(self, block, inplanes, planes, stride, downsample):
        if issubclass(block, Bottle2neck):
            return block(
                inplanes, planes, stride, downsample, cardinality=self.groups, base_width=self.base_width,
                **self.block_args,
            )
        return block(inplanes, planes, stride, downsample, self.groups, self.base_width, **self.block_args)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [self._block(block, self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(self._block(block, self.inplanes, planes, 1, None))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


def _build(weights: Weights, block, layers, num_classes, **kwargs) -> ResNet:
    return load_weights(ResNet(block, layers, num_classes=num_classes, **kwargs), weights)


# torchvision layouts and state_dict keys
def resnet18(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def resnet101(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, Bottleneck, [3, 4, 23, 3], num_classes, **kwargs)


def resnet152(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, Bottleneck, [3, 8, 36, 3], num_classes, **kwargs)


def resnext50_32x4d(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, Bottleneck, [3, 4, 6, 3], num_classes, groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _build(weights, Bottleneck, [3, 4, 23, 3], num_classes, groups=32, width_per_group=8, **kwargs)


# timm layouts and state_dict keys (timm zero-initialises each block's last BatchNorm)
def _res2net(weights, layers, num_classes, base_width, scale, cardinality=1, **kwargs) -> ResNet:
    kwargs.setdefault("zero_init_residual", True)
    return _build(
        weights, Bottle2neck, layers, num_classes, groups=cardinality, width_per_group=base_width,
        block_args={"scale": scale}, **kwargs,
    )


def res2net50_26w_4s(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 6, 3], num_classes, 26, 4, **kwargs)


def res2net50_26w_6s(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 6, 3], num_classes, 26, 6, **kwargs)


def res2net50_26w_8s(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 6, 3], num_classes, 26, 8, **kwargs)


def res2net50_48w_2s(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 6, 3], num_classes, 48, 2, **kwargs)


def res2net50_14w_8s(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 6, 3], num_classes, 14, 8, **kwargs)


def res2net101_26w_4s(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 23, 3], num_classes, 26, 4, **kwargs)


def res2next50(num_classes: int = 1000, weights: Weights = None, **kwargs) -> ResNet:
    return _res2net(weights, [3, 4, 6, 3], num_classes, 4, 4, cardinality=8, **kwargs)
