import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter (CI). Triton reads TRITON_INTERPRET
# when a kernel is decorated, and torch's compile stack may import triton early: set it before any test runs.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # `import fixtures.seed001` etc.

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_and_backend():
    import resfast

    torch.manual_seed(0)
    previous = resfast.get_backend()
    yield
    resfast.set_backend(previous)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off on a GPU, so float32 results of the fused kernels and of cuDNN's reference are both exact enough for
    the 1e-4 float32 comparisons (the fp16/bf16 checks use the 2x rule)."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev
