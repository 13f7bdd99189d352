"""resfast.convert: swap every recognised ResNet-family block in a model for its resfast equivalent.

Recognised: torchvision's BasicBlock/Bottleneck (also inside detection backbones, FrozenBatchNorm2d included),
timm's res2net Bottle2neck, and the seed articles' blocks (Res2NetBottleneck, Res2Block, ResBlock,
BasicBlockV2/BottleneckV2, and seed 002's BasicBlock/Bottleneck), matched by class name and exact set of
child modules. The replacement takes over the original's parameters, buffers, submodules, attributes and
hooks (it is the same object state under the resfast class), so weights, outputs and state_dict keys are
unchanged. Everything else is left alone.
"""

from __future__ import annotations

import copy
from typing import Optional, Type

from torch import nn

from .nn import (
    BasicBlock,
    Bottle2neck,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    Res2Block,
    Res2NetBottleneck,
    ResBlock,
)

# class name -> (resfast class, the exact sets of child-module names accepted)
_BY_NAME: dict[str, tuple[Type[nn.Module], tuple[frozenset, ...]]] = {
    "BasicBlock": (BasicBlock, (frozenset({"conv1", "bn1", "relu", "conv2", "bn2"}),)),
    "Bottleneck": (Bottleneck, (frozenset({"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"}),)),
    "Bottle2neck": (
        Bottle2neck,
        (frozenset({"conv1", "bn1", "convs", "bns", "conv3", "bn3", "relu"}),),
    ),
    "Res2NetBottleneck": (
        Res2NetBottleneck,
        (frozenset({"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"}),),
    ),
    "Res2Block": (Res2Block, (frozenset({"residual_function", "shortcut"}),)),
    "ResBlock": (
        ResBlock,
        (frozenset({"conv1", "conv2", "bn1", "bn2"}), frozenset({"conv1", "conv2", "shortcut", "bn1", "bn2", "bn3"})),
    ),
    "BasicBlockV2": (PreActBasicBlock, (frozenset({"bn1", "relu", "conv1", "bn2", "conv2"}),)),
    "BottleneckV2": (PreActBottleneck, (frozenset({"bn1", "relu", "conv1", "bn2", "conv2", "bn3", "conv3"}),)),
}
# Optional children (present or None) that do not change what a block is.
_OPTIONAL = frozenset({"downsample", "se", "pool", "drop_block", "drop_path"})
_REQUIRED_ATTRS = {
    "Bottle2neck": ("scale", "width", "is_first"),
    "Res2NetBottleneck": ("scales",),
    "ResBlock": ("use_residual", "use_1x1conv"),
}
# Attributes newer versions of a block have, with the value that means "absent".
_DEFAULTS = {Bottle2neck: {"drop_block": nn.Identity, "drop_path": lambda: None, "se": lambda: None}}


def _target(m: nn.Module) -> Optional[Type[nn.Module]]:
    name = type(m).__name__
    if name not in _BY_NAME or m.__class__.__module__.startswith("resfast."):
        return None
    cls, child_sets = _BY_NAME[name]
    children = frozenset(n for n, c in m.named_children()) - _OPTIONAL
    if children not in child_sets:
        return None
    if any(not hasattr(m, a) for a in _REQUIRED_ATTRS.get(name, ())):
        return None
    if name in ("BasicBlockV2", "BottleneckV2", "BasicBlock", "Bottleneck") and not hasattr(m, "downsample"):
        return None
    return cls


def _adopt(m: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for attr, make in _DEFAULTS.get(cls, {}).items():
        if attr not in new.__dict__ and attr not in new._modules:
            setattr(new, attr, make())
    return new


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every recognised block in `model` by the resfast block with the same weights and behaviour.

    Args:
        model: any nn.Module (a classifier, a detector backbone, a single block).
        inplace: modify `model` itself; otherwise a deep copy is converted and `model` is untouched.

    Returns:
        The converted model (`model` itself when inplace=True, or when `model` is itself a recognised block
        and inplace=True, a new object holding its state).
    """
    if not inplace:
        model = copy.deepcopy(model)
    cls = _target(model)
    if cls is not None:
        return _adopt(model, cls)
    _convert_children(model)
    return model


def _convert_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        cls = _target(child)
        if cls is not None:
            setattr(module, name, _adopt(child, cls))
        else:
            _convert_children(child)
