"""The dtypes fused ops compute in: the autocast dtype of the convolutions and the accumulation dtype of statistics,
folded parameters and accumulators. One rule each, used by every backend (a leaf module: imports only torch)."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolutions run in: the autocast dtype where autocast is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)  # autocast leaves float64 alone
    return x.dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics, folded BatchNorm parameters and accumulators use for tensors of `dtype`: float64 for
    float64, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
