"""resfast::bn_act, the C++/CUDA op: CPU kernel vs reference, opcheck, gradcheck, registration, bad inputs."""

import pytest
import torch

from resfast import _ext, ops

needs_C = pytest.mark.skipif(_ext.C is None, reason=f"resfast._C not loaded: {_ext.C_ERROR}")


def _inputs(shape=(2, 5, 3, 7), dtype=torch.float64, channels_last=False, residual=True, grad=False):
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    s, b = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    r = torch.randn_like(x) if residual else None
    ts = [x, s, b] + ([r] if residual else [])
    if grad:
        for t in ts:
            t.requires_grad_(True)
    return x, s, b, r


@needs_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 63, 1, 1), (3, 65, 4, 2), (0, 8, 2, 2)], ids=str)
def test_cpu_kernel_matches_reference(dtype, channels_last, residual, relu, shape):
    x, s, b, r = _inputs(shape, dtype, channels_last, residual)
    out = torch.ops.resfast.bn_act(x, s, b, r, relu)
    ref = ops.bn_act_ref(x.double(), s.double(), b.double(), None if r is None else r.double(), relu)
    tol = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float32: dict(rtol=1.3e-6, atol=1e-5),
           torch.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    if x.numel():  # an empty tensor is contiguous in every format
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@needs_C
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
def test_opcheck(channels_last, residual, relu):
    x, s, b, r = _inputs(channels_last=channels_last, residual=residual, grad=True)
    torch.library.opcheck(torch.ops.resfast.bn_act.default, (x, s, b, r, relu))


@pytest.mark.parametrize("residual", [True, False])
def test_gradcheck(residual):
    x, s, b, r = _inputs(residual=residual, grad=True)
    # keep values away from the ReLU kink, where finite differences are meaningless
    with torch.no_grad():
        x.add_(torch.sign(x) * 0.1)
    assert torch.autograd.gradcheck(lambda *a: ops.bn_act(*a), (x, s, b, r) if residual else (x, s, b))


@needs_C
def test_cuda_kernel_registered_when_built_with_cuda():
    info = _ext.build_info()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("resfast::bn_act", "CUDA")
    assert has_cuda_kernel == bool(info["with_cuda"]), info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resfast::bn_act", "CPU")


@needs_C
def test_cpp_checks_name_the_argument():
    x, s, b, r = _inputs()
    with pytest.raises(RuntimeError, match="resfast::bn_act: scale must have shape"):
        torch.ops.resfast.bn_act(x, s[:3], b, r, True)
    with pytest.raises(RuntimeError, match="resfast::bn_act: x must be 4-D"):
        torch.ops.resfast.bn_act(x[0], s, b, None, True)
    with pytest.raises(RuntimeError, match="resfast::bn_act: scale and shift must have x's dtype"):
        torch.ops.resfast.bn_act(x, s.float(), b, r, True)
    with pytest.raises(RuntimeError, match="resfast::bn_act: residual must have x's shape"):
        torch.ops.resfast.bn_act(x, s, b, r[:1], True)


def test_python_checks():
    x, s, b, r = _inputs()
    with pytest.raises(ValueError, match="shift must have shape \\(5,\\)"):
        ops.bn_act(x, s, b[:2])
    with pytest.raises(ValueError, match="4-D input"):
        ops.bn_act(x[0], s, b)


@needs_C
def test_compile_fullgraph():
    x, s, b, r = _inputs(dtype=torch.float32)
    f = torch.compile(lambda *a: ops.bn_act(*a), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x, s, b, r), ops.bn_act_ref(x, s, b, r))
