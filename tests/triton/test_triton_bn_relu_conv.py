"""The Triton bn_relu_conv (eval BatchNorm + ReLU applied to the input tile as it is loaded) against the eager
reference: padding stays zero after the activation, grouped/strided/dilated, bias, residual, both layouts."""

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET, conv_inputs, needs_triton_runtime, randomize_bn
from torch import nn

import resfast
from resfast import ops

pytest.importorskip("triton")
pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
INTERPRET = TRITON_INTERPRET


# (C_in, C_out, k, stride, padding, dilation, groups)
CONVS = [(8, 8, 3, 1, 1, 1, 1), (64, 256, 1, 1, 0, 1, 1), (26, 26, 3, 2, 1, 1, 1), (16, 16, 3, 1, 2, 2, 4),
         (5, 7, 1, 2, 0, 1, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 1, 1), (3, 9, 11)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual,bias", [(False, False), (True, True)])
def test_matches_reference(conv, shape, channels_last, residual, bias):
    dtype = torch.float64 if INTERPRET else torch.float32
    cin, cout, k, s, p, d, g = conv
    N, H, W = shape
    x, w, b = conv_inputs(conv, shape, dtype, channels_last, bias, DEVICE)
    bn = nn.BatchNorm2d(cin, dtype=dtype).eval()
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)  # negative shifts: zero padding must not become relu(shift) > 0
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    bn = bn.to(DEVICE)
    y = ops.bn_relu_conv_ref(x, bn, w, bias=b, stride=s, padding=p, dilation=d, groups=g)
    res = torch.randn_like(y) if residual else None
    ref = ops.bn_relu_conv_ref(x, bn, w, bias=b, stride=s, padding=p, dilation=d, groups=g, residual=res)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.bn_relu_conv(x, bn, w, bias=b, stride=s, padding=p, dilation=d, groups=g, residual=res)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)


def test_preact_bottleneck_through_triton():
    """Seed 004's BottleneckV2 as resfast.PreActBottleneck, every unit on the Triton backend (eval)."""
    blk = resfast.PreActBottleneck(32, 16, 2, nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64)))
    blk.eval()
    randomize_bn(blk)
    blk = blk.to(DEVICE)
    x = torch.randn(2, 32, 9, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with resfast.backend("eager"):
            ref = blk(x)
        with resfast.backend("triton"):
            out = blk(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
