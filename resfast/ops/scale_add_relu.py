"""scale_add_relu: the end of a squeeze-and-excitation block, ``relu(x * gate[n, c] + residual)`` in one pass."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import dispatch
from ._args import prepare_scale_add_relu


def scale_add_relu(x: Tensor, gate: Tensor, residual: Optional[Tensor] = None, *, relu: bool = True) -> Tensor:
    """``relu(x * gate[n, c] + residual)``: an SE module's excitation (``x * gate``) and the block's residual add and
    ReLU, which the originals run as three passes over the activation.

    Args:
        x: (N, C, H, W), NCHW or channels_last (the conv3 + bn3 output of an SE bottleneck).
        gate: (N, C) or (N, C, 1, 1), the SE module's sigmoid output.
        residual: (N, C, H, W) or None.
        relu: apply the ReLU.
    Returns:
        (N, C, H, W); channels_last when ``x`` is (the Triton kernel always writes channels_last).
    """
    return dispatch.run("scale_add_relu", prepare_scale_add_relu(x, gate, residual, relu))
