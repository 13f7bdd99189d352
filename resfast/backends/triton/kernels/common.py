"""Small facts every Triton module asks: is the interpreter on, is this call tracing with FakeTensors; and the one
rule for launching a kernel (``launcher``)."""

from __future__ import annotations

import os

from torch import Tensor
from torch.library import wrap_triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launcher(kernel):
    """What every launch site indexes with its grid: ``launcher(kernel)[grid](*args, **meta)``.

    On a GPU, ``torch.library.wrap_triton(kernel)``: it makes the launch visible to torch.compile / make_fx when a
    resfast_triton op is decomposed (in eager mode it runs the kernel). Under TRITON_INTERPRET=1, the kernel itself:
    the interpreter's kernels cannot be traced anyway (library.py keeps the ops opaque there), and wrap_triton does not
    take them on every version (triton 3.6 decorates with an ``InterpretedFunction``, which torch 2.11's wrap_triton
    rejects, and it fails on an autotuned one reaching for ``.fn`` of the interpreted function)."""
    if interpreting():
        _interpreter_scalar_index()
        return kernel
    return wrap_triton(kernel)


_SCALAR_INDEX_DONE = False


def _interpreter_scalar_index() -> None:
    """Lets the interpreter of triton < 3.7 use a runtime scalar where Python needs an int (a ``range`` bound: conv's
    projection loop ``range(0, C_d, BLOCK_K)``, wgrad's ``range(start, end, BLOCK_M)``) on numpy >= 2.5.

    That interpreter holds every scalar (a kernel argument, ``tl.program_id``, their arithmetic) as a 1-element
    numpy array of shape (1,) and converts it with ``int(array)``, which numpy 2.5 no longer allows for arrays with
    ndim > 0 ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.7 converts
    ``int(array.squeeze())``. Here the interpreter's tensor patch is extended to convert the same way (the kernels
    and the compiled GPU path are unchanged); nothing is done where numpy still converts 1-element arrays, or where
    the interpreter has no such patch."""
    global _SCALAR_INDEX_DONE
    if _SCALAR_INDEX_DONE:
        return
    _SCALAR_INDEX_DONE = True
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # numpy < 2.5: the interpreter's own conversion works
    except TypeError:
        pass
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _is_fake(t: Tensor) -> bool:
    """A FakeTensor call is the op's fake implementation (triton_op runs the Python body): outputs are allocated
    with their real strides and nothing is launched (the interpreter cannot read fake data; on a GPU the
    wrap_triton HOP would do nothing either)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
