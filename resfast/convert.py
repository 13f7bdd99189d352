"""resfast.convert: swap every recognised ResNet-family block in a model for its resfast equivalent.

Recognised: torchvision's BasicBlock/Bottleneck (also inside detection backbones, FrozenBatchNorm2d included),
timm's resnet BasicBlock/Bottleneck, res2net Bottle2neck and resnetv2 PreActBottleneck/PreActBasic by their exact
class; and blocks written like the source articles' (docs/sources.md: Res2NetBottleneck, Res2Block, ResBlock,
BasicBlockV2/BottleneckV2, the ResNeXt article's BasicBlock/Bottleneck), matched by class name and child modules
and then *verified*: a randomised copy of the block and of its conversion must give the same outputs and running
statistics in eval and in training mode, otherwise the block is left alone (a look-alike with other semantics,
e.g. a pre-activation block named BasicBlock, is never swapped). The replacement takes over the original's
parameters, buffers, submodules, attributes and hooks (it is the same object state under the resfast class), so
weights, outputs and state_dict keys are unchanged.

Synchronised BatchNorms are kept: resfast's SyncBatchNorm2d (resfast.convert_sync_batchnorm, before or after
convert) goes on through the fused ops; torch's nn.SyncBatchNorm makes the converted block run its modules. The
behavioural check runs on one process, so in it every BatchNorm uses the probe's own statistics (no collective).
"""

from __future__ import annotations

import copy
import sys
from typing import Optional, Type

import torch
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
    TimmBasicBlock,
    TimmBottleneck,
    TimmPreActBasic,
    TimmPreActBottleneck,
)
from .ops.batchnorm import local_statistics

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
    # timm's ResNetV2 blocks (the downsample reads the pre-activated input, unlike BottleneckV2's)
    "PreActBottleneck": (
        TimmPreActBottleneck,
        (frozenset({"norm1", "conv1", "norm2", "conv2", "norm3", "conv3"}),),
    ),
    "PreActBasic": (TimmPreActBasic, (frozenset({"norm1", "conv1", "norm2", "conv2"}),)),
}
# Library classes whose name another entry of _BY_NAME already means (timm's ResNet blocks are named like
# torchvision's): (module, class name) -> as in _BY_NAME; looked up before _BY_NAME.
_BY_CLASS: dict[tuple[str, str], tuple[Type[nn.Module], tuple[frozenset, ...]]] = {
    ("timm.models.resnet", "BasicBlock"): (
        TimmBasicBlock,
        (frozenset({"conv1", "bn1", "act1", "conv2", "bn2", "act2"}),),
    ),
    ("timm.models.resnet", "Bottleneck"): (
        TimmBottleneck,
        (frozenset({"conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3"}),),
    ),
}
# Optional children (present or None) that do not change what a block is.
_OPTIONAL = frozenset({"downsample", "se", "pool", "drop_block", "drop_path"})
_OPTIONAL_BY_CLASS = _OPTIONAL | {"aa"}  # timm's anti-aliasing layer (nn.Identity when off)
_REQUIRED_ATTRS = {
    "Bottle2neck": ("scale", "width", "is_first"),
    "Res2NetBottleneck": ("scales",),
    "ResBlock": ("use_residual", "use_1x1conv"),
}
# Attributes newer versions of a block have, with the value that means "absent".
_DEFAULTS = {
    Bottle2neck: {"drop_block": nn.Identity, "drop_path": lambda: None, "se": lambda: None},
    TimmPreActBottleneck: {"downsample": lambda: None, "drop_path": nn.Identity},
    TimmPreActBasic: {"downsample": lambda: None, "drop_path": nn.Identity},
    TimmBasicBlock: {"drop_block": nn.Identity, "aa": nn.Identity, "se": lambda: None, "downsample": lambda: None,
                     "drop_path": lambda: None},
    TimmBottleneck: {"drop_block": nn.Identity, "aa": nn.Identity, "se": lambda: None, "downsample": lambda: None,
                     "drop_path": lambda: None},
}


# Library classes trusted by their exact module and name; everything else must pass the behavioural check.
_LIBRARY = {
    ("torchvision.models.resnet", "BasicBlock"),
    ("torchvision.models.resnet", "Bottleneck"),
    ("timm.models.res2net", "Bottle2neck"),
    ("timm.models.resnetv2", "PreActBottleneck"),
    ("timm.models.resnetv2", "PreActBasic"),
    ("timm.models.resnet", "BasicBlock"),
    ("timm.models.resnet", "Bottleneck"),
}


def _target(m: nn.Module) -> Optional[Type[nn.Module]]:
    cls = _candidate(m)
    if cls is None:
        return None
    if (type(m).__module__, type(m).__name__) in _LIBRARY:
        return cls
    return cls if _behaves_the_same(m, cls) else None


