"""Input validation shared by the ops: every bad input becomes a Python exception that names the problem.

Checks read only tensor metadata, so they cost nothing on the hot path and trace under torch.compile.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .batchnorm import BatchNormParams


def pair(v, name: str, op: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")


def check_input(op: str, x: Tensor, name: str = "input") -> None:
    if isinstance(x, torch.fx.Proxy):
        raise torch.fx.proxy.TraceError(
            f"{op} cannot be traced by torch.fx.symbolic_trace: resfast's ops check shapes and choose a backend "
            "from real tensor metadata, which a symbolic Proxy does not have. Capture a graph with torch.compile "
            "or torch.export instead (both trace with real shapes)."
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{op}: expected a 4-D {name} (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if not (x.is_floating_point()):
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def _autocast_on(x: Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def check_same(op: str, x: Tensor, t: Optional[Tensor], name: str, *, dtype: bool = True) -> None:
    """`t` on x's device and (outside autocast) of x's dtype."""
    if t is None:
        return
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}; move both to one device")
    if dtype and t.dtype != x.dtype and not _autocast_on(x):
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype} but the input has dtype {x.dtype}; "
            "convert one of them (or run under torch.autocast)"
        )


def check_conv_weight(op: str, x_channels: int, weight: Tensor, groups: int, name: str = "weight") -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{op}: {name} must be a 4-D conv weight (C_out, C_in/groups, kH, kW), got {shape}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    if x_channels % groups != 0:
        raise ValueError(f"{op}: groups={groups} does not divide the {x_channels} input channels")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"{op}: groups={groups} does not divide the {weight.shape[0]} output channels of {name}")
    if weight.shape[1] * groups != x_channels:
        raise ValueError(
            f"{op}: {name} expects {weight.shape[1] * groups} input channels "
            f"({weight.shape[1]} per group x {groups} groups) but the input has {x_channels} channels"
        )


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_bn(op: str, x: Tensor, bn: BatchNormParams, channels: int, name: str = "bn") -> None:
    for field in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, field)
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{op}: {name}.{field} has shape {tuple(t.shape)} but {channels} channels are normalised")
        check_same(op, x, t, f"{name}.{field}", dtype=False)
        # BatchNorm takes its input's dtype, or float32 statistics for a half/bfloat16 input (as PyTorch does)
        mixed_ok = t.dtype == torch.float32 and x.dtype in _LOW_PRECISION
        if t.dtype != x.dtype and not mixed_ok and not _autocast_on(x):
            raise TypeError(
                f"{op}: {name}.{field} has dtype {t.dtype} but the input has dtype {x.dtype}; convert one of them"
            )
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{op}: {name} needs both running_mean and running_var, or neither")
    if bn.frozen and (bn.weight is None or bn.bias is None or bn.running_mean is None):
        raise ValueError(f"{op}: a frozen {name} needs weight, bias, running_mean and running_var")


def check_batch_stats(op: str, shape: Sequence[int], uses_batch_stats: bool, where: str) -> None:
    """nn.BatchNorm2d refuses to compute batch statistics over a single value per channel."""
    if not uses_batch_stats:
        return
    n = shape[0] * shape[2] * shape[3]
    if n == 1:  # exactly nn.BatchNorm2d's rule (an empty batch is left to F.batch_norm, as the module does)
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training ({where} has shape {tuple(shape)}); "
            "use a larger batch or spatial size, or eval mode"
        )


def conv_output_size(hw, k, stride, padding, dilation) -> tuple[int, int]:
    """A convolution's output (height, width) for input ``hw``, kernel ``k`` and pairs of stride, padding and
    dilation (nn.Conv2d's formula; <= 0 when the input is too small)."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in (0, 1))


def conv_out_hw(op: str, h: int, w: int, k: tuple[int, int], stride, padding, dilation) -> tuple[int, int]:
    """conv_output_size, raising a clear error naming ``op`` when the input is too small."""
    oh, ow = conv_output_size((h, w), k, stride, padding, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"{op}: input of spatial size {h}x{w} is too small for a {k[0]}x{k[1]} kernel with "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    return oh, ow


def check_residual(op: str, x: Tensor, residual: Optional[Tensor], out_shape: Sequence[int]) -> None:
    if residual is None:
        return
    check_input(op, residual, "residual")
    if tuple(residual.shape) != tuple(out_shape):
        raise ValueError(
            f"{op}: residual has shape {tuple(residual.shape)} but the output has shape {tuple(out_shape)}"
        )
    check_same(op, x, residual, "residual")


def needs_batch_stats(bn: BatchNormParams, training: bool) -> bool:
    return not bn.frozen and (training or bn.running_mean is None)


def local_batch_stats(bn: BatchNormParams, training: bool) -> bool:
    """Batch statistics from this process's batch alone: nn.BatchNorm2d's one-value-per-channel rule applies here.
    A synchronised BatchNorm in training checks the count of the group's batch when it runs."""
    return needs_batch_stats(bn, training) and not (training and bn.process_group is not None)


SYNCED_BN_REASON = "synchronized BatchNorm (process_group) in training runs on the eager backend only"


def synced_bn_reasons(args) -> list[str]:
    """Why a backend without synchronised BatchNorm (every one but eager) cannot run these prepared arguments."""
    if not getattr(args, "training", False):
        return []
    return [SYNCED_BN_REASON] if any(bn.process_group is not None for bn in args.batch_norms()) else []


def check_flag(op: str, value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")


def check_int(op: str, value, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
