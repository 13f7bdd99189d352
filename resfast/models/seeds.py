"""The source articles' small models (see docs/sources.md), with the articles' structure and state_dict keys,
built from resfast blocks.

* :class:`Res2NetFashionMNIST` - the ``Res2Net`` of ``Res2Block``s (Fashion-MNIST, 10 classes) from the
  "Res2Net in YOLOv5" Q&A.
* :class:`SERes2Net` - the squeeze-and-excitation ``Res2Net`` of ``Res2NetBottleneck``s from the "Res2Net in
  PyTorch" article (returns softmax probabilities, as the article does).
* :class:`ResNet18MNIST` - ``Model_ResNet18`` of ``ResBlock``s (``use_residual`` switch) from the NNDL
  "ResNet18 on MNIST" lab.

The old names (``Seed000Res2Net``, ``seed000_res2net``, ...) still work and warn (DeprecationWarning).
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Res2Block, Res2NetBottleneck, ResBlock
from ._load import Weights, load_weights


class Res2NetFashionMNIST(nn.Module):
    """The small Fashion-MNIST Res2Net of the "Res2Net in YOLOv5" Q&A. As in the article, only the first block of
    each stage gets ``stride``, and that block uses the default ``scale=4``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.layer1 = self._make_layer(32, 16, 64, 3, 1, scale=4)
        self.layer2 = self._make_layer(64, 32, 128, 4, 2, scale=4)
        self.layer3 = self._make_layer(128, 64, 256, 6, 2, scale=4)
        self.layer4 = self._make_layer(256, 128, 512, 3, 2, scale=4)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avg(x)
        return self.fc(x.view(x.size(0), -1))

    def _make_layer(self, in_channels, mid_channels, out_channels, num_blocks, stride, scale=4):
        layers = [Res2Block(in_channels, mid_channels, out_channels, stride)]
        for _ in range(1, num_blocks):
            layers.append(Res2Block(out_channels, mid_channels, out_channels, scale=scale))
        return nn.Sequential(*layers)


class SERes2Net(nn.Module):
    """The SE Res2Net of the "Res2Net in PyTorch" article: ``planes = width * scales * 2**i``, SE blocks, biased
    1x1 downsample convs."""

    def __init__(self, layers, num_classes, width=16, scales=4, groups=1, zero_init_residual=True, se=True,
                 norm_layer=True):
        super().__init__()
        if not norm_layer:
            raise ValueError("norm_layer must be truthy: SERes2Net always uses nn.BatchNorm2d, as the article does")
        norm_layer = nn.BatchNorm2d
        planes = [int(width * scales * 2**i) for i in range(4)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        kw = dict(scales=scales, groups=groups, se=se)
        self.layer1 = self._make_layer(planes[0], layers[0], stride=1, **kw)
        self.layer2 = self._make_layer(planes[1], layers[1], stride=2, **kw)
        self.layer3 = self._make_layer(planes[2], layers[2], stride=2, **kw)
        self.layer4 = self._make_layer(planes[3], layers[3], stride=2, **kw)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * Res2NetBottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Res2NetBottleneck):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes, blocks, stride=1, scales=4, groups=1, se=True):
        block = Res2NetBottleneck
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, downsample, stride=stride, scales=scales, groups=groups, se=se)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, scales=scales, groups=groups, se=se))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        logits = self.fc(x.view(x.size(0), -1))
        return F.softmax(logits, dim=1)


def _first_module(in_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 7, stride=2, padding=3), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def _stage(cin, cout, n, stride, use_residual):
    blocks = [ResBlock(cin, cout, stride=stride, use_residual=use_residual)]
    blocks += [ResBlock(cout, cout, use_residual=use_residual) for _ in range(1, n)]
    return nn.Sequential(*blocks)


class ResNet18MNIST(nn.Module):
    """Model_ResNet18 of the NNDL "ResNet18 on MNIST" lab: everything in ``self.net`` (stem, four stages, pool,
    flatten, fc)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, use_residual: bool = True):
        super().__init__()
        u = use_residual
        self.net = nn.Sequential(
            _first_module(in_channels),
            _stage(64, 64, 2, 1, u), _stage(64, 128, 2, 2, u), _stage(128, 256, 2, 2, u), _stage(256, 512, 2, 2, u),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def res2net_fashion_mnist(num_classes: int = 10, weights: Weights = None) -> Res2NetFashionMNIST:
    """The small Res2Net of the "Res2Net in YOLOv5" Q&A (3-channel input, 10 classes, ~0.96 M parameters)."""
    return load_weights(Res2NetFashionMNIST(num_classes), weights)


def se_res2net(layers=(3, 4, 6, 3), num_classes: int = 5, weights: Weights = None, **kwargs) -> SERes2Net:
    """The SE Res2Net of the "Res2Net in PyTorch" article (default: its 50-layer layout and ``classes=5``)."""
    return load_weights(SERes2Net(list(layers), num_classes, **kwargs), weights)


def resnet18_mnist(in_channels: int = 3, num_classes: int = 10, use_residual: bool = True,
                   weights: Weights = None) -> ResNet18MNIST:
    """The NNDL lab's ResNet18 (``in_channels=1`` for MNIST; ``use_residual=False``: no shortcuts)."""
    return load_weights(ResNet18MNIST(in_channels, num_classes, use_residual), weights)


# Old names (the articles' internal ids, "seed 000" ... "seed 003"): resolved lazily, with a DeprecationWarning.
DEPRECATED_NAMES = {
    "Seed000Res2Net": "Res2NetFashionMNIST",
    "Seed001Res2Net": "SERes2Net",
    "Seed003ResNet18": "ResNet18MNIST",
    "seed000_res2net": "res2net_fashion_mnist",
    "seed001_res2net": "se_res2net",
    "seed003_resnet18": "resnet18_mnist",
}


def _deprecated(name: str, stacklevel: int = 3):
    """The object now called ``DEPRECATED_NAMES[name]``, after a DeprecationWarning naming it."""
    new = DEPRECATED_NAMES[name]
    warnings.warn(f"resfast.models.{name} is deprecated; use resfast.models.{new} (the same model)",
                  DeprecationWarning, stacklevel=stacklevel)
    return globals()[new]


def __getattr__(name: str):
    if name in DEPRECATED_NAMES:
        return _deprecated(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
