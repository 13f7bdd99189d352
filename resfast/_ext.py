"""Loads the C++/CUDA extension `resfast._C`. A missing, broken or mismatched build never breaks
`import resfast`: it produces one warning and the eager (and Triton) backends keep working."""

from __future__ import annotations

import importlib.util
import json
import warnings

import torch

C = None
C_ERROR = None
_BUILD_INFO: dict = {}

try:
    if importlib.util.find_spec(__package__ + "._C") is None:
        raise ImportError("resfast._C is not built")
    from . import _C as C  # noqa: N811  (registers the resfast:: ops with the dispatcher)

    _BUILD_INFO = json.loads(C.build_info())
    built = _BUILD_INFO.get("torch_version", "")
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        C_ERROR = f"resfast._C was built against torch {built} but torch {torch.__version__} is running; rebuild it"
        C = None
except Exception as e:  # ImportError, OSError (undefined symbols), anything a broken build throws
    C = None
    C_ERROR = f"{type(e).__name__}: {e}"

if C_ERROR is not None:
    warnings.warn(
        f"resfast: the C++/CUDA extension is unavailable ({C_ERROR}). The eager backend still works; "
        "build the extension with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """The build configuration recorded in resfast._C when it was compiled ({} when it is not loaded)."""
    return dict(_BUILD_INFO) if C is not None else {}
