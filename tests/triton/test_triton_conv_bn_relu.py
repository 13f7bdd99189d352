"""The Triton conv_bn_relu (implicit GEMM, eval BatchNorm folded, residual + ReLU epilogue) against the eager
reference, under TRITON_INTERPRET=1 on CPU tensors, float32 and float64, over the shapes that break kernels."""

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET, block_through, conv_inputs, needs_triton_runtime, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import resfast
from resfast import ops
from resfast.ops import dispatch
from resfast.ops.reference import conv_bn_relu_ref

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
    x, w, b = conv_inputs(conv, shape, dtype, channels_last, bias, DEVICE)
    bn = _bn(cout, dtype, frozen).to(DEVICE)
    ref_y = ops.conv_bn_relu_ref(x, w, bn, bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu)
    res = torch.randn_like(ref_y) if residual else None
    ref = ops.conv_bn_relu_ref(x, w, bn, bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu,
                               residual=res)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu,
                               residual=res)
    return out, ref


@pytest.mark.slow
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


# Grouped convolutions: (C_in, C_out, k, stride, padding, dilation, groups), with the tiling each one takes
GROUPED = [
    ((128, 128, 3, 1, 1, 1, 32), (4, False)),  # ResNeXt 32x4d: 4 channels per group, 4 groups per program
    ((256, 256, 3, 2, 1, 1, 32), (2, False)),  # ResNeXt 32x8d, stride 2: 8 per group, 2 groups per program
    ((24, 24, 3, 1, 1, 1, 6), (4, False)),  # 6 groups, tiles of 4: the second tile half empty
    ((36, 36, 3, 1, 2, 2, 12), (5, False)),  # 3 per group: tiles of 5, 5 and 2 groups; dilated
    ((12, 30, 3, 1, 1, 1, 6), (3, False)),  # C_in/g = 2 != C_out/g = 5
    ((160, 160, 3, 1, 1, 1, 2), (1, False)),  # 80 per group: one group per column, 2 N tiles per group
    ((40, 40, 3, 1, 1, 1, 40), (1, True)),  # depthwise, C not a multiple of BLOCK_N
    ((96, 96, 3, 2, 2, 2, 96), (1, True)),  # depthwise, strided and dilated
    ((8, 16, 3, 1, 1, 1, 8), (1, True)),  # depthwise with channel multiplier 2
    ((64, 64, 1, 1, 0, 1, 16), (4, False)),  # grouped 1x1
]


