"""A whole Res2Net bottleneck in one training op, where the backend has one (Triton: res2net_bottleneck_train);
a whole pre-activation (ResNetV2) block likewise (Triton: preact_block_train).

A ResNet/ResNeXt bottleneck (torchvision's: conv1 1x1, conv2 3x3 with the stride and groups, conv3 1x1) is the
same op with scale 1: one conv over the whole width, no pass-through split.

Per op, a block's training forward writes each normalised activation (``relu(bn1(conv1(x)))``, the chain's split
outputs and the chain's output) for the next op to read. One op over the whole bottleneck applies each BatchNorm +
ReLU in the next convolution's prologue instead, so those activations are never written; its backward carries bn1
(whose statistics depend on conv1's output) and rebuilds the activations from the raw conv outputs it saved.

:func:`res2net_bottleneck_train` is what a block calls first (through resfast/nn/whole_block.py, which decides
whether its modules are what the op computes): it returns None when the whole-block op does not apply (the backend
the block's first op gets has no whole-block op, a BatchNorm with running statistics or synchronised, autocast, a
batch too small for statistics), and the block then runs its per-op path, which checks and reports everything as
usual. Both whole-block ops are dispatched like every op (resfast.ops.dispatch.select_block): the backends without
one say why in their reasons. ``RESFAST_WHOLE_BLOCK=0`` (or ``WHOLE_BLOCK.enabled = False``) turns it off, e.g. to
compare the two paths.

A pre-activation block's units (BN -> ReLU -> conv) already apply each BatchNorm + ReLU in the conv's prologue per
op; what the whole op adds is where the statistics come from: each BatchNorm after the first takes them from the
epilogue of the conv before it (per op, a separate pass reads that conv's output again), and timm's downsample
(a 1x1 conv of the normalised input) becomes a second GEMM of the last conv's launch, so neither the normalised
input nor the shortcut is written. :func:`preact_block_train` returns None when it does not apply, as above.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional, Sequence

from torch import Tensor

from . import dispatch
from ._args import prepare_bn_relu_conv, prepare_conv_bn_relu
from .batchnorm import BatchNormParams, as_bn_params
from .checks import check_residual, conv_output_size, needs_batch_stats
from .dtypes import compute_dtype


class _Switch:
    enabled = os.environ.get("RESFAST_WHOLE_BLOCK", "1").strip() != "0"


WHOLE_BLOCK = _Switch()
OP = "resfast.res2net_bottleneck"
PREACT_OP = "resfast.preact_block"


def _batch_stats(bn: BatchNormParams, training: bool) -> bool:
    """An affine BatchNorm that normalises with this batch's statistics on this process alone."""
    return (not bn.frozen and bn.process_group is None and needs_batch_stats(bn, training)
            and bn.weight is not None and bn.bias is not None)


def _common_applies(x, bns: Sequence[BatchNormParams], training: Sequence[bool]) -> bool:
    return (WHOLE_BLOCK.enabled and isinstance(x, Tensor) and x.dim() == 4 and x.device.type in ("cpu", "cuda")
            and all(_batch_stats(bn, t) for bn, t in zip(bns, training)) and compute_dtype(x) == x.dtype)


class Res2NetBottleneckArgs(NamedTuple):
    x: Tensor
    w1: Tensor  # (width * scale, C_in, 1, 1)
    bn1: BatchNormParams
    weights: tuple[Tensor, ...]  # the chain's 3x3 convs
    bns: tuple[BatchNormParams, ...]
    w3: Tensor  # (C_out, width * scale, 1, 1)
    bn3: BatchNormParams
    scale: int
    stride: int
    dilation: int
    groups: int
    order: str
    block_type: str
    training: tuple[bool, ...]  # each BatchNorm's training flag, in batch_norms() order
    residual: Optional[Tensor] = None  # set once the op runs

    op = "res2net_bottleneck_train"
    keeps_input_precision = False

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return (self.bn1, *self.bns, self.bn3)

    def grad_tensors(self) -> list[Tensor]:
        ts = [self.x, self.w1, *self.weights, self.w3, self.residual]
        ts += [t for bn in self.batch_norms() for t in (bn.weight, bn.bias)]
        return [t for t in ts if t is not None]


