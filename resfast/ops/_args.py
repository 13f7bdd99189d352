"""Validated, normalised arguments of each op, shared by the public op, its `_ref` and every backend.

`prepare_<op>` checks the inputs (raising a clear exception) and returns a NamedTuple; it does not touch any
buffer. BatchNorm rules are applied later, once, by the backend that runs (`resolve_bn`), so an error raised
while choosing a backend leaves num_batches_tracked and the running statistics as they were.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from torch import Tensor

from . import checks
from .batchnorm import BatchNormParams, as_bn_params
from .fold import FoldCache

ORDERS = ("timm", "paper")
BLOCK_TYPES = ("normal", "stage")


class ConvShortcut(NamedTuple):
    """A projection shortcut computed inside :func:`resfast.ops.conv_bn_relu` as its residual:
    ``bn(conv2d(x, weight, bias, stride))`` with a 1x1 ``weight`` (C_out, C_in', 1, 1), no padding, no groups
    (torchvision's and timm's ``downsample = Sequential(conv1x1(stride), BatchNorm2d)``). ``bn`` is a
    BatchNorm2d, FrozenBatchNorm2d or BatchNormParams; it runs in the op's ``training`` mode."""

    x: Tensor
    weight: Tensor
    bn: object
    stride: object = 1
    bias: Optional[Tensor] = None


class ConvBnReluArgs(NamedTuple):
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    bn: BatchNormParams
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    training: bool
    relu: bool
    residual: Optional[Tensor]
    cache: Optional[FoldCache] = None  # the calling block's folded weights (resfast.ops.fold)
    shortcut: Optional[ConvShortcut] = None  # prepared: stride a pair, bn a BatchNormParams; else `residual` is used

    op = "conv_bn_relu"
    keeps_input_precision = False  # under autocast eager casts the input to the conv's dtype

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return (self.bn,) if self.shortcut is None else (self.bn, self.shortcut.bn)

    def grad_tensors(self) -> list[Tensor]:
        """The tensors the op differentiates (those that are given)."""
        ts = [self.x, self.weight, self.bias, self.residual, self.bn.weight, self.bn.bias]
        sc = self.shortcut
        if sc is not None:
            ts += [sc.x, sc.weight, sc.bias, sc.bn.weight, sc.bn.bias]
        return [t for t in ts if t is not None]


class BnReluConvArgs(NamedTuple):
    x: Tensor
    bn: BatchNormParams
    weight: Tensor
    bias: Optional[Tensor]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    training: bool
    residual: Optional[Tensor]
    cache: Optional[FoldCache] = None  # the calling block's folded weights (resfast.ops.fold)

    op = "bn_relu_conv"
    keeps_input_precision = True  # under autocast eager normalises the input in its own dtype

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return (self.bn,)

    def grad_tensors(self) -> list[Tensor]:
        ts = [self.x, self.weight, self.bias, self.residual, self.bn.weight, self.bn.bias]
        return [t for t in ts if t is not None]


class Res2NetChainArgs(NamedTuple):
    x: Tensor
    weights: tuple[Tensor, ...]
    biases: tuple[Optional[Tensor], ...]
    bns: tuple[BatchNormParams, ...]
    scale: int
    width: int
    stride: int
    dilation: int
    groups: int
    order: str
    block_type: str
    training: bool
    conv_splits: tuple[int, ...]  # the splits that go through a conv, in chain order
    passthrough: Optional[int]  # the split copied (normal) or avg-pooled (stage), if any
    cache: Optional[FoldCache] = None  # the calling block's folded weights (resfast.ops.fold)

    op = "res2net_chain"
    keeps_input_precision = True  # the pass-through split keeps the input's dtype (the cat promotes)
    residual = None

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return self.bns

    def grad_tensors(self) -> list[Tensor]:
        ts = [self.x, *self.weights, *self.biases, *[t for bn in self.bns for t in (bn.weight, bn.bias)]]
        return [t for t in ts if t is not None]


class ScaleAddReluArgs(NamedTuple):
    x: Tensor
    gate: Tensor  # (N, C)
    residual: Optional[Tensor]
    relu: bool

    op = "scale_add_relu"
    keeps_input_precision = False
    training = False

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return ()

    def grad_tensors(self) -> list[Tensor]:
        return [t for t in (self.x, self.gate, self.residual) if t is not None]


def _check_cache(op, cache):
    if cache is not None and not isinstance(cache, FoldCache):
        raise TypeError(f"{op}: fold_cache must be a resfast.ops.fold.FoldCache or None, got {type(cache).__name__}")
    return cache


def _conv_params(op, x, weight, stride, padding, dilation, groups):
    stride = checks.pair(stride, "stride", op)
    padding = checks.pair(padding, "padding", op)
    dilation = checks.pair(dilation, "dilation", op)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"{op}: stride and dilation must be >= 1 and padding >= 0, got {stride}, {dilation}, {padding}"
        )
    checks.check_conv_weight(op, x.shape[1], weight, groups)
    checks.check_same(op, x, weight, "weight")
    oh, ow = checks.conv_out_hw(op, x.shape[2], x.shape[3], tuple(weight.shape[2:]), stride, padding, dilation)
    return stride, padding, dilation, (x.shape[0], weight.shape[0], oh, ow)


