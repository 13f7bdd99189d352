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
    import resfast.triton.library  # noqa: F401

    tops = torch.ops.resfast_triton
    x = _x((2, 5, 3, 4), dtype, "cl")
    g = torch.rand(2, 5, dtype=dtype, device=DEVICE)
    torch.library.opcheck(tops.scale_add_relu, (x, g, torch.randn_like(x), True))
    torch.library.opcheck(tops.scale_add_relu, (x, g, None, False))
    with pytest.raises(ValueError, match=r"gate \(N, C\)"):
        tops.scale_add_relu(x, g[:1], None, True)
    with pytest.raises(ValueError, match="residual must have"):
        tops.scale_add_relu(x, g, x[:1], True)


def test_refuses_inputs_that_need_grad():
    x = torch.randn(1, 3, 2, 2, device=DEVICE, requires_grad=True)
    with resfast.backend("triton"), pytest.raises(resfast.BackendUnavailableError, match="require grad"):
        ops.scale_add_relu(x, torch.rand(1, 3, device=DEVICE))


def test_se_block_end_is_one_launch(monkeypatch):
    """timm's Bottle2neck with an SE attn_layer and a downsample, eval: conv1, 3 chain launches, conv3 + bn3, the
    downsample, then one scale_add_relu launch for the excitation, residual add and ReLU; matches timm's block."""
    from timm.layers.squeeze_excite import SEModule
    from timm.models import res2net as timm_res2net

    from resfast.triton import conv, scale_add_relu

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
