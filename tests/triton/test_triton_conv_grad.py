"""The Triton convolution gradients (resfast/backends/triton/kernels/conv_grad.py): dgrad and wgrad kernels against
ATen's convolution_backward over the odd-shape matrix (strides, padding, dilation, groups narrow and wide, layouts, an
expanded grad_output), the RESFAST_CONV_BACKWARD switch, and every training op's backward run through them."""

import functools

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    TRITON_INTERPRET,
    assert_fused_close,
    needs_triton_runtime,
    randomize_bn_signed,
    train_steps_like_module_path,
)
from torch import nn

import resfast
from resfast.ops import bottleneck

triton = pytest.importorskip("triton")
from resfast.backends.triton.kernels import conv_grad  # noqa: E402

pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
F64 = torch.float64

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
CASES = [
    (2, 8, 7, 6, 16, 3, 1, 1, 1, 1),     # 3x3, odd spatial size
    (2, 5, 9, 8, 7, 3, 2, 1, 1, 1),      # strided, odd channels (phases of unequal size)
    (1, 16, 7, 7, 32, 1, 2, 0, 1, 1),    # strided 1x1 (a downsample): three phases get no gradient
    (2, 32, 6, 5, 32, 3, 1, 2, 2, 8),    # ResNeXt-like: 4 channels per group, dilated
    (2, 12, 9, 7, 6, 3, 2, 1, 1, 3),     # groups, strided, 4 in / 2 out per group
    (1, 40, 5, 6, 48, 3, 1, 1, 1, 2),    # wide groups (20 / 24 per group: more than one tile per group)
    (2, 6, 8, 8, 4, 5, 3, 2, 1, 1),      # 5x5, stride 3
    (1, 4, 4, 4, 4, 3, 1, 0, 1, 1),      # no padding
    (3, 3, 11, 10, 70, 3, 2, 3, 2, 1),   # padding larger than the kernel's reach, C_out over one tile
]


def _case(case, dtype, layout, seed=0):
    N, ci, H, W, co, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, ci, H, W, generator=gen, dtype=dtype)
    w = torch.randn(co, ci // g, k, k, generator=gen, dtype=dtype) * 0.3
    y = torch.nn.functional.conv2d(x, w, None, s, p, d, g)
    if layout == "expanded":  # the backward of .sum(): every stride 0
        dy = torch.ones(1, 1, 1, 1, dtype=dtype).expand(y.shape)
    else:
        dy = torch.randn(y.shape, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE), (s, s), (p, p), (d, d), g


def _count_kernel_calls(monkeypatch) -> list:
    """Wrap conv_dgrad and conv_wgrad: the returned list gets each one's name when it runs."""
    calls = []
    for name in ("conv_dgrad", "conv_wgrad"):
        real = getattr(conv_grad, name)
        monkeypatch.setattr(conv_grad, name, functools.partial(lambda real, name, *a: calls.append(name) or real(*a),
                                                               real, name))
    return calls


def _aten(dy, x, w, s, p, d, g):
    dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, list(s), list(p), list(d), False, [0, 0], g,
                                                    [True, True, False])
    return dx, dw


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_float64_matches_aten(case, layout):
    """dx and dweight in float64 against ATen's to 1e-10."""
    x, w, dy, s, p, d, g = _case(case, F64, layout)
    rx, rw = _aten(dy, x, w, s, p, d, g)
    dx = conv_grad.conv_dgrad(dy, x.shape, w, s, p, d, g)
    dw = conv_grad.conv_wgrad(dy, x, w.shape, s, p, d, g)
    assert dx.is_contiguous(memory_format=torch.channels_last) and dw.shape == w.shape and dw.is_contiguous()
    torch.testing.assert_close(dx, rx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, rw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: "x".join(map(str, c)))
