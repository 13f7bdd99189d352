"""Eval-mode BatchNorm folded into the preceding convolution, and the per-block cache of folded weights.

Folding: ``bn(conv(x, w) + b) = conv(x, w * s) + (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``,
computed in float64 for float64 inputs and float32 otherwise, then cast to the input dtype.

:class:`FoldCache` keeps the folded (and, on CPU, oneDNN-prepacked) weights of one block so an eval forward
does not redo them. An entry is valid while every tensor it was made from is the same storage at the same
version (inference tensors, which have no version, by their storage alone): an optimizer step,
``load_state_dict``, ``copy_``, ``.to()`` or a train-mode forward (which updates the running statistics) all make
the next call rebuild it. Writes that bypass autograd's version counter
(``param.data.copy_(...)``) cannot be seen: call :func:`clear_fold_caches` after those.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .batchnorm import BatchNormParams
from .dtypes import acc_dtype


def fold_scale_shift(bn: BatchNormParams, conv_bias: Optional[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eval BatchNorm (running statistics) as per-channel ``(scale, shift)`` including the conv bias, in float64 for
    float64 inputs and float32 otherwise."""
    stat_dtype = acc_dtype(dtype)
    scale = torch.rsqrt(bn.running_var.to(stat_dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(stat_dtype)
    shift = -bn.running_mean.to(stat_dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(stat_dtype)
    if conv_bias is not None:
        shift = shift + conv_bias.to(stat_dtype) * scale
    return scale, shift


def fold_conv_bn(weight: Tensor, conv_bias: Optional[Tensor], bn: BatchNormParams, dtype: torch.dtype
                 ) -> tuple[Tensor, Tensor]:
    """(weight * scale[c_out], shift) in `dtype`: the conv that computes ``bn(conv2d(x, weight, conv_bias))``."""
    scale, shift = fold_scale_shift(bn, conv_bias, dtype)
    w = weight.to(scale.dtype) * scale.reshape(-1, 1, 1, 1)
    return w.to(dtype), shift.to(dtype)


def _stamp(t: Optional[Tensor]):
    if t is None:
        return None
    # inference tensors (made under torch.inference_mode) have no version counter: their storage identifies them
    version = None if t.is_inference() else t._version
    return (t.data_ptr(), version, t.dtype, t.device, tuple(t.shape))


class FoldCache:
    """Folded weights of one block, keyed by what they were made for, rebuilt when a source tensor changes."""

    def __init__(self) -> None:
        self._entries: dict = {}
        self.builds = 0  # how many entries were (re)computed: what the refresh tests count

    def get(self, key, sources: Sequence[Optional[Tensor]], build: Callable[[], object], extra=()):
        """The cached value for `key` if `sources` (and `extra`) are unchanged since it was built, else ``build()``."""
        stamp = (tuple(_stamp(t) for t in sources), extra)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        with torch.no_grad():
            value = build()
        self._entries[key] = (stamp, value)
        self.builds += 1
        return value

    @staticmethod
    def get_or_build(cache: Optional[FoldCache], key, sources: Sequence[Optional[Tensor]],
                     build: Callable[[], object], extra=()):
        """``cache.get(key, sources, build, extra)``, or without a cache ``build()`` (without autograd) each call."""
        if cache is None:
            with torch.no_grad():
                return build()
        return cache.get(key, sources, build, extra)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # Folded tensors are derived data (and oneDNN-packed ones cannot be pickled): copies start empty.
    def __getstate__(self):
        return {"_entries": {}, "builds": 0}

    def __deepcopy__(self, memo):
        return FoldCache()


_ATTR = "_resfast_fold_cache"


def block_cache(block: nn.Module) -> Optional[FoldCache]:
    """The fold cache a block passes to the ops: None while torch.compile traces (the folding is then part of
    the graph) and emptied by a training-mode forward (the running statistics are about to change)."""
    if torch.compiler.is_compiling():
        return None
    cache = block.__dict__.get(_ATTR)
    if cache is None:
        cache = block.__dict__[_ATTR] = FoldCache()
    if block.training and len(cache):
        cache.clear()
    return cache


def clear_fold_caches(model: nn.Module) -> None:
    """Drop every block's folded weights (after changing parameters through ``.data``, which no version sees)."""
    for m in model.modules():
        cache = m.__dict__.get(_ATTR)
        if cache is not None:
            cache.clear()
