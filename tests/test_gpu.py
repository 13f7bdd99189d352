"""GPU-only checks of the fused GPU backends, `triton` and `cuda` (the `backend` fixture; skipped without CUDA;
`bash scripts/gpu_check.sh` runs the same checks, time-boxed, through scripts/gpu_check.py on a lent GPU):
fp16/bf16 at real ResNet-50-family shapes under the accuracy rule err(fused) <= 2 x err(eager same dtype) + floor,
both against float64, in eval and in training (every gradient); whole converted models' logits; a 200-step AMP
training run whose loss curve follows eager's."""

import copy

import pytest
import torch
from helpers import assert_fused_close, randomize_bn
from torch import nn

import resfast
from resfast import models, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float16, torch.bfloat16]


def _gpu_backends():
    from resfast.ops import dispatch

    return [b for b in ("triton", "cuda") if not dispatch.get(b).static_reasons("conv_bn_relu")]


@pytest.fixture(params=_gpu_backends() or ["none"])
def backend(request):
    if request.param == "none":
        pytest.skip("no fused GPU backend is available")
    return request.param


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
def test_conv_bn_relu_real_shapes(shape, dtype, backend):
    cin, cout, h, k, s, g = shape
    x = _x((16, cin, h, h))
    w = torch.randn(cout, cin // g, k, k, device="cuda", dtype=torch.float64) / (cin // g * k * k) ** 0.5
    bn = _bn(cout).double()
    kw = dict(stride=s, padding=k // 2, groups=g)
    ref = ops.conv_bn_relu_ref(x, w, bn, **kw)
    bn_low = copy.deepcopy(bn).to(dtype)
    eager = ops.conv_bn_relu_ref(x.to(dtype), w.to(dtype), bn_low, **kw)
    with resfast.backend(backend), torch.no_grad():
        out = ops.conv_bn_relu(x.to(dtype), w.to(dtype), bn_low, **kw)
    assert_fused_close(out, eager, ref, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,h,block_type,stride", [(26, 56, "normal", 1), (26, 56, "stage", 1),
                                                       (52, 56, "stage", 2), (104, 14, "normal", 1),
                                                       (208, 7, "normal", 1), (14, 56, "normal", 1)])
def test_res2net_chain_real_shapes(width, h, block_type, stride, dtype, backend):
    scale = 4
    x = _x((16, width * scale, h, h))
    ws = [torch.randn(width, width, 3, 3, device="cuda", dtype=torch.float64) / (9 * width) ** 0.5
          for _ in range(scale - 1)]
    bns = [_bn(width).double() for _ in range(scale - 1)]
    kw = dict(scale=scale, stride=stride, block_type=block_type)
    ref = ops.res2net_chain_ref(x, ws, bns, **kw)
    low = [copy.deepcopy(b).to(dtype) for b in bns]
    eager = ops.res2net_chain_ref(x.to(dtype), [w.to(dtype) for w in ws], low, **kw)
    with resfast.backend(backend), torch.no_grad():
        out = ops.res2net_chain(x.to(dtype), [w.to(dtype) for w in ws], low, **kw)
    assert_fused_close(out, eager, ref, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_conv_real_shape(dtype, backend):
    x = _x((16, 256, 56, 56))
    w = torch.randn(64, 256, 1, 1, device="cuda", dtype=torch.float64) / 16
    bn = _bn(256).double()
    ref = ops.bn_relu_conv_ref(x, bn, w)
    low = copy.deepcopy(bn).to(dtype)
    eager = ops.bn_relu_conv_ref(x.to(dtype), low, w.to(dtype))
    with resfast.backend(backend), torch.no_grad():
        out = ops.bn_relu_conv(x.to(dtype), low, w.to(dtype))
    assert_fused_close(out, eager, ref, floor=1e-3)


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "res2net50_14w_8s", "res2next50", "resnext50_32x4d",
                                  "resnet50", "resnet50_v2", "timm:resnetv2_50"])
def test_whole_model_logits_bf16(name, backend):
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
        with resfast.backend(backend):
            out = low(x.bfloat16())
    assert_fused_close(out, eager, ref, floor=1e-2)


# --- training ----------------------------------------------------------------------------------------------------