def test_float32_rule(case):
    """float32: err(triton) <= 2 err(aten float32) + floor, both against float64."""
    x, w, dy, s, p, d, g = _case(case, torch.float32, "channels_last")
    ref = _aten(dy.double(), x.double(), w.double(), s, p, d, g)
    eager = _aten(dy, x, w, s, p, d, g)
    fused = (conv_grad.conv_dgrad(dy, x.shape, w, s, p, d, g), conv_grad.conv_wgrad(dy, x, w.shape, s, p, d, g))
    for f, e, r in zip(fused, eager, ref):
        assert_fused_close(f, e, r, floor=1e-5)


def test_wgrad_chunks_sum_like_one(monkeypatch):
    """The weight gradient split over several chunks of output pixels equals the one-chunk result (the chunks'
    partials are summed, each entry written once per chunk)."""
    x, w, dy, s, p, d, g = _case((4, 8, 16, 16, 16, 3, 1, 1, 1, 1), F64, "channels_last")
    ref = _aten(dy, x, w, s, p, d, g)[1]
    chunks = []
    real = conv_grad._wgrad_split

    def spy(M, n_tiles, device):
        out = real(M, n_tiles, device)
        chunks.append(out[1])
        return out

    monkeypatch.setattr(conv_grad, "_wgrad_split", spy)
    torch.testing.assert_close(conv_grad.conv_wgrad(dy, x, w.shape, s, p, d, g), ref, rtol=1e-10, atol=1e-10)
    assert chunks[-1] > 1
    monkeypatch.setattr(conv_grad, "_wgrad_split", lambda M, n, dev: (triton.cdiv(M, 128) * 128, 1))
    torch.testing.assert_close(conv_grad.conv_wgrad(dy, x, w.shape, s, p, d, g), ref, rtol=1e-10, atol=1e-10)


def test_empty_and_zero_sized():
    """An empty batch: dweight is zero, dx empty; zero output channels: dx is zero."""
    x, w, dy, s, p, d, g = _case((2, 4, 5, 5, 6, 3, 1, 1, 1, 1), F64, "contiguous")
    dw = conv_grad.conv_wgrad(dy[:0], x[:0], w.shape, s, p, d, g)
    assert dw.shape == w.shape and not dw.any()
    assert conv_grad.conv_dgrad(dy[:0], x[:0].shape, w, s, p, d, g).shape == x[:0].shape
    w0 = w[:0]
    dx = conv_grad.conv_dgrad(dy[:, :0], x.shape, w0, s, p, d, g)
    assert dx.shape == x.shape and not dx.any()


def test_switch(monkeypatch):
    """RESFAST_CONV_BACKWARD picks the implementation at each call; aten by default; a bad value names itself."""
    x, w, dy, s, p, d, g = _case(CASES[1], F64, "channels_last")
    calls = _count_kernel_calls(monkeypatch)
    monkeypatch.delenv("RESFAST_CONV_BACKWARD", raising=False)
    ref = conv_grad.conv_backward(dy, x, w, True, s, p, d, g, [True, True, True])
    assert calls == []
    monkeypatch.setenv("RESFAST_CONV_BACKWARD", "triton")
    out = conv_grad.conv_backward(dy, x, w, True, s, p, d, g, [True, True, True])
    assert calls == ["conv_dgrad", "conv_wgrad"]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    dx, dw, db = conv_grad.conv_backward(dy, x, w, False, s, p, d, g, [False, True, True])
    assert dx is None and db is None and calls[-1] == "conv_wgrad"
    monkeypatch.setenv("RESFAST_CONV_BACKWARD", "cudnn")
    with pytest.raises(ValueError, match="RESFAST_CONV_BACKWARD"):
        conv_grad.conv_backward(dy, x, w, False, s, p, d, g, [True, True, False])


def test_depthwise_stays_on_aten(monkeypatch):
    """One channel per group (depthwise) is not a GEMM the kernels take: ATen computes it, correctly."""
    monkeypatch.setenv("RESFAST_CONV_BACKWARD", "triton")
    monkeypatch.setattr(conv_grad, "conv_dgrad", None)  # would raise if called
    x, w, dy, s, p, d, g = _case((2, 8, 6, 6, 8, 3, 1, 1, 1, 8), F64, "channels_last")
    dx, dw, _ = conv_grad.conv_backward(dy, x, w, False, s, p, d, g, [True, True, False])
    rx, rw = _aten(dy, x, w, s, p, d, g)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)


