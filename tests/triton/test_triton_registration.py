"""The Triton ops as dispatcher ops (torch.library.triton_op): opcheck, fake strides equal to the real kernel's,
bad-input errors, and torch.compile(fullgraph=True) through the Triton backend matching eager."""

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET, needs_triton_runtime, randomize_bn
from torch import nn

import resfast
from resfast import ops

pytest.importorskip("triton")
pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
DTYPES = [torch.float32, torch.float64] if TRITON_INTERPRET else [torch.float32]


def _t(*shape, dtype, cl=False):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _fold(c, dtype):
    return torch.rand(c, dtype=dtype, device=DEVICE) + 0.5, torch.randn(c, dtype=dtype, device=DEVICE)


def _w(*shape, dtype):
    """A conv weight (C_out, C_in/g, kH, kW) packed as the ops take it: (kH, kW, C_in/g, C_out)."""
    return _t(*shape, dtype=dtype).permute(2, 3, 1, 0).contiguous()


def _samples(dtype):
    """(op, args) pairs: small shapes over the kernel's paths (dense, multi-group, depthwise, residual, NCHW input,
    stride, both chain orders and block types)."""
    tops = torch.ops.resfast_triton
    s8 = _fold(8, dtype)
    no_sc = (None, None, [1, 1])
    yield tops.conv_bn_relu, (_t(2, 8, 5, 4, dtype=dtype, cl=True), _w(8, 8, 3, 3, dtype=dtype), s8[1],
                              [1, 1], [1, 1], [1, 1], 1, True, None, *no_sc)
    yield tops.conv_bn_relu, (_t(1, 8, 5, 3, dtype=dtype), _w(8, 2, 3, 3, dtype=dtype), s8[1], [2, 2], [1, 1],
                              [1, 1], 4, False, _t(1, 8, 3, 2, dtype=dtype, cl=True), *no_sc)
    yield tops.conv_bn_relu, (_t(2, 8, 4, 4, dtype=dtype, cl=True), _w(8, 1, 3, 3, dtype=dtype), s8[1], [1, 1],
                              [2, 2], [2, 2], 8, True, None, *no_sc)
    # a projection shortcut (1x1, stride 2, from a 6-channel 9x7 input) in the same kernel
    yield tops.conv_bn_relu, (_t(2, 4, 5, 4, dtype=dtype, cl=True), _w(8, 4, 1, 1, dtype=dtype), s8[1], [1, 1],
                              [0, 0], [1, 1], 1, True, None, _t(2, 6, 9, 7, dtype=dtype, cl=True),
                              _w(8, 6, 1, 1, dtype=dtype), [2, 2])
    yield tops.bn_relu_conv, (_t(2, 8, 5, 4, dtype=dtype, cl=True), *s8, _w(6, 8, 1, 1, dtype=dtype),
                              torch.randn(6, dtype=dtype, device=DEVICE), [1, 1], [0, 0], [1, 1], 1, None)
    x = _t(2, 12, 5, 4, dtype=dtype, cl=True)
    shifts = [_fold(3, dtype)[1] for _ in range(3)]
    ws = [_w(3, 3, 3, 3, dtype=dtype) for _ in range(3)]
    yield tops.res2net_chain, (x, ws, shifts, 4, 1, 1, 1, "timm", "normal")
    ws_dw = [_w(3, 1, 3, 3, dtype=dtype) for _ in range(3)]
    yield tops.res2net_chain, (x, ws_dw, shifts, 4, 2, 1, 3, "paper", "stage")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    # all of opcheck's tests run: schema, autograd registration (inputs without grad: these ops are inference-only
    # and the dispatch layer refuses grad-requiring inputs), fake tensors, and AOT dispatch with dynamic shapes.
    import resfast.backends.triton.library  # noqa: F401  (registers torch.ops.resfast_triton)

    for op, args in _samples(dtype):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_strides_equal_real(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    import resfast.backends.triton.library  # noqa: F401

    for op, args in _samples(dtype):
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
            fake = op(*fake_args)
        assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype
        assert real.is_contiguous(memory_format=torch.channels_last)


def test_direct_calls_check_their_inputs():
    import resfast.backends.triton.library  # noqa: F401

    tops = torch.ops.resfast_triton
    x, w = _t(1, 8, 4, 4, dtype=torch.float32), _w(8, 4, 3, 3, dtype=torch.float32)
    b = _fold(8, torch.float32)[1]
    no_sc = (None, None, [1, 1])
    with pytest.raises(ValueError, match="does not fit an input with 8 channels"):
        tops.conv_bn_relu(x, w, b, [1, 1], [1, 1], [1, 1], 1, True, None, *no_sc)
    with pytest.raises(ValueError, match=r"shift must have shape \(8,\)"):
        tops.conv_bn_relu(x, w, b[:4], [1, 1], [1, 1], [1, 1], 2, True, None, *no_sc)
    with pytest.raises(ValueError, match="not with residual"):
        tops.conv_bn_relu(x, w, b, [1, 1], [1, 1], [1, 1], 2, True, x, x, _w(8, 8, 1, 1, dtype=torch.float32),
                          [1, 1])
    with pytest.raises(ValueError, match=r"packed as \(1, 1, 8, 8\)"):
        tops.conv_bn_relu(x, w, b, [1, 1], [1, 1], [1, 1], 2, True, None, x, _w(8, 8, 3, 3, dtype=torch.float32),
                          [1, 1])
    with pytest.raises(ValueError, match="output pixels"):
        tops.conv_bn_relu(x, w, b, [1, 1], [1, 1], [1, 1], 2, True, None, x, _w(8, 8, 1, 1, dtype=torch.float32),
                          [2, 2])
    with pytest.raises(ValueError, match="needs 3 weights"):
        tops.res2net_chain(x, [w], [b], 4, 1, 1, 1, "timm", "normal")
    with pytest.raises(ValueError, match="stride 1 for 'normal'"):
        tops.res2net_chain(x, [], [], 1, 2, 1, 1, "paper", "normal")


@pytest.mark.slow
def test_compile_fullgraph_through_the_triton_backend():
    """A small Res2NeXt-ish block (pre-activation conv, grouped chain, conv + residual) compiled with
    fullgraph=True and aot_eager through the Triton backend: the graph calls the resfast_triton ops and matches
    eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    pre_bn, bn1, bn3 = nn.BatchNorm2d(16), nn.BatchNorm2d(24), nn.BatchNorm2d(16)
    chain_bns = [nn.BatchNorm2d(6) for _ in range(3)]
    mods = nn.ModuleList([pre_bn, bn1, bn3, *chain_bns]).eval()
    randomize_bn(mods)
    mods.to(DEVICE)
    w1, w2 = _t(24, 16, 1, 1, dtype=torch.float32) * 0.3, _t(24, 24, 1, 1, dtype=torch.float32) * 0.3
    w3 = _t(16, 24, 1, 1, dtype=torch.float32) * 0.3
    ws = [_t(6, 3, 3, 3, dtype=torch.float32) * 0.3 for _ in range(3)]

    def block(x):
        y = ops.bn_relu_conv(x, pre_bn, w1)
        y = ops.conv_bn_relu(y, w2, bn1)
        y = ops.res2net_chain(y, ws, chain_bns, scale=4, groups=2, block_type="stage", stride=2)
        return ops.conv_bn_relu(y, w3, bn3, residual=x[:, :, ::2, ::2])

    x = _t(2, 16, 7, 6, dtype=torch.float32, cl=True)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with resfast.backend("triton"), torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True, backend=counter)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    with resfast.backend("eager"), torch.no_grad():
        torch.testing.assert_close(eager, block(x), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    for name in ("resfast_triton.bn_relu_conv", "resfast_triton.conv_bn_relu", "resfast_triton.res2net_chain"):
        assert name in code, code


NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # as if triton were not installed
import torch
from torch import nn
import resfast
try:
    with resfast.backend("triton"), torch.no_grad():
        resfast.ops.conv_bn_relu(torch.randn(2, 4, 3, 3), torch.randn(4, 4, 1, 1), nn.BatchNorm2d(4).eval())
except resfast.BackendUnavailableError as e:
    assert "triton is not installed" in str(e), str(e)
    print("ok")
"""


@pytest.mark.slow
def test_explicit_triton_backend_without_triton_explains_itself():
    """The backend's input checks (resfast.backends.triton.backend) do not import triton: without it, an explicit
    request is a BackendUnavailableError listing the reasons, not an ImportError."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
