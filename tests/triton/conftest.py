import pytest
import torch


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off, so fp32 results of the Triton kernels and of cuDNN's reference are both exact enough for 1e-4."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev
