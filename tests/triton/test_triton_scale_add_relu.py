"""The Triton scale_add_relu (``relu(x * gate[n, c] + residual)``, an SE bottleneck's end) against its reference
under TRITON_INTERPRET=1 (float32/float64, odd shapes, layouts, sliced inputs), opcheck, and a whole SE block."""

import functools

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


def _x(shape, dtype, layout):
    if layout == "sliced":  # a channel slice of a wider channels_last tensor
        N, C, H, W = shape
        return torch.randn(N, C + 5, H, W, dtype=dtype, device=DEVICE).contiguous(
            memory_format=torch.channels_last)[:, 2:2 + C]
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if layout == "cl" else x


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (1, 1, 1, 1), (3, 65, 2, 9), (0, 4, 3, 3), (2, 130, 4, 4)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (True, False)])
def test_matches_reference(shape, layout, dtype, residual, relu):
    x = _x(shape, dtype, layout)
    gate = torch.rand(shape[:2], dtype=dtype, device=DEVICE)
    r = _x(shape, dtype, "cl" if layout == "nchw" else "nchw") if residual else None
    ref = ops.scale_add_relu_ref(x, gate, r, relu=relu)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.scale_add_relu(x, gate, r, relu=relu)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_and_direct_call_errors(dtype):
    import resfast.backends.triton.library  # noqa: F401

    tops = torch.ops.resfast_triton
    x = _x((2, 5, 3, 4), dtype, "cl")
    g = torch.rand(2, 5, dtype=dtype, device=DEVICE)
    torch.library.opcheck(tops.scale_add_relu, (x, g, torch.randn_like(x), True))
    torch.library.opcheck(tops.scale_add_relu, (x, g, None, False))
    with pytest.raises(ValueError, match=r"gate \(N, C\)"):
        tops.scale_add_relu(x, g[:1], None, True)
    with pytest.raises(ValueError, match="residual must have"):
        tops.scale_add_relu(x, g, x[:1], True)


@pytest.mark.slow
@pytest.mark.parametrize("relu,has_res,cl", [(True, True, True), (True, False, False), (False, True, False)])
def test_gradients_and_gradcheck(relu, has_res, cl):
    """Every gradient as eager (float64, odd sizes, a grad_output expanded from a scalar included) and a float64
    gradcheck of x, gate and residual; grad_output is never written."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, device=DEVICE).contiguous(memory_format=fmt).requires_grad_()
    gate = torch.rand(2, 5, 1, 1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    res = torch.randn(2, 5, 9, 11, dtype=torch.float64, device=DEVICE, requires_grad=True) if has_res else None
    leaves = [t for t in (x, gate, res) if t is not None]
    with resfast.backend("triton"):
        out = ops.scale_add_relu(x, gate, res, relu=relu)
    ref = ops.reference.scale_add_relu_ref(x, gate, res, relu=relu)
    torch.testing.assert_close(out, ref)
    for g in (torch.randn_like(ref), torch.ones((), dtype=ref.dtype, device=DEVICE).expand_as(ref)):
        g_before = g.clone()
        for a, b in zip(torch.autograd.grad(out, leaves, g, retain_graph=True),
                        torch.autograd.grad(ref, leaves, g, retain_graph=True)):
            torch.testing.assert_close(a, b)
        assert torch.equal(g, g_before)

    def fn(*ts):
        with resfast.backend("triton"):
            return ops.scale_add_relu(ts[0], ts[1], ts[2] if has_res else None, relu=relu)

    small = [t.detach()[:, :3, :3, :2].clone().requires_grad_() if t.dim() == 4 and t.shape[-1] > 1
             else t.detach()[:, :3].clone().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(fn, small)


def test_se_block_end_is_one_launch(monkeypatch):
    """timm's Bottle2neck with an SE attn_layer and a downsample, eval: conv1, 3 chain launches, conv3 + bn3, the
    downsample, then one scale_add_relu launch for the excitation, residual add and ReLU; matches timm's block."""
    from timm.layers.squeeze_excite import SEModule
    from timm.models import res2net as timm_res2net

    from resfast.backends.triton.kernels import conv, scale_add_relu

    dtype = torch.float64 if TRITON_INTERPRET else torch.float32
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    blk = randomize_bn(timm_res2net.Bottle2neck(16, 8, stride=2, downsample=ds, norm_layer=nn.BatchNorm2d,
                                                attn_layer=functools.partial(SEModule, rd_channels=8)))
    blk = blk.to(DEVICE, dtype).eval()
    fused = resfast.convert(blk)
    x = torch.randn(2, 16, 9, 7, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    launches = []
    real_conv, real_sar = conv._launch, scale_add_relu._launch
    monkeypatch.setattr(conv, "_launch", lambda *a, **k: (launches.append("conv"), real_conv(*a, **k)))
    monkeypatch.setattr(scale_add_relu, "_launch", lambda *a, **k: (launches.append("sar"), real_sar(*a, **k)))
    with resfast.backend("triton"), torch.no_grad():
        out, ref = fused(x), blk(x)
    # conv1, 3 chain launches, the downsample and conv3 + bn3 (the gate multiplies conv3's output only, so the
    # downsample cannot share its kernel), then the SE's end
    assert launches == ["conv"] * 6 + ["sar"]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)
