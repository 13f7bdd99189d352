"""conv_bn_relu and bn_relu_conv against nn.Conv2d / nn.BatchNorm2d compositions, gradcheck, bad inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resfast
from resfast import ops
from resfast.ops import BatchNormParams

# (C_in, C_out, k, stride, padding, dilation, groups)
CONVS = [
    (8, 8, 3, 1, 1, 1, 1),
    (8, 8, 3, 2, 1, 1, 4),  # grouped (ResNeXt), stride 2
    (6, 6, 3, 1, 2, 2, 6),  # depthwise, dilated
    (5, 7, 1, 1, 0, 1, 1),  # 1x1, odd channels
    (4, 6, 3, 2, 1, 1, 2),
    (3, 5, 7, 2, 3, 1, 1),  # stem-like
]
SHAPES = [(2, 7, 5), (1, 3, 3), (3, 1, 6), (2, 9, 9)]


def _bn(C, dtype):
    bn = nn.BatchNorm2d(C, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)  # negative gamma included
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def _pair(C, dtype):
    a = _bn(C, dtype)
    b = _bn(C, dtype)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False)])
def test_conv_bn_relu(conv, shape, training, channels_last, residual, relu):
    cin, cout, k, s, p, d, g = conv
    N, H, W = shape
    dtype = torch.float64
    x = torch.randn(N, cin, H, W, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    m = nn.Conv2d(cin, cout, k, s, p, d, g, bias=True, dtype=dtype)
    y0 = m(x)
    if training and y0.shape[0] * y0.shape[2] * y0.shape[3] == 1:
        pytest.skip("one value per channel in training is an error (tested below)")
    bn_ref, bn_op = _pair(cout, dtype)
    bn_ref.train(training)
    res = torch.randn_like(y0) if residual else None
    ref = bn_ref(y0) + (res if residual else 0)
    ref = F.relu(ref) if relu else ref
    out = ops.conv_bn_relu(x, m.weight, bn_op, bias=m.bias, stride=s, padding=p, dilation=d, groups=g,
                           training=training, relu=relu, residual=res)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for k_, v in bn_ref.state_dict().items():
        torch.testing.assert_close(bn_op.state_dict()[k_], v, rtol=0, atol=1e-14)


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual", [False, True])
def test_bn_relu_conv(conv, training, channels_last, residual):
    cin, cout, k, s, p, d, g = conv
    dtype = torch.float64
    x = torch.randn(2, cin, 7, 5, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    m = nn.Conv2d(cin, cout, k, s, p, d, g, bias=False, dtype=dtype)
    bn_ref, bn_op = _pair(cin, dtype)
    bn_ref.train(training)
    y = m(F.relu(bn_ref(x)))
    res = torch.randn_like(y) if residual else None
    ref = y + res if residual else y
    out = ops.bn_relu_conv(x, bn_op, m.weight, stride=s, padding=p, dilation=d, groups=g, training=training,
                           residual=res)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for k_, v in bn_ref.state_dict().items():
        torch.testing.assert_close(bn_op.state_dict()[k_], v, rtol=0, atol=1e-14)


def test_references_are_public_and_agree():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bn1, bn2 = _pair(4, torch.float64)
    bn3 = copy.deepcopy(bn2)
    a = ops.conv_bn_relu(x, w, bn1, padding=1, groups=2, training=True)
    b = ops.conv_bn_relu_ref(x, w, bn2, padding=1, groups=2, training=True)
    with resfast.backend("eager"):  # the reference is the eager backend, exactly
        torch.testing.assert_close(ops.conv_bn_relu(x, w, bn3, padding=1, groups=2, training=True), b, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # auto: a fused backend where one runs
    assert int(bn1.num_batches_tracked) == int(bn2.num_batches_tracked) == 1
    bn1, bn2 = _pair(4, torch.float64)
    torch.testing.assert_close(ops.bn_relu_conv(x, bn1, w, groups=2), ops.bn_relu_conv_ref(x, bn2, w, groups=2))


def _bnp(C, affine=True, track=True, momentum=0.1):
    g = torch.rand(C, dtype=torch.float64).add(0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine else None
    rm = torch.randn(C, dtype=torch.float64) * 0.1 if track else None
    rv = torch.rand(C, dtype=torch.float64) + 0.5 if track else None
    return g, b, rm, rv, momentum


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_gradcheck_conv_bn_relu(training, affine, track):
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    g, b, rm, rv, mom = _bnp(6, affine, track)
    if not track and not training:
        pass  # no running stats: batch statistics in eval too, as nn.BatchNorm2d

    def f(x, w, res, *gb):
        bn = BatchNormParams(*(gb if affine else (None, None)), None if rm is None else rm.clone(),
                             None if rv is None else rv.clone(), None, mom, 1e-5)
        return ops.conv_bn_relu(x, w, bn, stride=2, padding=1, groups=2, training=training, residual=res)

    assert torch.autograd.gradcheck(f, (x, w, res) + ((g, b) if affine else ()))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_bn_relu_conv(training):
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(6, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    g, b, rm, rv, mom = _bnp(4)

    def f(x, w, cb, res, g, b):
        bn = BatchNormParams(g, b, rm.clone(), rv.clone(), None, mom, 1e-5)
        return ops.bn_relu_conv(x, bn, w, bias=cb, padding=1, training=training, residual=res)

    assert torch.autograd.gradcheck(f, (x, w, cb, res, g, b))


def test_zero_batch_eval():
    x = torch.randn(0, 4, 6, 6)
    w = torch.randn(8, 1, 3, 3)
    out = ops.conv_bn_relu(x, w, nn.BatchNorm2d(8).eval(), stride=2, padding=1, groups=4)
    assert out.shape == (0, 8, 3, 3)
    out = ops.bn_relu_conv(x, nn.BatchNorm2d(4).eval(), w, stride=2, padding=1, groups=4)
    assert out.shape == (0, 8, 3, 3)


def test_bad_inputs():
    x = torch.randn(2, 8, 5, 5)
    bn = nn.BatchNorm2d(8)
    w = torch.randn(8, 2, 3, 3)
    with pytest.raises(ValueError, match="expects 16 input channels .* but the input has 8 channels"):
        ops.conv_bn_relu(x, torch.randn(8, 16, 3, 3), bn)
    with pytest.raises(ValueError, match="4-D input"):
        ops.conv_bn_relu(x[0], w, bn, groups=4)
    with pytest.raises(ValueError, match="groups=3 does not divide the 8 input channels"):
        ops.conv_bn_relu(x, w, bn, groups=3)
    with pytest.raises(ValueError, match="groups=4 does not divide the 6 output channels"):
        ops.conv_bn_relu(x, torch.randn(6, 2, 3, 3), nn.BatchNorm2d(6), groups=4)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        ops.conv_bn_relu(x, w.double(), bn, groups=4)
    with pytest.raises(ValueError, match="weight is on meta but the input is on cpu"):
        ops.conv_bn_relu(x, w.to("meta"), bn, groups=4)
    with pytest.raises(ValueError, match="bn.weight has shape \\(6,\\) but 8 channels"):
        ops.conv_bn_relu(x, w, nn.BatchNorm2d(6), groups=4)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        ops.conv_bn_relu(torch.randn(1, 8, 1, 1), w, bn, padding=1, groups=4, training=True)
    with pytest.raises(ValueError, match="residual has shape"):
        ops.conv_bn_relu(x, w, bn, padding=1, groups=4, residual=torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="too small"):
        ops.conv_bn_relu(torch.randn(1, 8, 1, 1), w, bn, groups=4)
    with pytest.raises(TypeError, match="floating-point"):
        ops.conv_bn_relu(x.long(), w, bn, groups=4)
    with pytest.raises(ValueError, match="4-D input"):
        ops.bn_relu_conv(torch.randn(8, 5, 5), bn, w, groups=4)
    with pytest.raises(ValueError, match="bn.weight has shape \\(4,\\) but 8 channels"):
        ops.bn_relu_conv(x, nn.BatchNorm2d(4), w, groups=4)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        ops.bn_relu_conv(torch.randn(1, 8, 1, 1), bn, w, padding=1, groups=4, training=True)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_autocast_accepts_mixed_dtypes(grad):
    """bfloat16 input, float32 weight and BatchNorm under CPU autocast: the conv runs in bfloat16 and the result is
    what nn.Conv2d + BatchNorm2d + ReLU give under the same autocast, within bfloat16 rounding of a float32
    reference (with gradients auto runs eager; without, the cpu backend's bfloat16 inference where it is built)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5).bfloat16()
    w = torch.randn(4, 4, 3, 3)
    bn = _bn(4, torch.float32).eval()
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.conv_bn_relu(x, w, bn, padding=1)
        nn_out = F.relu(bn(conv(x)))
    assert out.shape == (2, 4, 5, 5) and out.dtype == nn_out.dtype == torch.bfloat16
    # float32 all the way from the same bfloat16-rounded operands: only the bfloat16 roundings of the conv output and
    # the result differ
    ref = F.relu(F.batch_norm(F.conv2d(x.float(), w.bfloat16().float(), padding=1), bn.running_mean, bn.running_var,
                              bn.weight, bn.bias, False, 0.0, bn.eps))
    tol = dict(rtol=1.6e-2, atol=8e-3 * ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(out.float(), nn_out.float(), **tol)
    assert (out > 0).any() and (out == 0).any()  # the ReLU clips some, not all
