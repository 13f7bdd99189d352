"""conv_bn_relu with a projection shortcut (ConvShortcut: the residual is ``bn'(conv1x1(x', stride))``, the
downsample of a ResNet stage's first block) against the composition of two reference calls: eager in training and
eval (running statistics of both BatchNorms), float64 gradcheck, the cpu backend, bad inputs. The Triton kernel
(a second GEMM in the same launch) is tested in tests/triton/test_triton_conv_bn_relu.py."""

import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import resfast
from resfast import ops
from resfast.ops import ConvShortcut, dispatch

CPU_BUILT = dispatch.get("cpu").static_reasons("conv_bn_relu") == ()


def _case(dtype=torch.float64, cl=False, stride=2, cin=6, cmid=5, cout=8, hw=(7, 9), k=1):
    """(x for the main conv, its weight, bn, shortcut input, shortcut weight, shortcut bn): a bottleneck's conv3
    (k x k, stride 1 on the already-strided mid tensor) and its downsample (1x1, stride) from the block input."""
    g = torch.Generator().manual_seed(0)
    H, W = hw
    oh, ow = (H - 1) // stride + 1, (W - 1) // stride + 1
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(2, cmid, oh, ow, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    xs = torch.randn(2, cin, H, W, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(cout, cmid, k, k, generator=g, dtype=dtype)
    ws = torch.randn(cout, cin, 1, 1, generator=g, dtype=dtype)
    bn = randomize_bn(nn.BatchNorm2d(cout, dtype=dtype), 1)
    bns = randomize_bn(nn.BatchNorm2d(cout, dtype=dtype), 2)
    return x, w, bn, xs, ws, bns


def _two_calls(x, w, bn, xs, ws, bns, stride, training, relu=True, k=1, bias=None):
    y = ops.conv_bn_relu_ref(x, w, bn, padding=k // 2, training=training, relu=False)
    r = ops.conv_bn_relu_ref(xs, ws, bns, stride=stride, training=training, relu=False, bias=bias)
    y = y + r
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("stride,relu", [(1, True), (2, True), (2, False)])
def test_eager_matches_two_calls(training, cl, stride, relu):
    x, w, bn, xs, ws, bns = _case(cl=cl, stride=stride)
    bn_ref, bns_ref = copy.deepcopy(bn), copy.deepcopy(bns)
    ref = _two_calls(x, w, bn_ref, xs, ws, bns_ref, stride, training, relu)
    with resfast.backend("eager"):
        out = ops.conv_bn_relu(x, w, bn, training=training, relu=relu,
                               shortcut=ConvShortcut(xs, ws, bns, stride))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in ((bn, bn_ref), (bns, bns_ref)):  # both BatchNorms' running statistics, updated once each
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert int(bns.num_batches_tracked) == int(training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(training):
    x, w, bn, xs, ws, bns = _case(cin=3, cmid=2, cout=4, hw=(4, 5), k=3)
    ps = [t.requires_grad_() for t in (x, w, xs, ws, bn.weight, bn.bias, bns.weight, bns.bias)]
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, xs, ws, g1, b1, g2, b2, bias):
        p1 = ops.BatchNormParams(g1, b1, bn.running_mean.clone(), bn.running_var.clone(), None, 0.1, 1e-5)
        p2 = ops.BatchNormParams(g2, b2, bns.running_mean.clone(), bns.running_var.clone(), None, 0.1, 1e-5)
        return ops.conv_bn_relu(x, w, p1, padding=1, training=training,
                                shortcut=ConvShortcut(xs, ws, p2, 2, bias))

    assert torch.autograd.gradcheck(f, (*ps, bias))


@pytest.mark.skipif(not CPU_BUILT, reason="resfast._C with the cpu kernels is not built")
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("stride,k", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_backend(cl, stride, k, dtype):
    x, w, bn, xs, ws, bns = _case(dtype=dtype, cl=cl, stride=stride, k=k, hw=(9, 6))
    bn.eval(), bns.eval()
    bias = torch.randn(8, dtype=dtype)
    ref = _two_calls(x, w, bn, xs, ws, bns, stride, False, k=k, bias=bias)
    with resfast.backend("cpu"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, padding=k // 2, shortcut=ConvShortcut(xs, ws, bns, stride, bias))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.skipif(not CPU_BUILT, reason="resfast._C with the cpu kernels is not built")
def test_cpu_backend_runs_a_batch_stats_shortcut_bn_through_the_training_ops():
    x, w, bn, xs, ws, bns = _case()
    bn.eval()
    with torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, training=False, shortcut=ConvShortcut(xs, ws, ops.BatchNormParams(
            bns.weight, bns.bias, None, None, None, 0.1, 1e-5), 2))  # no running stats: batch statistics
    assert out.shape == (2, 8, 4, 5)
    args = resfast.ops._args.prepare_conv_bn_relu(
        x, w, bn, None, 1, 0, 1, 1, False, True, None, None,
        ConvShortcut(xs, ws, ops.BatchNormParams(bns.weight, bns.bias, None, None, None, 0.1, 1e-5), 2))
    if dispatch.get("cpu").static_reasons("conv_bn_relu"):
        pytest.skip("resfast._C is not built")
    assert dispatch.get("cpu").not_supported_reasons("conv_bn_relu", args) == []
    with resfast.backend("cpu"), torch.no_grad():
        fused = ops.conv_bn_relu(x, w, bn, training=False, shortcut=ConvShortcut(xs, ws, ops.BatchNormParams(
            bns.weight, bns.bias, None, None, None, 0.1, 1e-5), 2))
    torch.testing.assert_close(fused, out, rtol=1e-10, atol=1e-10)


def test_bad_shortcuts():
    x, w, bn, xs, ws, bns = _case()
    with pytest.raises(ValueError, match="either residual or shortcut"):
        ops.conv_bn_relu(x, w, bn, residual=torch.zeros(2, 8, 4, 5, dtype=torch.float64),
                         shortcut=ConvShortcut(xs, ws, bns, 2))
    with pytest.raises(TypeError, match="ConvShortcut"):
        ops.conv_bn_relu(x, w, bn, shortcut=(xs, ws, bns, 2))
    with pytest.raises(ValueError, match=r"1x1 projection"):
        ops.conv_bn_relu(x, w, bn, shortcut=ConvShortcut(xs, torch.randn(8, 6, 3, 3, dtype=torch.float64), bns, 2))
    with pytest.raises(ValueError, match="output has shape"):
        ops.conv_bn_relu(x, w, bn, shortcut=ConvShortcut(xs, ws, bns, 1))
    with pytest.raises(ValueError, match="shortcut.bn"):
        ops.conv_bn_relu(x, w, bn, shortcut=ConvShortcut(xs, ws, nn.BatchNorm2d(7, dtype=torch.float64), 2))
    with pytest.raises((TypeError, ValueError), match="shortcut.x"):
        ops.conv_bn_relu(x, w, bn, shortcut=ConvShortcut(xs.float(), ws, bns, 2))
