"""resfast's functional ops. Each has an eager reference `<op>_ref` that defines its semantics.

* :func:`res2net_chain` - the Res2Net split -> 3x3 conv -> BN -> ReLU -> add chain ('normal'/'stage', both orders)
* :func:`conv_bn_relu` - conv + BN (+ residual) + ReLU (ResNet, ResNeXt's grouped 3x3)
* :func:`bn_relu_conv` - pre-activation BN + ReLU + conv (ResNetV2)
* :func:`scale_add_relu` - an SE block's end: ``relu(x * gate[n, c] + residual)``
* :func:`bn_act` - the C++/CUDA elementwise op ``relu(x * scale + shift + residual)``
"""

from . import reference  # noqa: F401  (defines the first four ops, in dispatch.OPS order)
from ._args import ConvShortcut
from .batchnorm import BatchNormParams, as_bn_params
from .bn_act import bn_act, bn_act_ref
from .bn_relu_conv import bn_relu_conv
from .conv_bn_relu import conv_bn_relu
from .dispatch import BackendUnavailableError, availability, backend, get_backend, set_backend
from .fold import FoldCache, clear_fold_caches
from .reference import bn_relu_conv_ref, conv_bn_relu_ref, res2net_chain_ref, scale_add_relu_ref
from .res2net_chain import res2net_chain
from .scale_add_relu import scale_add_relu

__all__ = [
    "BatchNormParams",
    "as_bn_params",
    "res2net_chain",
    "res2net_chain_ref",
    "conv_bn_relu",
    "ConvShortcut",
    "conv_bn_relu_ref",
    "bn_relu_conv",
    "bn_relu_conv_ref",
    "scale_add_relu",
    "scale_add_relu_ref",
    "bn_act",
    "bn_act_ref",
    "backend",
    "set_backend",
    "get_backend",
    "availability",
    "BackendUnavailableError",
    "FoldCache",
    "clear_fold_caches",
]
