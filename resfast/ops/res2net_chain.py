"""res2net_chain: Res2Net's hierarchical split -> 3x3 conv -> BN -> ReLU -> add-into-next-split chain."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from . import dispatch
from ._args import prepare_res2net_chain
from .fold import FoldCache


def res2net_chain(
    x: Tensor,
    weights: Sequence[Tensor],
    bns: Sequence,
    *,
    scale: int,
    biases: Optional[Sequence[Optional[Tensor]]] = None,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    order: str = "timm",
    block_type: str = "normal",
    training: bool = False,
    fold_cache: Optional[FoldCache] = None,
) -> Tensor:
    """The middle of a Res2Net bottleneck, over the `scale` equal channel splits of ``x``.

    With ``width = C / scale`` and splits ``x_0 .. x_{scale-1}``:

    * ``order="timm"`` (official Res2Net, timm): ``y_0 = f_0(x_0)``, ``y_i = f_i(y_{i-1} + x_i)`` for
      ``0 < i < scale - 1``, and the last split passes through. With ``scale == 1`` there is one conv over
      the whole input (timm's ``num_scales = max(1, scale - 1)``).
    * ``order="paper"`` (the paper's equations, resfast.Res2NetBottleneck): split 0 passes through, ``y_1 = f_1(x_1)``,
      ``y_i = f_i(x_i + y_{i-1})``.
    * ``block_type="normal"`` adds as above (stride must be 1); ``block_type="stage"`` (timm's first block of a
      stage) feeds every conv its own split, the convs carry the stride, and the pass-through split goes through
      ``AvgPool2d(3, stride, padding=1)`` (count_include_pad=True, as timm), stride 1 included.

    where ``f_i = relu(bn_i(conv3x3_i(.)))`` with padding = dilation, ``groups`` (Res2NeXt cardinality).

    Args:
        x: (N, C, H, W), contiguous NCHW or channels_last, C divisible by ``scale``.
        weights: one (width, width / groups, 3, 3) weight per conv, in chain order
            (``scale - 1`` of them; 1 for timm with scale 1); ``biases`` likewise, or None.
        bns: one BatchNorm (BatchNormParams, nn.BatchNorm2d or FrozenBatchNorm2d) per conv.
        training: BatchNorm in training mode (batch statistics, running buffers updated) or eval mode.

        fold_cache: a :class:`resfast.ops.fold.FoldCache` the caller keeps (a block passes its own) so the
            backends that fold eval BatchNorm into the weights do it once, not per call.
    Returns:
        (N, C, H_out, W_out): the outputs of all splits concatenated in split order, in the layout PyTorch
        picks, as the originals do (channels_last when ``x`` is channels_last).
    """
    args = prepare_res2net_chain(x, weights, bns, scale, biases, stride, dilation, groups, order, block_type, training,
                                 fold_cache)
    return dispatch.run("res2net_chain", args)
