"""Model builders. Each takes ``num_classes`` and ``weights`` (a state_dict or a local path; never a download).

torchvision keys: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d.
timm keys: res2net50_26w_4s/_26w_6s/_26w_8s/_48w_2s/_14w_8s, res2net101_26w_4s, res2next50.
Pre-activation ResNetV2 of the ResNet50V2 article: resnet18_v2 ... resnet152_v2. The articles' small models:
res2net_fashion_mnist, se_res2net, resnet18_mnist. Where each comes from: docs/sources.md. The old names
seed000_res2net, seed001_res2net, seed003_resnet18 (and Seed000Res2Net, ...) still work and warn (deprecated).
"""

from .preact import ResNetV2, resnet18_v2, resnet34_v2, resnet50_v2, resnet101_v2, resnet152_v2
from .resnet import (
    ResNet,
    res2net50_14w_8s,
    res2net50_26w_4s,
    res2net50_26w_6s,
    res2net50_26w_8s,
    res2net50_48w_2s,
    res2net101_26w_4s,
    res2next50,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
)
from .seeds import (
    DEPRECATED_NAMES,
    Res2NetFashionMNIST,
    ResNet18MNIST,
    SERes2Net,
    _deprecated,
    res2net_fashion_mnist,
    resnet18_mnist,
    se_res2net,
)

BUILDERS = {
    f.__name__: f
    for f in (
        resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
        res2net50_26w_4s, res2net50_26w_6s, res2net50_26w_8s, res2net50_48w_2s, res2net50_14w_8s,
        res2net101_26w_4s, res2next50,
        resnet18_v2, resnet34_v2, resnet50_v2, resnet101_v2, resnet152_v2,
        res2net_fashion_mnist, se_res2net, resnet18_mnist,
    )
}


def get_model(name: str, **kwargs):
    """Build model `name` (a key of BUILDERS; a deprecated old name warns and builds its new name's model)."""
    if name in DEPRECATED_NAMES and DEPRECATED_NAMES[name] in BUILDERS:
        return _deprecated(name)(**kwargs)
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**kwargs)


__all__ = ["ResNet", "ResNetV2", "Res2NetFashionMNIST", "SERes2Net", "ResNet18MNIST", "BUILDERS", "get_model"]
__all__ += list(BUILDERS)


def __getattr__(name: str):
    """The old names (seed000_res2net, Seed000Res2Net, ...) resolve to the new ones with a DeprecationWarning."""
    if name in DEPRECATED_NAMES:
        return _deprecated(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
