"""Loading a state_dict from a local path or a dict (never from the network)."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

Weights = Optional[Union[str, os.PathLike, Mapping[str, torch.Tensor]]]


def load_weights(model: nn.Module, weights: Weights) -> nn.Module:
    """Load `weights` (a state_dict, or a path to a file holding one, or a checkpoint with a 'state_dict' or
    'model' entry) into `model` with strict=True. None leaves the model as initialised."""
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no weights file at {os.fspath(weights)!r} (resfast never downloads weights)")
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a state_dict, a path to one, or None; got {type(weights).__name__}")
    for key in ("state_dict", "model"):
        if key in weights and isinstance(weights[key], Mapping):
            weights = weights[key]
            break
    model.load_state_dict(weights, strict=True)
    return model