def _train_bn(c):
    bn = nn.BatchNorm2d(c).cuda().double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _grads_close(fn, leaves64, dtype, floor, backend):
    """fn(leaves, dtype) -> output, in training mode: the output and the gradient of every leaf under the 2x rule
    (`backend` in ``dtype`` vs eager in ``dtype``, both against float64 eager). Leaves are float64 (input,
    weights; BatchNorm parameters stay float64 -> fp32 as under AMP)."""
    results = {}
    for tag, dt, name in (("ref", torch.float64, "eager"), ("eager", dtype, "eager"), ("fused", dtype, backend)):
        leaves = [t.detach().to(dt).requires_grad_() for t in leaves64]
        with resfast.backend(name):
            out = fn(leaves, dt)
        g = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1),
                        dtype=torch.float64).to(dt)
        grads = torch.autograd.grad(out, leaves, g)
        results[tag] = (out, *grads)
    for out, eager, ref in zip(results["fused"], results["eager"], results["ref"]):
        assert_fused_close(out, eager, ref, floor=floor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(256, 104, 56, 1, 1, 1), (128, 128, 56, 3, 1, 32), (256, 256, 28, 3, 2, 32)],
                         ids=str)
def test_conv_bn_relu_training_real_shapes(shape, dtype, backend):
    cin, cout, h, k, s, g = shape
    x = _x((16, cin, h, h))
    w = torch.randn(cout, cin // g, k, k, device="cuda", dtype=torch.float64) / (cin // g * k * k) ** 0.5
    bn = _train_bn(cout)

    def fn(leaves, dt):
        b = copy.deepcopy(bn).float() if dt != torch.float64 else copy.deepcopy(bn)
        return ops.conv_bn_relu(leaves[0], leaves[1], b, stride=s, padding=k // 2, groups=g, training=True)

    _grads_close(fn, [x, w], dtype, floor=1e-3, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,h,block_type,stride", [(26, 56, "normal", 1), (52, 56, "stage", 2),
                                                       (104, 14, "normal", 1)])
def test_res2net_chain_training_real_shapes(width, h, block_type, stride, dtype, backend):
    scale = 4
    x = _x((16, width * scale, h, h))
    ws = [torch.randn(width, width, 3, 3, device="cuda", dtype=torch.float64) / (9 * width) ** 0.5
          for _ in range(scale - 1)]
    bns = [_train_bn(width) for _ in range(scale - 1)]

    def fn(leaves, dt):
        b = [copy.deepcopy(bn).float() if dt != torch.float64 else copy.deepcopy(bn) for bn in bns]
        return ops.res2net_chain(leaves[0], leaves[1:], b, scale=scale, stride=stride, block_type=block_type,
                                 training=True)

    _grads_close(fn, [x, *ws], dtype, floor=1e-3, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_relu_conv_training_real_shape(dtype, backend):
    x = _x((16, 256, 56, 56))
    w = torch.randn(64, 256, 1, 1, device="cuda", dtype=torch.float64) / 16
    bn = _train_bn(256)

    def fn(leaves, dt):
        b = copy.deepcopy(bn).float() if dt != torch.float64 else copy.deepcopy(bn)
        return ops.bn_relu_conv(leaves[0], b, leaves[1], training=True)

    _grads_close(fn, [x, w], dtype, floor=1e-3, backend=backend)


def _block_grads_close(block: nn.Module, dtype, backend: str) -> None:
    """Block `block` (training, on the GPU) at 16 x C x 28 x 28: through `backend` in `dtype` (BatchNorm parameters
    fp32, as under AMP) against its module path (``_forward_modules``) in `dtype` and in float64: the output, the
    input's and every parameter's gradient under the 2x rule."""
    x = _x((16, block.conv1.in_channels, 28, 28))
    results = {}
    for tag, dt, name in (("ref", torch.float64, "eager"), ("eager", dtype, "eager"), ("fused", dtype, backend)):
        m = copy.deepcopy(block).to(dt)
        if dt != torch.float64:
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.float()
        xx = x.detach().to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
        with resfast.backend(name):
            out = m(xx) if tag == "fused" else m._forward_modules(xx)
        g = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1),
                        dtype=torch.float64).to(dt)
        out.backward(g)
        results[tag] = [out.detach(), xx.grad] + [p.grad for p in m.parameters()]
    for out, eager, ref in zip(results["fused"], results["eager"], results["ref"]):
        assert_fused_close(out, eager, ref, floor=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", [False, True], ids=["normal", "stage"])
def test_res2net_bottleneck_training_real_shape(stage, dtype, backend):
    """A whole Bottle2neck of res2net50_26w_4s's layer 2 in training (the Triton backend runs it as its one
    whole-bottleneck op; the cuda backend per op), activations in ``dtype`` and BatchNorm parameters in fp32 as under
    AMP: the output, the input's and every parameter's gradient under the 2x rule."""
    ds = nn.Sequential(nn.Conv2d(256, 512, 1, 2, bias=False), nn.BatchNorm2d(512)) if stage else None
    block = resfast.Bottle2neck(256 if stage else 512, 128, stride=2 if stage else 1, downsample=ds, base_width=26,
                                scale=4)
    block = randomize_bn(block).cuda().train()
    _block_grads_close(block, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stage", [False, True], ids=["identity", "downsample"])
def test_preact_bottleneck_training_real_shape(stage, dtype, backend):
    """A timm PreActBottleneck of resnetv2_50's layer 2 in training (the Triton backend runs it as its one whole-block
    op, the downsample a second GEMM of the last conv's launch; the cuda backend per op), activations in ``dtype``
    and BatchNorm parameters in fp32 as under AMP: the output, the input's and every parameter's gradient under the
    2x rule."""
    rv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d

    proj = dict(stride=2, proj_layer=rv2.DownsampleConv) if stage else {}
    block = resfast.TimmPreActBottleneck(256 if stage else 512, 512, conv_layer=create_conv2d,
                                         norm_layer=BatchNormAct2d, **proj)
    block = randomize_bn(block).cuda().train()
    _block_grads_close(block, dtype, backend)


def test_training_run_loss_curve_matches_eager(backend):
    """200 steps of a small Res2Net (res2net50_26w_4s layers 1-2 width, 10 classes, random data, AMP bf16,
    channels_last, SGD, same initial weights and data): the fused backend's loss curve (smoothed over 20 steps)
    stays within 10% of eager's on average, and the model learns."""
    def run(name, seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            resfast.Bottle2neck(64, 32, downsample=nn.Sequential(nn.Conv2d(64, 128, 1, bias=False),
                                                                 nn.BatchNorm2d(128)), base_width=26, scale=4),
            resfast.Bottle2neck(128, 32, base_width=26, scale=4),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).cuda().to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator("cuda").manual_seed(123)
        data = torch.randn(16, 32, 3, 32, 32, device="cuda", generator=g)
        labels = torch.randint(0, 10, (16, 32), device="cuda", generator=g)
        losses = []
        with resfast.backend(name):
            for step in range(200):
                x = data[step % 16].contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x).float(), labels[step % 16])
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        return torch.tensor(losses)

    def smooth(t):
        return t.unfold(0, 20, 1).mean(1)

    eager, fused = run("eager"), run(backend)
    assert fused[-20:].mean() < fused[:20].mean() * 0.7  # it learns
    diff = (smooth(fused) - smooth(eager)).abs().mean()
    assert diff < 0.1 * smooth(eager).mean(), (diff, smooth(eager)[-1], smooth(fused)[-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES + [(3, 64, 224, 7, 2, 1), (64, 256, 56, 1, 2, 1)], ids=str)
def test_triton_conv_gradients_real_shapes(shape, dtype):
    """The Triton dgrad/wgrad kernels (RESFAST_CONV_BACKWARD=triton) at the networks' conv shapes, batch 16:
    err(triton) <= 2 err(ATen same dtype) + floor, both against float64 ATen."""
    pytest.importorskip("triton")
    from resfast.backends.triton.kernels import conv_grad

    cin, cout, h, k, s, g = shape
    p = k // 2
    x64, w64 = _x((16, cin, h, h)), torch.randn(cout, cin // g, k, k, device="cuda", dtype=torch.float64) * 0.05
    ho = (h + 2 * p - k) // s + 1
    dy64 = _x((16, cout, ho, ho))

    def aten(dy, x, w):
        return torch.ops.aten.convolution_backward(dy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], g,
                                                   [True, True, False])[:2]

    ref = aten(dy64, x64, w64)
    low = [t.to(dtype) for t in (dy64, x64, w64)]
    eager = aten(*low)
    dy, x, w = low
    fused = (conv_grad.conv_dgrad(dy, x.shape, w, (s, s), (p, p), (1, 1), g),
             conv_grad.conv_wgrad(dy, x, w.shape, (s, s), (p, p), (1, 1), g))
    for f, e, r in zip(fused, eager, ref):
        assert_fused_close(f, e, r, floor=1e-2)
