"""What the drop-in blocks share: recognising the layers the fused ops reproduce, and calling the ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.fold import FoldCache, block_cache  # noqa: F401  (block_cache: re-exported for the blocks)
from ..ops.recompute import recompute_scope  # noqa: F401  (re-exported for the blocks)
from .layers import fusable, fusable_conv, fusable_relu, is_supported_bn  # noqa: F401  (re-exported)


def _capturing_eager(x) -> bool:
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
        or isinstance(x, torch.fx.Proxy)
    )


def capturing(x: Tensor) -> bool:
    """True while a graph-capture path that must record plain aten ops runs a block's forward: torch.jit.script
    (the blocks then compile only ``_forward_modules``), torch.jit.trace, torch.onnx.export (both exporters),
    torch.export (``torch.compiler.is_exporting``) and torch.fx.symbolic_trace (`x` is a Proxy). The blocks then run
    ``_forward_modules``, the original computation with their own modules: same numbers, and a graph with no resfast
    op, which runs without resfast. False under torch.compile (dynamo traces the fused ops) and in eager. timm's own
    FX tracer (its feature extraction) does not trace into the blocks: resfast.convert registers them as timm
    notrace (leaf) modules, so its graphs call them and give the eager model's exact numbers.

    Each block's pattern::

        def forward(self, x: Tensor) -> Tensor:
            if capturing(x):
                return self._forward_modules(x)   # scriptable: annotated, no lambdas, `is not None` checks
            return self._forward_fused(x)

        @torch.jit.unused
        def _forward_fused(self, x):   # the fused ops

    ``_forward_fused`` has no annotations: TorchScript reads an unused method's signature with inspect.signature,
    which leaves the strings of ``from __future__ import annotations`` unresolved ("Unknown type annotation");
    unannotated, its argument and result default to Tensor."""
    if torch.jit.is_scripting():
        return True
    else:  # not compiled by torch.jit.script (is_scripting() is a static condition there)
        return _capturing_eager(x)


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module, relu: bool = True, residual: Optional[Tensor] = None,
            cache: Optional[FoldCache] = None) -> Tensor:
    """ops.conv_bn_relu with the conv's own hyper-parameters and the BatchNorm module's training flag; `cache` is
    the calling block's :func:`block_cache`."""
    return ops.conv_bn_relu(
        x,
        conv.weight,
        bn,
        bias=conv.bias,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        training=bn.training,
        relu=relu,
        residual=residual,
        fold_cache=cache,
    )


def bn_conv(x: Tensor, bn: nn.Module, conv: nn.Conv2d, residual: Optional[Tensor] = None,
            cache: Optional[FoldCache] = None) -> Tensor:
    """ops.bn_relu_conv with the conv's own hyper-parameters and the BatchNorm module's training flag."""
    return ops.bn_relu_conv(
        x,
        bn,
        conv.weight,
        bias=conv.bias,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        training=bn.training,
        residual=residual,
        fold_cache=cache,
    )


def _pooled_downsample(downsample: Optional[nn.Module]) -> bool:
    """timm's ``downsample_avg`` ('d' variants): ``Sequential(nn.AvgPool2d or nn.Identity, Conv2d, BatchNorm)`` with a
    conv and BatchNorm the ops reproduce."""
    return (type(downsample) is nn.Sequential and len(downsample) == 3
            and type(downsample[0]) in (nn.AvgPool2d, nn.Identity) and fusable((downsample[1], downsample[2])))


def shortcut(x: Tensor, downsample: Optional[nn.Module], cache: Optional[FoldCache] = None) -> Tensor:
    """The residual branch: x, or ``downsample(x)``; a plain ``Sequential(Conv2d, BatchNorm)`` downsample (timm's and
    torchvision's) runs as one conv_bn_relu op without the ReLU, so its BatchNorm is folded too; timm's
    ``Sequential(AvgPool2d or Identity, Conv2d, BatchNorm)`` runs its pool, then that op."""
    if downsample is None:
        return x
    if (type(downsample) is nn.Sequential and len(downsample) == 2
            and fusable((downsample[0], downsample[1]))):
        return conv_bn(x, downsample[0], downsample[1], relu=False, cache=cache)
    if _pooled_downsample(downsample):
        return conv_bn(downsample[0](x), downsample[1], downsample[2], relu=False, cache=cache)
    return downsample(x)