def _check_bias(op, x, bias, channels, name="bias"):
    if bias is None:
        return
    if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != channels:
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{op}: {name} must have shape ({channels},), got {shape}")
    checks.check_same(op, x, bias, name)


def _prepare_shortcut(op, x, shortcut, out_shape, training, residual) -> Optional[ConvShortcut]:
    if shortcut is None:
        return None
    if not isinstance(shortcut, ConvShortcut):
        raise TypeError(f"{op}: shortcut must be a resfast.ops.ConvShortcut or None, got {type(shortcut).__name__}")
    if residual is not None:
        raise ValueError(f"{op}: give either residual or shortcut, not both (the shortcut is the residual)")
    sx, w = shortcut.x, shortcut.weight
    checks.check_input(op, sx, "shortcut.x")
    checks.check_same(op, x, sx, "shortcut.x")
    checks.check_conv_weight(op, sx.shape[1], w, 1, "shortcut.weight")
    checks.check_same(op, x, w, "shortcut.weight")
    if tuple(w.shape[2:]) != (1, 1) or w.shape[0] != out_shape[1]:
        raise ValueError(f"{op}: shortcut.weight must be ({out_shape[1]}, {sx.shape[1]}, 1, 1) (a 1x1 projection to "
                         f"the output channels), got {tuple(w.shape)}")
    stride = checks.pair(shortcut.stride, "shortcut.stride", op)
    if min(stride) < 1:
        raise ValueError(f"{op}: shortcut.stride must be >= 1, got {stride}")
    hw = checks.conv_out_hw(op, sx.shape[2], sx.shape[3], (1, 1), stride, (0, 0), (1, 1))
    if (sx.shape[0],) + hw != (out_shape[0],) + tuple(out_shape[2:]):
        raise ValueError(f"{op}: the shortcut gives ({sx.shape[0]}, {w.shape[0]}, {hw[0]}, {hw[1]}) but the output "
                         f"has shape {tuple(out_shape)}")
    _check_bias(op, x, shortcut.bias, w.shape[0], "shortcut.bias")
    bn = as_bn_params(shortcut.bn)
    checks.check_bn(op, x, bn, w.shape[0], "shortcut.bn")
    checks.check_batch_stats(op, out_shape, checks.local_batch_stats(bn, training), "the shortcut conv output")
    return ConvShortcut(sx, w, bn, stride, shortcut.bias)


def prepare_conv_bn_relu(x, weight, bn, bias, stride, padding, dilation, groups, training, relu, residual,
                         cache=None, shortcut=None):
    op = "resfast.conv_bn_relu"
    checks.check_input(op, x)
    checks.check_flag(op, training, "training")
    checks.check_flag(op, relu, "relu")
    bn = as_bn_params(bn)
    stride, padding, dilation, out_shape = _conv_params(op, x, weight, stride, padding, dilation, groups)
    _check_bias(op, x, bias, weight.shape[0])
    checks.check_bn(op, x, bn, weight.shape[0])
    checks.check_residual(op, x, residual, out_shape)
    checks.check_batch_stats(op, out_shape, checks.local_batch_stats(bn, training), "the conv output")
    shortcut = _prepare_shortcut(op, x, shortcut, out_shape, training, residual)
    return ConvBnReluArgs(x, weight, bias, bn, stride, padding, dilation, groups, training, relu, residual,
                          _check_cache(op, cache), shortcut)


def prepare_bn_relu_conv(x, bn, weight, bias, stride, padding, dilation, groups, training, residual, cache=None):
    op = "resfast.bn_relu_conv"
    checks.check_input(op, x)
    checks.check_flag(op, training, "training")
    bn = as_bn_params(bn)
    checks.check_bn(op, x, bn, x.shape[1])
    checks.check_batch_stats(op, x.shape, checks.local_batch_stats(bn, training), "the input")
    stride, padding, dilation, out_shape = _conv_params(op, x, weight, stride, padding, dilation, groups)
    _check_bias(op, x, bias, weight.shape[0])
    checks.check_residual(op, x, residual, out_shape)
    return BnReluConvArgs(x, bn, weight, bias, stride, padding, dilation, groups, training, residual,
                          _check_cache(op, cache))


