"""GPU-only checks of the Triton backend (skipped without CUDA; `bash scripts/gpu_check.sh` runs them on a lent
GPU): fp16/bf16 at real ResNet-50-family shapes under the accuracy rule
err(triton) <= 2 x err(eager same dtype) + floor, both against float64; whole converted models, logits."""

import copy

import pytest
import torch
from helpers import assert_fused_close, randomize_bn
from torch import nn

import resfast
from resfast import models, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float16, torch.bfloat16]


def _bn(c):
    return randomize_bn(nn.BatchNorm2d(c)).eval().cuda()


def _x(shape, dtype=torch.float64):
    return torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)


def _low(t, dtype):
    return None if t is None else t.to(dtype)


# (C_in, C_out, H, kernel, stride, groups): res2net50_26w_4s, resnext50_32x4d and resnet50 layers, batch 16
CONV_SHAPES = [(256, 104, 56, 1, 1, 1), (104, 256, 56, 1, 1, 1), (128, 128, 56, 3, 1, 32), (256, 256, 28, 3, 2, 32),
               (1024, 416, 14, 1, 1, 1), (2048, 832, 7, 1, 1, 1), (512, 512, 7, 3, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_conv_bn_relu_real_shapes(shape, dtype):
    cin, cout, h, k, s, g = shape
    x = _x((16, cin, h, h))
    w = torch.randn(cout, cin // g, k, k, device="cuda", dtype=torch.float64) / (cin // g * k * k) ** 0.5
    bn = _bn(cout).double()
    kw = dict(stride=s, padding=k // 2, groups=g)
    ref = ops.conv_bn_relu_ref(x, w, bn, **kw)
    bn_low = copy.deepcopy(bn).to(dtype)
    eager = ops.conv_bn_relu_ref(x.to(dtype), w.to(dtype), bn_low, **kw)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.conv_bn_relu(x.to(dtype), w.to(dtype), bn_low, **kw)
    assert_fused_close(out, eager, ref, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,h,block_type,stride", [(26, 56, "normal", 1), (26, 56, "stage", 1),
                                                       (52, 56, "stage", 2), (104, 14, "normal", 1),
                                                       (208, 7, "normal", 1), (14, 56, "normal", 1)])
def test_res2net_chain_real_shapes(width, h, block_type, stride, dtype):
    scale = 4
    x = _x((16, width * scale, h, h))
    ws = [torch.randn(width, width, 3, 3, device="cuda", dtype=torch.float64) / (9 * width) ** 0.5
          for _ in range(scale - 1)]
    bns = [_bn(width).double() for _ in range(scale - 1)]
    kw = dict(scale=scale, stride=stride, block_type=block_type)
    ref = ops.res2net_chain_ref(x, ws, bns, **kw)
    low = [copy.deepcopy(b).to(dtype) for b in bns]
    eager = ops.res2net_chain_ref(x.to(dtype), [w.to(dtype) for w in ws], low, **kw)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.res2net_chain(x.to(dtype), [w.to(dtype) for w in ws], low, **kw)
    assert_fused_close(out, eager, ref, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_conv_real_shape(dtype):
    x = _x((16, 256, 56, 56))
    w = torch.randn(64, 256, 1, 1, device="cuda", dtype=torch.float64) / 16
    bn = _bn(256).double()
    ref = ops.bn_relu_conv_ref(x, bn, w)
    low = copy.deepcopy(bn).to(dtype)
    eager = ops.bn_relu_conv_ref(x.to(dtype), low, w.to(dtype))
    with resfast.backend("triton"), torch.no_grad():
        out = ops.bn_relu_conv(x.to(dtype), low, w.to(dtype))
    assert_fused_close(out, eager, ref, floor=1e-3)


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "res2net50_14w_8s", "res2next50", "resnext50_32x4d",
                                  "resnet50", "resnet50_v2", "timm:resnetv2_50"])
def test_whole_model_logits_bf16(name):
    if name.startswith("timm:"):  # timm's own pre-activation model, converted
        timm = pytest.importorskip("timm")
        model = randomize_bn(resfast.convert(timm.create_model(name[5:]))).eval().cuda()
    else:
        model = randomize_bn(models.get_model(name)).eval().cuda()
    x = _x((8, 3, 224, 224), torch.float32)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        low = copy.deepcopy(model).to(torch.bfloat16).to(memory_format=torch.channels_last)
        with resfast.backend("eager"):
            eager = low(x.bfloat16())
        with resfast.backend("triton"):
            out = low(x.bfloat16())
    assert_fused_close(out, eager, ref, floor=1e-2)