@pytest.mark.parametrize("conv,tiling", GROUPED, ids=[str(c) for c, _ in GROUPED])
def test_grouped_tiling(conv, tiling):
    """The shapes below really take the multi-group (G_TILE > 1) and the depthwise (DIRECT) paths."""
    from resfast.backends.triton.kernels.conv import conv_tiling

    cin, cout, _, _, _, _, g = conv
    g_tile, direct, block_n, cols = conv_tiling(cout, cin // g, cout // g, g)
    assert (g_tile, direct) == tiling
    assert block_n >= 16 and block_n * cols >= cout
    if not direct:
        assert g_tile * cout // g <= block_n or g_tile == 1


@pytest.mark.slow
@pytest.mark.parametrize("conv", [c for c, _ in GROUPED], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 6), (1, 1, 1), (1, 7, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grouped_matches_reference(conv, shape, dtype):
    out, ref = _run(conv, shape, dtype, channels_last=True, residual=True, relu=True, bias=True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("conv", [GROUPED[0][0], GROUPED[3][0], GROUPED[7][0]], ids=str)
def test_grouped_nchw_and_bn_relu_conv(conv):
    """NCHW input (strided channel loads) and the pre-activation prologue on the multi-group and depthwise paths."""
    out, ref = _run(conv, (2, 4, 5), torch.float64, channels_last=False, residual=False, relu=False, bias=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    cin, cout, k, s, p, d, g = conv
    x = torch.randn(2, cin, 5, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(cout, cin // g, k, k, dtype=torch.float64, device=DEVICE) * 0.3
    bn = _bn(cin, torch.float64).to(DEVICE)
    ref = ops.bn_relu_conv_ref(x, bn, w, stride=s, padding=p, dilation=d, groups=g)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.bn_relu_conv(x, bn, w, stride=s, padding=p, dilation=d, groups=g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(groups=st.sampled_from([2, 3, 5, 8, 32]), cin_g=st.sampled_from([1, 2, 4, 8]),
       cout_g=st.sampled_from([1, 3, 4, 8]), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       hw=st.tuples(st.integers(1, 6), st.integers(1, 6)))
@pytest.mark.slow
def test_grouped_hypothesis(groups, cin_g, cout_g, k, stride, hw):
    out, ref = _run((cin_g * groups, cout_g * groups, k, stride, k // 2, 1, groups), (1, *hw), torch.float64,
                    channels_last=True, residual=False, relu=True, bias=False)
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
    x = torch.randn(2, 32, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out, ref = block_through("triton", blk, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_training_and_gradients_run_on_triton():
    """Training BatchNorm and inputs that require grad go to the training ops (tests/test_training.py
    checks them in depth); an explicit backend request no longer refuses them."""
    x, w = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(4, 4, 1, 1, device=DEVICE)
    bn, bn_ref = nn.BatchNorm2d(4).to(DEVICE), nn.BatchNorm2d(4).to(DEVICE)
    with resfast.backend("triton"):
        out = ops.conv_bn_relu(x, w, bn, training=True)
        out_grad = ops.conv_bn_relu(x, w.clone().requires_grad_(), bn.eval())
    torch.testing.assert_close(out, conv_bn_relu_ref(x, w, bn_ref, training=True), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert out_grad.requires_grad


def test_auto_does_not_pick_unverified_triton():
    """Until the kernels are verified on a GPU, `auto` passes over Triton even where it could run (to the C++ cpu
    backend for CPU tensors, to eager for CUDA tensors)."""
    assert not dispatch.get("triton").verified_on_gpu
    from resfast.ops._args import prepare_conv_bn_relu

    a = prepare_conv_bn_relu(torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(4, 4, 1, 1, device=DEVICE),
                             nn.BatchNorm2d(4).eval().to(DEVICE), None, 1, 0, 1, 1, False, True, None)
    with resfast.backend("auto"), torch.no_grad():
        assert dispatch.select("conv_bn_relu", a).name == ("cpu" if DEVICE == "cpu" else "eager")
    with resfast.backend("triton"), torch.no_grad():
        assert dispatch.select("conv_bn_relu", a).name == "triton"


def test_one_config_under_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 the launches run a single config and never benchmark."""
    from resfast.backends.triton.kernels import conv

    if not INTERPRET:
        assert conv.tuning_configs() == conv.CONFIGS and len(conv.CONFIGS) > 1
        return
    assert conv.tuning_configs() == conv.CONFIGS[:1]
    assert len(conv._tuned_kernel.configs) == 1

    def no_bench(*a, **k):
        raise AssertionError("benchmarked under the interpreter")

    monkeypatch.setitem(conv._tuned_kernel.__dict__, "do_bench", no_bench)  # Autotuner.do_bench is a cached_property
    out, ref = _run(CONVS[2], (2, 5, 6), torch.float64, True, False, True, False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_autotune_benchmarks_once_per_shape(monkeypatch):
    """With several configs (as on a GPU; the benchmark replaced by a counter so it runs on the CPU too), the first
    call of a shape benchmarks each config that fits, later calls reuse the cached winner, and a new shape or
    dtype is tuned anew."""
    from resfast.backends.triton.kernels import conv

    benches = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        benches.append(1)
        t = {2: 0.5}.get(len(benches) % 3, 1.0)  # the second config tried wins
        return [t, t, t]

    tuned = conv.make_tuned_kernel(conv.CONFIGS[:3], do_bench=fake_bench)
    monkeypatch.setattr(conv, "_tuned_kernel", tuned)
    conv_a = (8, 8, 3, 1, 1, 1, 1)  # K = 72: BLOCK_K 32 and 64 fit; M = 2 * 8 * 8 = 128: BLOCK_M 128 fits
    for _ in range(2):
        out, ref = _run(conv_a, (2, 8, 8), torch.float64, True, False, True, False)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        assert len(benches) == 3 and len(tuned.cache) == 1
    assert tuned.best_config is conv.CONFIGS[1]
    out, ref = _run(conv_a, (2, 8, 8), torch.float32, True, False, True, False)  # dtype is part of the key
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(benches) == 6 and len(tuned.cache) == 2
    # M = 9: no BLOCK_M is that small, the first config is kept (and benchmarked once)
    out, ref = _run(conv_a, (1, 3, 3), torch.float64, True, False, True, False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert len(benches) == 7 and len(tuned.cache) == 3
    _run(conv_a, (1, 3, 3), torch.float64, True, False, True, False)
    assert len(benches) == 7


# (C_in', H', W', stride of the shortcut; C_mid and k of the main conv; C_out): ResNet stage entries, odd sizes,
# C_in' and C_out not multiples of 8, a shortcut K smaller and larger than BLOCK_K
SHORTCUTS = [(6, 7, 9, 2, 5, 1, 8), (16, 5, 5, 1, 4, 1, 24), (3, 1, 1, 2, 2, 3, 4), (40, 9, 4, 2, 13, 3, 17)]


@pytest.mark.slow
@pytest.mark.parametrize("case", SHORTCUTS, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_projection_shortcut_in_the_same_launch(monkeypatch, case, channels_last, dtype):
    """conv + BN + (1x1 shortcut conv + its BN) + ReLU: one launch, against two reference calls and an add."""
    from resfast.backends.triton.kernels import conv

    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("float64 runs under the interpreter only")
    cin_s, H, W, s, cmid, k, cout = case
    oh, ow = (H - 1) // s + 1, (W - 1) // s + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, cmid, oh, ow, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    xs = torch.randn(2, cin_s, H, W, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    w = torch.randn(cout, cmid, k, k, dtype=dtype, device=DEVICE)
    ws = torch.randn(cout, cin_s, 1, 1, dtype=dtype, device=DEVICE)
    bn, bns = _bn(cout, dtype).to(DEVICE), _bn(cout, dtype).to(DEVICE)
    bias = torch.randn(cout, dtype=dtype, device=DEVICE)
    ref = torch.relu(ops.conv_bn_relu_ref(x, w, bn, padding=k // 2, relu=False)
                     + ops.conv_bn_relu_ref(xs, ws, bns, bias=bias, stride=s, relu=False))
    launches = []
    real = conv._launch
    monkeypatch.setattr(conv, "_launch", lambda *a, **kw: (launches.append(1), real(*a, **kw)))
    with resfast.backend("triton"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, padding=k // 2, shortcut=ops.ConvShortcut(xs, ws, bns, s, bias))
    assert len(launches) == 1
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_projection_shortcut_zero_batch_and_training():
    x, xs = torch.randn(0, 4, 3, 3, device=DEVICE), torch.randn(0, 6, 5, 5, device=DEVICE)
    w, ws = torch.randn(8, 4, 1, 1, device=DEVICE), torch.randn(8, 6, 1, 1, device=DEVICE)
    bn, bns = _bn(8, torch.float32).to(DEVICE), _bn(8, torch.float32).to(DEVICE)
    with resfast.backend("triton"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, shortcut=ops.ConvShortcut(xs, ws, bns, 2))
    assert out.shape == (0, 8, 3, 3)
    # batch statistics in the shortcut's BatchNorm, and weights that require grad: the training ops
    x, xs = torch.randn(2, 4, 3, 3, device=DEVICE), torch.randn(2, 6, 5, 5, device=DEVICE)
    no_stats = ops.BatchNormParams(bns.weight, bns.bias, None, None, None, 0.1, 1e-5)  # always batch statistics
    ref = conv_bn_relu_ref(x, w, bn, shortcut=ops.ConvShortcut(xs, ws, no_stats, 2))
    with resfast.backend("triton"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, shortcut=ops.ConvShortcut(xs, ws, no_stats, 2))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with resfast.backend("triton"):
        out = ops.conv_bn_relu(x, w, bn, shortcut=ops.ConvShortcut(xs, ws.clone().requires_grad_(), bns.eval(), 2))
    assert out.requires_grad