def prepare_scale_add_relu(x, gate, residual, relu):
    op = "resfast.scale_add_relu"
    checks.check_input(op, x)
    checks.check_flag(op, relu, "relu")
    N, C = x.shape[0], x.shape[1]
    if not isinstance(gate, Tensor) or tuple(gate.shape) not in ((N, C), (N, C, 1, 1)):
        shape = tuple(gate.shape) if isinstance(gate, Tensor) else type(gate).__name__
        raise ValueError(f"{op}: gate must have shape ({N}, {C}) or ({N}, {C}, 1, 1), got {shape}")
    checks.check_same(op, x, gate, "gate")
    checks.check_residual(op, x, residual, x.shape)
    return ScaleAddReluArgs(x, gate.reshape(N, C), residual, relu)


def chain_layout(scale: int, order: str) -> tuple[tuple[int, ...], Optional[int]]:
    """(splits that go through a conv in chain order, the split that passes through or None).

    timm/official order: the chain starts at split 0 and the last split passes through; with scale == 1
    there is one conv over the whole input and no pass-through (timm's `num_scales = max(1, scale - 1)`).
    paper order (Res2NetBottleneck): split 0 passes through and the chain runs over splits 1..scale-1.
    """
    if order == "timm":
        return (tuple(range(scale - 1)), scale - 1) if scale > 1 else ((0,), None)
    return tuple(range(1, scale)), 0


def prepare_res2net_chain(x, weights, bns, scale, biases, stride, dilation, groups, order, block_type, training,
                          cache=None):
    op = "resfast.res2net_chain"
    checks.check_input(op, x)
    if order not in ORDERS:
        raise ValueError(f"{op}: order must be one of {ORDERS}, got {order!r}")
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"{op}: block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
    checks.check_flag(op, training, "training")
    checks.check_int(op, scale, "scale")
    checks.check_int(op, stride, "stride")
    checks.check_int(op, dilation, "dilation")
    checks.check_int(op, groups, "groups")
    if block_type == "normal" and stride != 1:
        raise ValueError(
            f"{op}: a 'normal' block adds each split's output into the next split, so it needs stride 1 "
            f"(got stride={stride}); strided blocks are 'stage' blocks"
        )
    channels = x.shape[1]
    if channels % scale != 0:
        raise ValueError(f"{op}: scale={scale} does not divide the {channels} input channels")
    width = channels // scale
    conv_splits, passthrough = chain_layout(scale, order)
    weights = tuple(weights)
    bns = tuple(as_bn_params(b) for b in bns)
    n = len(conv_splits)
    if len(weights) != n or len(bns) != n:
        raise ValueError(
            f"{op}: scale={scale} with order={order!r} needs {n} convs and {n} BatchNorms, "
            f"got {len(weights)} weights and {len(bns)} BatchNorms"
        )
    biases = (None,) * n if biases is None else tuple(biases)
    if len(biases) != n:
        raise ValueError(f"{op}: expected {n} conv biases (or None), got {len(biases)}")
    conv_in = width  # with timm's scale == 1 the single conv takes the whole input, and width == channels
    out_hw = None
    for i, (w, b, bn) in enumerate(zip(weights, biases, bns)):
        name = f"weights[{i}]"
        checks.check_conv_weight(op, conv_in, w, groups, name)
        checks.check_same(op, x, w, name)
        if tuple(w.shape[2:]) != (3, 3):
            raise ValueError(f"{op}: {name} must be a 3x3 kernel, got {tuple(w.shape[2:])}")
        if w.shape[0] != conv_in:
            raise ValueError(f"{op}: {name} has {w.shape[0]} output channels but each split has {conv_in}")
        _check_bias(op, x, b, conv_in, f"biases[{i}]")
        checks.check_bn(op, x, bn, conv_in, f"bns[{i}]")
        hw = checks.conv_out_hw(op, x.shape[2], x.shape[3], (3, 3), (stride,) * 2, (dilation,) * 2, (dilation,) * 2)
        out_hw = hw
        checks.check_batch_stats(
            op, (x.shape[0], conv_in) + hw, checks.local_batch_stats(bn, training),
            f"split {conv_splits[i]}'s conv output",
        )
    if out_hw is None and block_type == "stage":
        checks.conv_out_hw(op, x.shape[2], x.shape[3], (3, 3), (stride,) * 2, (1, 1), (1, 1))
    return Res2NetChainArgs(
        x, weights, biases, bns, scale, width, stride, dilation, groups, order, block_type, training,
        conv_splits, passthrough, _check_cache(op, cache),
    )


__all__: Sequence[str] = [
    "ConvShortcut",
    "ConvBnReluArgs",
    "BnReluConvArgs",
    "Res2NetChainArgs",
    "prepare_conv_bn_relu",
    "ScaleAddReluArgs",
    "prepare_scale_add_relu",
    "prepare_bn_relu_conv",
    "prepare_res2net_chain",
    "chain_layout",
]
