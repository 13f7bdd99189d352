"""resfast's backends: the implementations of the ops of resfast/ops, each behind resfast.ops.dispatch's Backend
interface, registered here at import (`auto` tries them in dispatch.BACKENDS order).

* eager.py: plain PyTorch, the ops' reference implementations (always available)
* cpp.py: resfast._C, the C++ extension: the `cpu` backend (CPU tensors) and the `cuda` backend (CUDA tensors)
* triton/: Triton kernels (kernels/), their torch.ops.resfast_triton ops (library.py, training.py, blocks.py) and
  the backend (backend.py); triton itself is imported only when a kernel runs
"""

from ..ops import dispatch
from .cpp import CpuBackend, CudaBackend
from .eager import EagerBackend
from .triton import TritonBackend

for _b in (CudaBackend(), TritonBackend(), CpuBackend(), EagerBackend()):
    dispatch.register(_b)

__all__ = ["CpuBackend", "CudaBackend", "EagerBackend", "TritonBackend"]
