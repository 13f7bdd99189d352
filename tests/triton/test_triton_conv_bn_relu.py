"""The Triton conv_bn_relu (implicit GEMM, eval BatchNorm folded, residual + ReLU epilogue) against the eager
reference, under TRITON_INTERPRET=1 on CPU tensors, float32 and float64, over the shapes that break kernels."""

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET, needs_triton_runtime, randomize_bn
from torch import nn

import resfast
from resfast import ops
from resfast.ops import dispatch

pytest.importorskip("triton")
pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
INTERPRET = TRITON_INTERPRET

# (C_in, C_out, k, stride, padding, dilation, groups)
CONVS = [
    (8, 8, 3, 1, 1, 1, 1),
    (26, 26, 3, 1, 1, 1, 1),  # Res2Net 26w split: C not a multiple of 8
    (16, 16, 3, 2, 1, 1, 4),  # grouped (ResNeXt), stride 2
    (6, 6, 3, 1, 2, 2, 6),  # depthwise, dilated
    (5, 7, 1, 1, 0, 1, 1),  # 1x1, odd channels
    (3, 9, 7, 2, 3, 1, 1),  # stem-like 7x7/2
    (32, 40, 1, 2, 0, 1, 1),  # strided 1x1 (downsample)
]
SHAPES = [(2, 7, 5), (1, 1, 1), (1, 3, 2), (3, 9, 11), (0, 4, 4)]


def _bn(C, dtype, frozen=False):
    if frozen:
        tv = pytest.importorskip("torchvision.ops")
        bn = tv.FrozenBatchNorm2d(C).to(dtype)
    else:
        bn = nn.BatchNorm2d(C, dtype=dtype).eval()
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def _run(conv, shape, dtype, channels_last, residual, relu, bias, frozen=False):
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("float64 runs under the interpreter only")
    cin, cout, k, s, p, d, g = conv
    N, H, W = shape
    x = torch.randn(N, cin, H, W, dtype=dtype, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // g, k, k, dtype=dtype, device=DEVICE) * 0.3
    b = torch.randn(cout, dtype=dtype, device=DEVICE) if bias else None
    bn = _bn(cout, dtype, frozen).to(DEVICE)
    ref_y = ops.conv_bn_relu_ref(x, w, bn, bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu)
    res = torch.randn_like(ref_y) if residual else None
    ref = ops.conv_bn_relu_ref(x, w, bn, bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu,
                               residual=res)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu,
                               residual=res)
    return out, ref


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_reference(conv, shape, dtype):
    out, ref = _run(conv, shape, dtype, channels_last=True, residual=False, relu=True, bias=False)
    assert out.shape == ref.shape
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    if out.numel():
        assert out.is_contiguous(memory_format=torch.channels_last) or out.shape[1] == 1


@pytest.mark.parametrize("conv", [CONVS[1], CONVS[2], CONVS[6]], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual,relu,bias", [(True, True, False), (True, False, True), (False, False, True)])
def test_epilogue_and_layouts(conv, channels_last, residual, relu, bias):
    out, ref = _run(conv, (2, 6, 5), torch.float64, channels_last, residual, relu, bias)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_frozen_batchnorm():
    out, ref = _run(CONVS[0], (2, 5, 5), torch.float64, True, True, True, False, frozen=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_matches_torchvision_resnext_block_in_eval():
    """A whole converted ResNeXt block with the Triton conv for every conv_bn_relu (eval, no grad)."""
    tvm = pytest.importorskip("torchvision.models.resnet")
    blk = tvm.Bottleneck(32, 8, groups=4, base_width=16).eval()
    randomize_bn(blk)
    blk = blk.to(DEVICE)
    fused = resfast.convert(blk)
    x = torch.randn(2, 32, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = blk(x)
        with resfast.backend("triton"):
            out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_refuses_what_it_does_not_implement():
    x, w = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(4, 4, 1, 1, device=DEVICE)
    bn = nn.BatchNorm2d(4).to(DEVICE)
    with resfast.backend("triton"), pytest.raises(resfast.BackendUnavailableError, match="batch statistics"):
        ops.conv_bn_relu(x, w, bn, training=True)
    with resfast.backend("triton"), pytest.raises(resfast.BackendUnavailableError, match="require grad"):
        ops.conv_bn_relu(x, w.requires_grad_(), bn.eval())
    with resfast.backend("triton"), pytest.raises(resfast.BackendUnavailableError, match="batch statistics"):
        ops.bn_relu_conv(x, bn.train(), w.detach(), training=True)


def test_auto_does_not_pick_unverified_triton():
    """Until the kernels are verified on a GPU, `auto` keeps to eager even where Triton could run."""
    assert not dispatch.get("triton").verified_on_gpu
    from resfast.ops._args import prepare_conv_bn_relu

    a = prepare_conv_bn_relu(torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(4, 4, 1, 1, device=DEVICE),
                             nn.BatchNorm2d(4).eval().to(DEVICE), None, 1, 0, 1, 1, False, True, None)
    with resfast.backend("auto"), torch.no_grad():
        assert dispatch.select("conv_bn_relu", a).name == "eager"
    with resfast.backend("triton"), torch.no_grad():
        assert dispatch.select("conv_bn_relu", a).name == "triton"