def test_bad_inputs(monkeypatch):
    monkeypatch.setenv("RESFAST_CONV_BACKWARD", "triton")
    x, w, dy, s, p, d, g = _case(CASES[0], F64, "contiguous")
    with pytest.raises(ValueError, match="grad_output has shape"):
        conv_grad.conv_backward(dy[:, :, 1:], x, w, False, s, p, d, g, [True, True, False])
    with pytest.raises(ValueError, match="share dtype"):
        conv_grad.conv_backward(dy.float(), x, w, False, s, p, d, g, [True, True, False])
    with pytest.raises(ValueError, match="groups=2 does not fit"):
        conv_grad.conv_backward(dy, x, w, False, s, p, d, 2, [True, True, False])


# every training op's backward through the Triton kernels: blocks over SGD steps against their module path (ATen
# autograd), float64 at 1e-9
def _res2net(stage):
    timm_res2net = pytest.importorskip("timm.models.res2net")
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)) if stage else None
    return timm_res2net.Bottle2neck(8 if stage else 16, 4, stride=2 if stage else 1, downsample=down, base_width=26,
                                    scale=4, norm_layer=nn.BatchNorm2d)


def _resnext():
    tv = pytest.importorskip("torchvision.models.resnet")
    down = nn.Sequential(nn.Conv2d(8, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    return tv.Bottleneck(8, 8, stride=2, downsample=down, groups=4, base_width=16)


def _preact():
    rv2 = pytest.importorskip("timm.models.resnetv2")
    from timm.layers import BatchNormAct2d, create_conv2d

    return rv2.PreActBottleneck(8, 16, stride=2, proj_layer=rv2.DownsampleConv, conv_layer=create_conv2d,
                                norm_layer=BatchNormAct2d)


BLOCKS = {
    "res2net-normal": (lambda: _res2net(False)),
    "res2net-stage": (lambda: _res2net(True)),
    "resnext-stage": _resnext,
    "preact-stage": _preact,
}


@pytest.mark.slow
@pytest.mark.parametrize("whole", [True, False], ids=["whole-block", "per-op"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_train_through_triton_conv_grads(name, whole, monkeypatch):
    """A converted block's training steps with every conv gradient from the Triton kernels: the whole-block ops and
    (whole-block ops off) the per-op ops (conv_bn_train, res2net_chain_train, bn_relu_conv_train)."""
    if not TRITON_INTERPRET:
        pytest.skip("float64 block steps: the interpreter's check (the GPU test runs the 2x rule)")
    monkeypatch.setenv("RESFAST_CONV_BACKWARD", "triton")
    monkeypatch.setattr(bottleneck.WHOLE_BLOCK, "enabled", whole)
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    block = resfast.convert(randomize_bn_signed(BLOCKS[name]())).to(DEVICE).to(F64).train()
    train_steps_like_module_path(block, None, F64, steps=2)
    # one weight gradient per conv and step; timm's pre-activation block on the per-op path runs only conv2 and
    # conv3 through resfast ops (bn_relu_conv_train), its conv1 and downsample as modules on norm1's output
    per_step = 2 if (name, whole) == ("preact-stage", False) else sum(isinstance(m, nn.Conv2d) for m in block.modules())
    assert calls.count("conv_wgrad") == 2 * per_step
    assert "conv_dgrad" in calls


@pytest.mark.slow
@pytest.mark.parametrize("name", ["res2net-stage", "resnext-stage"])
def test_block_gradcheck_through_triton_conv_grads(name, monkeypatch):
    """float64 gradient check of a converted block in training, every conv gradient from the Triton kernels: for
    random directions v (over the input and every conv weight) and u (over the output), the analytic u . J v
    against central differences (gradcheck's fast mode, written out: its failure report runs the slow mode, which
    takes minutes under the interpreter)."""
    if not TRITON_INTERPRET:
        pytest.skip("float64: the interpreter's check")
    monkeypatch.setenv("RESFAST_CONV_BACKWARD", "triton")
    calls = _count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    block = resfast.convert(randomize_bn_signed(BLOCKS[name]())).to(DEVICE).to(F64).train()
    names = [k for k, p in block.named_parameters() if p.dim() == 4]
    x = torch.randn(2, block.conv1.in_channels, 4, 3, dtype=F64, device=DEVICE).contiguous(
        memory_format=torch.channels_last)

    def f(x, *weights):
        with resfast.backend("triton"):
            return torch.func.functional_call(block, dict(zip(names, weights)), (x,))

    params = dict(block.named_parameters())
    leaves = [x.requires_grad_()] + [params[k].detach().clone().requires_grad_() for k in names]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(t.shape, generator=gen, dtype=F64).to(DEVICE) for t in leaves]
    out = f(*leaves)
    u = torch.randn(out.shape, generator=gen, dtype=F64).to(DEVICE)
    analytic = sum((g * d).sum() for g, d in zip(torch.autograd.grad(out, leaves, u), v))
    eps = 1e-6
    with torch.no_grad():
        plus = f(*[t + eps * d for t, d in zip(leaves, v)])
        minus = f(*[t - eps * d for t, d in zip(leaves, v)])
    numeric = ((plus - minus) * u).sum() / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6)
    assert "conv_dgrad" in calls and "conv_wgrad" in calls


def _per_thread(c, width):
    return c.kwargs["BLOCK_M"] * width // (32 * c.num_warps)


def test_prunes_keep_unaligned_tiles_within_registers():
    """Which configs autotuning may pick (the AOT report measured the rest spilling on sm_90): wgrad with operands
    that cannot be loaded in 16-byte vectors (a 52-channel NHWC tensor: pixel stride 52) only tries tiles with at
    most 16 elements of an operand per thread, aligned operands never try the unaligned-only ones; dgrad storing
    dx element by element only tries output tiles with at most 32 elements per thread."""
    from resfast.backends.triton.kernels import conv

    def args(c, dtype=torch.bfloat16):
        t = torch.empty(2, c, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return t, t.stride()

    def wgrad_kept(c):
        (dy, sd), (x, sx) = args(c), args(c)
        named = dict(DY_ptr=dy, X_ptr=x, sdn=sd[0], sdc=sd[1], sdh=sd[2], sdw=sd[3],
                     sxn=sx[0], sxc=sx[1], sxh=sx[2], sxw=sx[3])
        return conv_grad._prune_wgrad(conv_grad._WGRAD_CONFIGS, named, BLOCK_N=64, BLOCK_C=64)

    unaligned = wgrad_kept(52)
    assert unaligned and all(_per_thread(c, 64) <= 16 for c in unaligned)
    aligned = wgrad_kept(64)
    assert aligned == conv_grad._WGRAD_CONFIGS[:-conv_grad._WGRAD_UNALIGNED_ONLY]

    def dgrad_kept(c_in):
        (dy, sd), (dx, sx) = args(64), args(c_in)
        named = dict(DY_ptr=dy, DX_ptr=dx, N=256, H=56, W=56, G_TILE=1, COUT_G=64, sdn=sd[0], sdc=sd[1], sdh=sd[2],
                     sdw=sd[3], sxn=sx[0], sxc=sx[1], sxh=sx[2], sxw=sx[3])
        return conv_grad._prune_dgrad(conv.CONFIGS, named, BLOCK_N=64)

    narrow = dgrad_kept(104)
    assert narrow and all(_per_thread(c, 64) <= 32 for c in narrow)
    wide = dgrad_kept(128)
    assert any(_per_thread(c, 64) > 32 for c in wide)  # the 128-row tile on 4 warps, where dx is stored in vectors