def res2net_bottleneck_train(x: Tensor, w1: Tensor, bn1, weights: Sequence[Tensor], bns: Sequence, w3: Tensor, bn3,
                             residual: Callable[[], Tensor], scale: int, stride: int, dilation: int, groups: int,
                             order: str, block_type: str,
                             training: Optional[Sequence[bool]] = None) -> Optional[Tensor]:
    """``relu(bn3(conv3(chain(relu(bn1(conv1(x)))))) + residual())`` through the backend's whole-block op: conv1 and
    conv3 plain 1x1 convs without bias (``w1``, ``w3``), the chain resfast.ops.res2net_chain's (3x3 ``weights``,
    padding = dilation, no bias), every BatchNorm (BatchNormParams or a BatchNorm2d) with batch statistics and its
    running buffers updated exactly as nn.BatchNorm2d's. ``training``: each BatchNorm's training flag (bn1, the
    chain's, bn3; default all True). None, without touching anything, when the op does not apply (see the module's
    docstring); ``residual`` is called only when it does."""
    bns_all = tuple(as_bn_params(b) for b in (bn1, *bns, bn3))
    training = tuple(training) if training is not None else (True,) * len(bns_all)
    if not weights or not _common_applies(x, bns_all, training):
        return None
    if not (w1.dim() == 4 and tuple(w1.shape[1:]) == (x.shape[1], 1, 1) and w3.dim() == 4
            and tuple(w3.shape[2:]) == (1, 1) and all(w.dim() == 4 and tuple(w.shape[2:]) == (3, 3) for w in weights)):
        return None
    N, _, H, W = x.shape
    H2, W2 = conv_output_size((H, W), (3, 3), (stride,) * 2, (dilation,) * 2, (dilation,) * 2)
    if N * H * W <= 1 or N * H2 * W2 <= 1:  # the per-op path raises nn.BatchNorm2d's error
        return None
    args = Res2NetBottleneckArgs(x, w1, bns_all[0], tuple(weights), bns_all[1:-1], w3, bns_all[-1], scale, stride,
                                 dilation, groups, order, block_type, training)
    first = prepare_conv_bn_relu(x, w1, bns_all[0], None, 1, 0, 1, 1, training[0], True, None)
    backend = dispatch.select_block(args.op, args, "conv_bn_relu", first)
    if backend is None:
        return None
    res = residual()
    check_residual(OP, x, res, (N, w3.shape[0], H2, W2))
    if res.dtype != x.dtype:
        raise ValueError(f"{OP}: the residual has dtype {res.dtype}, the input {x.dtype}")
    return backend.run(args.op, args._replace(residual=res))


class PreActBlockArgs(NamedTuple):
    x: Tensor
    weights: tuple[Tensor, ...]  # each unit's conv
    bns: tuple[BatchNormParams, ...]  # each unit's BatchNorm (+ ReLU)
    geometry: tuple[int, ...]  # per conv: stride (2), padding (2), dilation (2), groups
    w_ds: Optional[Tensor]  # a 1x1 projection of the normalised input (timm's DownsampleConv), or None
    ds_stride: tuple[int, int]
    training: tuple[bool, ...]
    residual: Optional[Tensor] = None  # set once the op runs (without w_ds)

    op = "preact_block_train"
    keeps_input_precision = False

    def batch_norms(self) -> tuple[BatchNormParams, ...]:
        return self.bns

    def grad_tensors(self) -> list[Tensor]:
        ts = [self.x, *self.weights, self.w_ds, self.residual] + [t for bn in self.bns for t in (bn.weight, bn.bias)]
        return [t for t in ts if t is not None]


def preact_block_train(x: Tensor, bns: Sequence, weights: Sequence[Tensor], geometry: Sequence[tuple],
                       w_ds: Optional[Tensor], ds_stride, residual: Callable[[], Tensor],
                       training: Optional[Sequence[bool]] = None) -> Optional[Tensor]:
    """``conv_n(relu(bn_n(... conv_1(relu(bn_1(x))) ...))) + shortcut`` for a pre-activation block's units (``bns[i]``,
    ``weights[i]`` with ``geometry[i]`` = (stride, padding, dilation, groups), pairs for the first three) through the
    backend's whole-block op, every BatchNorm with batch statistics and its running buffers updated exactly as
    nn.BatchNorm2d's. The shortcut is ``conv2d(relu(bn_1(x)), w_ds, stride=ds_stride)`` when ``w_ds`` (a 1x1
    weight) is given, else ``residual()``. None, without touching anything, when the op does not apply (see the
    module's docstring); ``residual`` is called only when it does."""
    bns = tuple(as_bn_params(b) for b in bns)
    training = tuple(training) if training is not None else (True,) * len(bns)
    if not weights or len(bns) != len(weights) or not _common_applies(x, bns, training):
        return None
    # shapes that fit, each BatchNorm with more than one value per channel; anything else: the per-op path's errors
    N, C, H, W = x.shape
    for bn, w, (stride, padding, dilation, groups) in zip(bns, weights, geometry):
        if bn.num_features != C or w.dim() != 4 or w.shape[1] * groups != C or N * H * W <= 1:
            return None
        C, (H, W) = w.shape[0], conv_output_size((H, W), tuple(w.shape[2:]), stride, padding, dilation)
        if H < 1 or W < 1:
            return None
    if w_ds is not None:
        if (w_ds.dim() != 4 or tuple(w_ds.shape) != (C, x.shape[1], 1, 1)
                or conv_output_size(tuple(x.shape[2:]), (1, 1), tuple(ds_stride), (0, 0), (1, 1)) != (H, W)):
            return None
    flat = tuple(v for s, p, d, g in geometry for v in (*s, *p, *d, g))
    args = PreActBlockArgs(x, tuple(weights), bns, flat, w_ds, tuple(ds_stride), training)
    s, p, d, g = geometry[0]
    first = prepare_bn_relu_conv(x, bns[0], weights[0], None, s, p, d, g, training[0], None)
    backend = dispatch.select_block(args.op, args, "bn_relu_conv", first)
    if backend is None:
        return None
    res = None
    if w_ds is None:
        res = residual()
        check_residual(PREACT_OP, x, res, (N, C, H, W))
        if res.dtype != x.dtype:
            raise ValueError(f"{PREACT_OP}: the residual has dtype {res.dtype}, the input {x.dtype}")
    return backend.run(args.op, args._replace(residual=res))
