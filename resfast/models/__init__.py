"""Model builders. Each takes ``num_classes`` and ``weights`` (a state_dict or a local path; never a download).

torchvision keys: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d.
timm keys: res2net50_26w_4s/_26w_6s/_26w_8s/_48w_2s/_14w_8s, res2net101_26w_4s, res2next50.
Seed 004 keys: resnet18_v2 ... resnet152_v2. Seeds' small models: seed000_res2net, seed001_res2net,
seed003_resnet18.
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
    Seed000Res2Net,
    Seed001Res2Net,
    Seed003ResNet18,
    seed000_res2net,
    seed001_res2net,
    seed003_resnet18,
)

BUILDERS = {
    f.__name__: f
    for f in (
        resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
        res2net50_26w_4s, res2net50_26w_6s, res2net50_26w_8s, res2net50_48w_2s, res2net50_14w_8s,
        res2net101_26w_4s, res2next50,
        resnet18_v2, resnet34_v2, resnet50_v2, resnet101_v2, resnet152_v2,
        seed000_res2net, seed001_res2net, seed003_resnet18,
    )
}


def get_model(name: str, **kwargs):
    """Build model `name` (a key of BUILDERS)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**kwargs)


__all__ = ["ResNet", "ResNetV2", "Seed000Res2Net", "Seed001Res2Net", "Seed003ResNet18", "BUILDERS", "get_model"]
__all__ += list(BUILDERS)