def projection(x: Tensor, conv: nn.Module, dbn: nn.Module, bn: nn.Module) -> Optional[ops.ConvShortcut]:
    """``dbn(conv(x))`` as the op's ConvShortcut when `conv` is a plain 1x1 conv with no padding, groups or dilation
    and `dbn` a supported BatchNorm in the same train/eval mode as the main conv's `bn`; else None."""
    if not _plain_projection(conv, dbn, bn):
        return None
    return ops.ConvShortcut(x, conv.weight, dbn, conv.stride, conv.bias)


def _plain_projection(conv: nn.Module, dbn: nn.Module, bn: nn.Module) -> bool:
    return fusable((conv, dbn)) and not (
        conv.kernel_size != (1, 1) or conv.groups != 1 or tuple(conv.padding) != (0, 0)
        or conv.dilation != (1, 1) or dbn.training != bn.training)


def _projection(x: Tensor, downsample: Optional[nn.Module], bn: nn.Module) -> Optional[ops.ConvShortcut]:
    """A ``Sequential(Conv2d 1x1, BatchNorm)`` downsample (torchvision's, timm's default) as a ConvShortcut; timm's
    ``Sequential(AvgPool2d or Identity, Conv2d 1x1, BatchNorm)`` as the ConvShortcut of the pooled input."""
    if _pooled_downsample(downsample) and _plain_projection(downsample[1], downsample[2], bn):
        return projection(downsample[0](x), downsample[1], downsample[2], bn)
    if not (type(downsample) is nn.Sequential and len(downsample) == 2):
        return None
    return projection(x, downsample[0], downsample[1], bn)


def conv_bn_shortcut(out: Tensor, conv: nn.Conv2d, bn: nn.Module, x: Tensor, downsample: Optional[nn.Module],
                     cache: Optional[FoldCache] = None) -> Tensor:
    """A bottleneck's last step, ``relu(bn(conv(out)) + shortcut)`` with the shortcut ``x`` or ``downsample(x)``:
    a 1x1-conv + BatchNorm downsample goes into the same op as its ConvShortcut (one kernel on the Triton
    backend, the residual never written); any other downsample runs first (see :func:`shortcut`)."""
    proj = _projection(x, downsample, bn)
    if proj is None:
        return conv_bn(out, conv, bn, residual=shortcut(x, downsample, cache), cache=cache)
    return conv_bn_projection(out, conv, bn, proj, cache)


def conv_bn_projection(out: Tensor, conv: nn.Conv2d, bn: nn.Module, proj: ops.ConvShortcut,
                       cache: Optional[FoldCache] = None) -> Tensor:
    """``relu(bn(conv(out)) + proj)`` with the projection shortcut (from :func:`projection`) in the same op."""
    return ops.conv_bn_relu(
        out, conv.weight, bn, bias=conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        groups=conv.groups, training=bn.training, shortcut=proj, fold_cache=cache,
    )


_SEED_SE_CHILDREN = {"avg_pool": nn.AdaptiveAvgPool2d, "fc1": nn.Conv2d, "relu": nn.ReLU, "fc2": nn.Conv2d,
                     "sigmoid": nn.Sigmoid}


def se_gate(se: Optional[nn.Module], y: Tensor) -> Optional[Tensor]:
    """The gate (N, C, 1, 1) an SE module multiplies `y` by, computed with the module's own layers, for the SE
    modules whose forward is known to be ``y * gate``: resfast's SEModule and modules laid out like it
    (``sigmoid(fc2(relu(fc1(avg_pool(y)))))``; a converted look-alike block must still pass convert's behavioural
    check), and timm's SEModule without add_maxpool (``gate(fc2(act(bn(fc1(y.mean((2, 3)))))))``). None for any
    other module: the block then calls it."""
    if se is None:
        return None
    cls = type(se)
    if cls.__name__ == "SEModule" and cls.__module__ == "timm.layers.squeeze_excite":
        if getattr(se, "add_maxpool", True):
            return None
        return se.gate(se.fc2(se.act(se.bn(se.fc1(y.mean((2, 3), keepdim=True))))))
    children = dict(se.named_children())
    if cls.__name__ == "SEModule" and set(children) == set(_SEED_SE_CHILDREN) and all(
            type(children[k]) is t for k, t in _SEED_SE_CHILDREN.items()) and se.avg_pool.output_size in (1, (1, 1)):
        return se.sigmoid(se.fc2(se.relu(se.fc1(se.avg_pool(y)))))
    return None


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
