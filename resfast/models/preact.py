"""The pre-activation ResNetV2 of the ResNet50V2 article (resnet18_v2 ... resnet152_v2; docs/sources.md), built
from resfast's PreAct blocks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import PreActBasicBlock, PreActBottleneck
from ._load import Weights, load_weights


class ResNetV2(nn.Module):
    """The ResNet50V2 article's ResNetV2: conv-BN-ReLU-maxpool stem, pre-activation stages, final BN
    (``bn_last``) + ReLU."""

    def __init__(self, block, layers, num_classes: int = 1000):
        super().__init__()
        self.in_channels = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.bn_last = nn.BatchNorm2d(512 * block.expansion)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, out_channels, blocks, stride=1):
        downsample = None
        if stride != 1 or self.in_channels != out_channels * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_channels, out_channels * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels * block.expansion),
            )
        layers = [block(self.in_channels, out_channels, stride, downsample)]
        self.in_channels = out_channels * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.in_channels, out_channels))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.bn_last(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_v2(num_classes: int = 1000, weights: Weights = None) -> ResNetV2:
    return load_weights(ResNetV2(PreActBasicBlock, [2, 2, 2, 2], num_classes), weights)


def resnet34_v2(num_classes: int = 1000, weights: Weights = None) -> ResNetV2:
    return load_weights(ResNetV2(PreActBasicBlock, [3, 4, 6, 3], num_classes), weights)


def resnet50_v2(num_classes: int = 1000, weights: Weights = None) -> ResNetV2:
    return load_weights(ResNetV2(PreActBottleneck, [3, 4, 6, 3], num_classes), weights)


def resnet101_v2(num_classes: int = 1000, weights: Weights = None) -> ResNetV2:
    return load_weights(ResNetV2(PreActBottleneck, [3, 4, 23, 3], num_classes), weights)


def resnet152_v2(num_classes: int = 1000, weights: Weights = None) -> ResNetV2:
    return load_weights(ResNetV2(PreActBottleneck, [3, 8, 36, 3], num_classes), weights)