def _candidate(m: nn.Module) -> Optional[Type[nn.Module]]:
    name = type(m).__name__
    by_class = _BY_CLASS.get((type(m).__module__, name))
    if by_class is not None:
        cls, child_sets = by_class
        children = frozenset(n for n, c in m.named_children()) - _OPTIONAL_BY_CLASS
        return cls if children in child_sets else None
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


def _in_channels(m: nn.Module) -> Optional[int]:
    first = m.residual_function[0] if hasattr(m, "residual_function") else getattr(m, "conv1", None)
    return getattr(first, "in_channels", None)


def _randomize(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=g, dtype=torch.float64)
            t.copy_(r + 0.5 if name.endswith("running_var") else (r - 0.5) * (2.0 if t.dim() <= 1 else 1.0))


def _deepcopy(m: nn.Module) -> nn.Module:
    """copy.deepcopy, sharing process groups (of SyncBatchNorm layers), which cannot be copied, and keeping every
    module's train/eval flag (torch.fx's GraphModule, e.g. timm's ``features_only=True, feature_cls='fx'`` models,
    deep-copies its submodules back into training mode)."""
    memo = {}
    for mod in m.modules():
        group = getattr(mod, "process_group", None)
        if group is not None:
            memo[id(group)] = group
    new = copy.deepcopy(m, memo)
    modes = {name: mod.training for name, mod in m.named_modules(remove_duplicate=False)}
    for name, mod in new.named_modules(remove_duplicate=False):
        if name in modes:
            mod.training = modes[name]
    return new


def _local_bns(m: nn.Module) -> None:
    """torch's nn.SyncBatchNorm in a probe copy becomes the nn.BatchNorm2d it is on one process (its training
    forward refuses CPU tensors once torch.distributed is initialised)."""
    for mod in m.modules():
        if isinstance(mod, nn.SyncBatchNorm):
            mod.__class__ = nn.BatchNorm2d
            mod.process_group = None


def _behaves_the_same(m: nn.Module, cls: Type[nn.Module]) -> bool:
    """Run a randomised float64 copy of `m` and of its conversion on a small input, in eval and training mode:
    same outputs and same buffers, or the block is not converted."""
    cin = _in_channels(m)
    params = list(m.parameters())
    if cin is None or not params or params[0].device.type == "meta":
        return False
    device = params[0].device
    try:
        a = _deepcopy(m).to(torch.float64)
        _local_bns(a)
        _randomize(a)
        b = _adopt(copy.deepcopy(a), cls)
        g = torch.Generator().manual_seed(1)
        for train in (False, True):
            a.train(train)
            b.train(train)
            x = torch.randn(2, cin, 9, 9, generator=g, dtype=torch.float64).to(device)
            with torch.no_grad(), local_statistics():
                ya, yb = a(x.clone()), b(x.clone())
            if ya.shape != yb.shape or not torch.allclose(ya, yb, rtol=1e-9, atol=1e-9):
                return False
        return all(torch.equal(u, v) or (u.is_floating_point() and torch.allclose(u, v, rtol=1e-9, atol=1e-9))
                   for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    except Exception:  # anything the probe cannot run is not converted
        return False


def _adopt(m: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for attr, make in _DEFAULTS.get(cls, {}).items():
        if attr not in new.__dict__ and attr not in new._modules:
            setattr(new, attr, make())
    return new


_BLOCKS = (BasicBlock, Bottleneck, Bottle2neck, PreActBasicBlock, PreActBottleneck, Res2Block, Res2NetBottleneck,
           ResBlock, TimmBasicBlock, TimmBottleneck, TimmPreActBasic, TimmPreActBottleneck)


def _register_timm_leaves() -> None:
    """Make the blocks leaf modules of timm's FX tracer (``timm.layers.register_notrace_module``), when timm is
    loaded: timm's FX feature extraction (``get_graph_node_names`` / ``create_feature_extractor`` with
    ``get_notrace_modules()``, FeatureGraphNet) then calls each block, which runs its fused forward, so the graph
    gives exactly the eager model's numbers (timm's test_model_forward_fx compares them with ``==``; the
    plain-module computation differs from the fused ops in the last bits). Other FX tracers
    (torch.fx.symbolic_trace, torchvision's create_feature_extractor without timm's leaf list) still trace into
    the blocks' plain-module computation."""
    layers = sys.modules.get("timm.layers")
    register = getattr(layers, "register_notrace_module", None)
    if register is not None:
        for cls in _BLOCKS:
            register(cls)


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every recognised block in `model` by the resfast block with the same weights and behaviour.

    Args:
        model: any nn.Module (a classifier, a detector backbone, a single block).
        inplace: modify `model` itself; otherwise a deep copy is converted and `model` is untouched.

    Returns:
        The converted model (`model` itself when inplace=True, or when `model` is itself a recognised block
        and inplace=True, a new object holding its state).
    """
    _register_timm_leaves()
    if not inplace:
        model = _deepcopy(model)
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
