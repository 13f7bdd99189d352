"""Small facts every Triton module asks: is the interpreter on, is this call tracing with FakeTensors."""

from __future__ import annotations

import os

from torch import Tensor


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_fake(t: Tensor) -> bool:
    """A FakeTensor call is the op's fake implementation (triton_op runs the Python body): outputs are allocated
    with their real strides and nothing is launched (the interpreter cannot read fake data; on a GPU the
    wrap_triton HOP would do nothing either)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
