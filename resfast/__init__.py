"""resfast: fused Res2Net, ResNeXt and pre-activation ResNet blocks for PyTorch.

``from resfast import Res2NetBottleneck``, ``resfast.convert(model)``, ``resfast.ops.res2net_chain``.
"""

from . import (
    _ext,  # noqa: F401  (loads resfast._C if it can; warns once if it cannot)
    backends,  # noqa: F401  (registers the backends with resfast.ops.dispatch)
    models,  # noqa: E402
    nn,  # noqa: E402
    ops,
)
from .convert import convert  # noqa: E402
from .nn import (  # noqa: E402
    BasicBlock,
    Bottle2neck,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    Res2Block,
    Res2NetBottleneck,
    ResBlock,
    SEModule,
    SyncBatchNorm2d,
    SyncBatchNormAct2d,
    TimmBasicBlock,
    TimmBottleneck,
    TimmPreActBasic,
    TimmPreActBottleneck,
    convert_sync_batchnorm,
)
from .ops.dispatch import BackendUnavailableError, backend, get_backend, set_backend
from .version import __version__

__all__ = [
    "__version__",
    "ops",
    "nn",
    "models",
    "convert",
    "convert_sync_batchnorm",
    "SyncBatchNorm2d",
    "SyncBatchNormAct2d",
    "backend",
    "set_backend",
    "get_backend",
    "BackendUnavailableError",
    "BasicBlock",
    "Bottleneck",
    "Bottle2neck",
    "Res2NetBottleneck",
    "SEModule",
    "PreActBasicBlock",
    "PreActBottleneck",
    "TimmPreActBottleneck",
    "TimmPreActBasic",
    "TimmBasicBlock",
    "TimmBottleneck",
    "Res2Block",
    "ResBlock",
]
