"""Parameter count, weight size and MACs of a model: the question of the "Res2Net in YOLOv5" Q&A (Res2Net vs
ResNet weight size; docs/sources.md)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class ModelSummary(NamedTuple):
    name: str
    params: int
    params_mb: float  # parameters only, at their dtype (float32: 4 bytes each), in MiB
    state_dict_mb: float  # parameters + buffers, what a checkpoint holds, in MiB
    gmacs: float  # multiply-accumulates of convs and linears for one image at `input_size`
    input_size: tuple[int, int, int]


def summarize(model: nn.Module, input_size=(3, 224, 224), name: str = "") -> ModelSummary:
    """Count parameters and bytes, and the MACs of one forward pass of a single image (eval mode).

    MACs come from torch.utils.flop_counter (convolutions and matrix products; 1 MAC = 2 FLOPs), run on the
    meta device with resfast's eager backend, so nothing is computed and any size is cheap.
    """
    from .ops.dispatch import backend

    params = sum(p.numel() for p in model.parameters())
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    sd_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    meta = _to_meta(model)
    meta.eval()
    x = torch.empty((1,) + tuple(input_size), device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), backend("eager"), counter:
        meta(x)
    return ModelSummary(name, params, params_mb, sd_mb, counter.get_total_flops() / 2 / 1e9, tuple(input_size))


def _to_meta(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    return m.to_empty(device="meta") if hasattr(m, "to_empty") else m.to("meta")


def format_summaries(rows) -> str:
    head = f"{'model':<22} {'params':>12} {'params MB':>10} {'state MB':>9} {'GMACs':>7}  input"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<22} {r.params:>12,} {r.params_mb:>10.2f} {r.state_dict_mb:>9.2f} {r.gmacs:>7.3f}  "
            + "x".join(map(str, r.input_size))
        )
    return "\n".join(lines)
