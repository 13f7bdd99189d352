"""The fused backends in training (and eval with gradients): forward, every gradient and the BatchNorm buffers
against the eager reference, float64 gradcheck of every training op, nn.BatchNorm2d's buffer rules, the awkward
inputs (zero and negative gamma, expanded or non-contiguous grad_output, |x| ~ 1e30), whole converted blocks over
several steps, and torch.compile of a training step.

Every test runs once per fused backend that can run here (the `be` fixture): `triton` (CPU under TRITON_INTERPRET=1
in CI, float32/float64, small shapes; compiled kernels on a GPU), `cpu` (the C++ training ops of resfast._C on CPU
tensors) and, on a GPU, `cuda` (the same C++ ops with the CUDA kernels). GPU runs use float32 with TF32 off; the
fp16/bf16 2x-rule checks are in tests/test_gpu.py."""

import copy
import functools
import importlib.util
from typing import NamedTuple

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET, randomize_bn
from torch import nn

import resfast
from resfast import ops
from resfast.ops import dispatch
from resfast.ops.reference import bn_relu_conv_ref, conv_bn_relu_ref, res2net_chain_ref

F64 = torch.float64


class Backend(NamedTuple):
    name: str
    device: str
    dtypes: tuple  # the dtypes its tests run in (float64: gradcheck and the 1e-9 comparisons)


def _backends():
    found = []
    if importlib.util.find_spec("triton") is not None and (TRITON_INTERPRET or torch.cuda.is_available()):
        found.append(Backend("triton", TRITON_DEVICE, (torch.float32, F64) if TRITON_INTERPRET else (torch.float32,)))
    if not dispatch.get("cpu").static_reasons("conv_bn_relu"):
        found.append(Backend("cpu", "cpu", (torch.float32, F64)))
    if not dispatch.get("cuda").static_reasons("conv_bn_relu"):
        found.append(Backend("cuda", "cuda", (torch.float32, F64)))
    return found


BACKENDS = _backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend can run training here")


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def be(request):
    return request.param


def _needs_dtype(be, dtype=F64):
    if dtype not in be.dtypes:
        pytest.skip(f"{be.name} on {be.device} does not run {dtype} in these tests")


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


def _x(*shape, dtype, device, cl=True, grad=True):
    t = torch.randn(*shape, dtype=dtype, device=device)
    t = t.contiguous(memory_format=torch.channels_last) if cl else t
    return t.requires_grad_(grad)


def _bn(C, dtype, device, gamma=None, **kw):
    bn = nn.BatchNorm2d(C, dtype=dtype, device=device, **kw)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(-1.5, 1.5) if gamma is None else bn.weight.fill_(gamma)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def _leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def _bn_leaves(bns):
    return [t for bn in bns for t in (bn.weight, bn.bias) if t is not None and t.requires_grad]


def _check(be, fn_fused, fn_ref, inputs, bns, dtype, grad_out=None):
    """Output, gradients of every leaf and the BatchNorms' buffers: backend `be` vs eager on identical copies."""
    bns_ref = copy.deepcopy(bns)
    with resfast.backend(be.name):
        out = fn_fused(bns)
    ref = fn_ref(bns_ref)
    tol = _tol(dtype)
    torch.testing.assert_close(out, ref, **tol)
    if be.name == "triton":  # Triton writes channels_last; the C++ ops keep the input's layout, as eager
        assert out.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(bns, bns_ref):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            ta, tb = getattr(a, name, None), getattr(b, name, None)
            assert (ta is None) == (tb is None)
            if ta is not None:
                torch.testing.assert_close(ta, tb, **tol, msg=lambda m, name=name: f"{name}: {m}")
    g = torch.randn_like(ref) if grad_out is None else grad_out
    g_before = g.clone()
    leaves, leaves_ref = _leaves(*inputs) + _bn_leaves(bns), _leaves(*inputs) + _bn_leaves(bns_ref)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, leaves_ref, g, allow_unused=True)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"gradient {i}: {m}")
    torch.testing.assert_close(g, g_before, rtol=0, atol=0)  # grad_output is never written
    return out


# --- conv_bn_relu ------------------------------------------------------------------------------------------------

CONV_CASES = [
    # (N, C_in, H, W, C_out, k, stride, padding, dilation, groups, relu, residual, channels_last)
    (2, 6, 7, 5, 8, 3, 1, 1, 1, 1, True, True, True),
    (2, 8, 5, 6, 8, 3, 2, 1, 1, 4, True, False, False),   # grouped, strided, NCHW
    (1, 6, 6, 6, 6, 3, 1, 2, 2, 6, False, True, True),    # depthwise, dilated, no ReLU
    (3, 5, 4, 3, 7, 1, 1, 0, 1, 1, True, False, True),    # odd channel counts, 1x1
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[9]}")
def test_conv_bn_relu_training(be, case, dtype):
    _needs_dtype(be, dtype)
    N, C, H, W, Co, k, s, p, d, g, relu, has_res, cl = case
    x = _x(N, C, H, W, dtype=dtype, device=be.device, cl=cl)
    w = (torch.randn(Co, C // g, k, k, dtype=dtype, device=be.device) * 0.5).requires_grad_()
    b = torch.randn(Co, dtype=dtype, device=be.device, requires_grad=True)
    Ho, Wo = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
    res = _x(N, Co, Ho, Wo, dtype=dtype, device=be.device, cl=not cl) if has_res else None
    kw = dict(bias=b, stride=s, padding=p, dilation=d, groups=g, relu=relu, residual=res, training=True)
    for _ in range(2):  # the second step starts from the updated running statistics
        bns = [_bn(Co, dtype, be.device)]
        _check(be, lambda bns: ops.conv_bn_relu(x, w, bns[0], **kw), lambda bns: conv_bn_relu_ref(x, w, bns[0], **kw),
               [x, w, b, res], bns, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_conv_bn_relu_projection_shortcut_training(be, dtype):
    _needs_dtype(be, dtype)
    x, xs = _x(2, 4, 5, 4, dtype=dtype, device=be.device), _x(2, 6, 9, 7, dtype=dtype, device=be.device, cl=False)
    w = torch.randn(8, 4, 1, 1, dtype=dtype, device=be.device, requires_grad=True)
    ws = torch.randn(8, 6, 1, 1, dtype=dtype, device=be.device, requires_grad=True)
    bns = [_bn(8, dtype, be.device), _bn(8, dtype, be.device)]
    _check(be, lambda bns: ops.conv_bn_relu(x, w, bns[0], training=True, shortcut=ops.ConvShortcut(xs, ws, bns[1], 2)),
           lambda bns: conv_bn_relu_ref(x, w, bns[0], training=True, shortcut=ops.ConvShortcut(xs, ws, bns[1], 2)),
           [x, xs, w, ws], bns, dtype)


@pytest.mark.parametrize("variant", ["momentum_none", "no_tracking", "buffers_not_tracked", "affine_false",
                                     "gamma_zero", "gamma_negative", "eval_with_grad", "frozen"])
@pytest.mark.slow
def test_batchnorm_variants(be, variant):
    """nn.BatchNorm2d's rules (momentum=None, track_running_stats False at construction or switched off later,
    affine=False), timm's zero_init_last (gamma = 0) and negative gamma, eval mode with gradients (running
    statistics), FrozenBatchNorm2d: forward, gradients and buffers as eager, over three steps."""
    dtype = be.dtypes[-1]
    x = _x(2, 6, 5, 4, dtype=dtype, device=be.device)
    w = torch.randn(6, 6, 3, 3, dtype=dtype, device=be.device, requires_grad=True)
    res = _x(2, 6, 5, 4, dtype=dtype, device=be.device)
    training = variant != "eval_with_grad"
    for _ in range(3):
        if variant == "frozen":
            tv = pytest.importorskip("torchvision.ops")
            bn = randomize_bn(tv.FrozenBatchNorm2d(6).to(dtype)).to(be.device)
        else:
            kw = {"momentum_none": dict(momentum=None), "no_tracking": dict(track_running_stats=False),
                  "affine_false": dict(affine=False)}.get(variant, {})
            gamma = {"gamma_zero": 0.0, "gamma_negative": -0.7}.get(variant)
            bn = _bn(6, dtype, be.device, gamma=gamma, **kw)
            if variant == "buffers_not_tracked":
                bn.track_running_stats = False
            if variant == "eval_with_grad":
                randomize_bn(bn)
        _check(be, lambda bns: ops.conv_bn_relu(x, w, bns[0], padding=1, residual=res, training=training),
               lambda bns: conv_bn_relu_ref(x, w, bns[0], padding=1, residual=res, training=training),
               [x, w, res], [bn], dtype)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["expanded", "transposed"])
def test_awkward_grad_output(be, kind):
    """grad_output expanded from a scalar (the backward of .sum(): stride 0) or non-contiguous: read through its
    strides, never written."""
    dtype = be.dtypes[-1]
    x = _x(2, 6, 5, 4, dtype=dtype, device=be.device)
    w = torch.randn(8, 6, 3, 3, dtype=dtype, device=be.device, requires_grad=True)
    g = (torch.ones((), dtype=dtype, device=be.device).expand(2, 8, 5, 4) if kind == "expanded"
         else torch.randn(2, 8, 4, 5, dtype=dtype, device=be.device).transpose(2, 3))
    _check(be, lambda bns: ops.conv_bn_relu(x, w, bns[0], padding=1, training=True),
           lambda bns: conv_bn_relu_ref(x, w, bns[0], padding=1, training=True), [x, w],
           [_bn(8, dtype, be.device)], dtype, grad_out=g)
    _check(be, lambda bns: ops.res2net_chain(x, [w[:2, :2]] * 2, bns, scale=3, training=True),
           lambda bns: res2net_chain_ref(x, [w[:2, :2]] * 2, bns, scale=3, training=True), [x, w],
           [_bn(2, dtype, be.device), _bn(2, dtype, be.device)], dtype, grad_out=g[:, :6])


def test_statistics_of_huge_values_do_not_overflow(be):
    """|x| ~ 1e30 in float32: a plain sum of squares overflows, and a mean that is off by rounding leaves a squared
    error of ~1e45 (inf in fp32). The backends' merges (Triton's tile-shifted partials, the C++ kernels' weighted
    averages) give equal values their exact mean and a zero variance, so the output is exactly beta and the running
    statistics are exact (eager on the CPU is off by ~1e24 here)."""
    x = torch.full((2, 4, 9, 9), 1e30, device=be.device)
    x[:, 1] = -3e29
    w = torch.eye(4, device=be.device).reshape(4, 4, 1, 1)
    bn = _bn(4, torch.float32, be.device)
    with resfast.backend(be.name):
        out = ops.conv_bn_relu(x, w, bn, relu=False, training=True)
        out_pre = ops.bn_relu_conv(x, bn, w, training=True)
    beta = bn.bias.detach().reshape(1, 4, 1, 1)
    torch.testing.assert_close(out, beta.expand_as(out), rtol=0, atol=0)
    torch.testing.assert_close(out_pre, beta.relu().expand_as(out_pre), rtol=0, atol=0)
    # two updates (momentum 0.1) from mean = x, var = 0: 0.19 * x and 0.81 * 1
    mean = torch.tensor([1e30, -3e29, 1e30, 1e30], device=be.device)
    torch.testing.assert_close(bn.running_mean, 0.19 * mean)
    torch.testing.assert_close(bn.running_var, torch.full((4,), 0.81, device=be.device))


# --- bn_relu_conv ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("case", [(2, 6, 5, 4, 8, 3, 1, 1, 1, True), (3, 9, 6, 5, 9, 3, 2, 1, 3, False),
                                  (2, 7, 4, 4, 5, 1, 1, 0, 1, True)], ids=str)
@pytest.mark.slow
def test_bn_relu_conv_training(be, case, dtype):
    _needs_dtype(be, dtype)
    N, C, H, W, Co, k, s, p, g, has_res = case
    x = _x(N, C, H, W, dtype=dtype, device=be.device, cl=g == 1)
    w = (torch.randn(Co, C // g, k, k, dtype=dtype, device=be.device) * 0.5).requires_grad_()
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    res = _x(N, Co, Ho, Wo, dtype=dtype, device=be.device) if has_res else None
    kw = dict(stride=s, padding=p, groups=g, residual=res, training=True)
    for _ in range(2):
        _check(be, lambda bns: ops.bn_relu_conv(x, bns[0], w, **kw), lambda bns: bn_relu_conv_ref(x, bns[0], w, **kw),
               [x, w, res], [_bn(C, dtype, be.device)], dtype)


# --- res2net_chain -----------------------------------------------------------------------------------------------

CHAIN_CASES = [
    # (N, scale, width, H, W, stride, groups, order, block_type)
    (2, 4, 3, 5, 4, 1, 1, "timm", "normal"),
    (2, 4, 3, 7, 5, 2, 1, "timm", "stage"),
    (1, 3, 4, 5, 5, 1, 2, "paper", "normal"),
    (2, 3, 4, 6, 5, 2, 4, "paper", "stage"),
    (2, 1, 5, 4, 4, 1, 1, "timm", "normal"),  # timm with scale 1: one conv over the whole input
    (2, 2, 6, 4, 3, 1, 1, "timm", "stage"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("case", CHAIN_CASES, ids=lambda c: f"s{c[1]}w{c[2]}-{c[7]}-{c[8]}-st{c[5]}-g{c[6]}")
def test_res2net_chain_training(be, case, dtype):
    _needs_dtype(be, dtype)
    N, scale, wd, H, W, s, g, order, bt = case
    n = max(1, scale - 1)
    x = _x(N, scale * wd, H, W, dtype=dtype, device=be.device, cl=order == "timm")
    ws = [(torch.randn(wd, wd // g, 3, 3, dtype=dtype, device=be.device) * 0.5).requires_grad_() for _ in range(n)]
    kw = dict(scale=scale, stride=s, groups=g, order=order, block_type=bt, training=True)
    for _ in range(2):
        _check(be, lambda bns: ops.res2net_chain(x, ws, bns, **kw), lambda bns: res2net_chain_ref(x, ws, bns, **kw),
               [x, *ws], [_bn(wd, dtype, be.device) for _ in range(n)], dtype)


def test_chain_writes_no_cat_and_no_split_copies(be):
    """The training chain's forward: nothing of the activation's size is concatenated, split or cloned (the convs or
    the apply passes write their slices). Triton: no aten op at all copies an activation. C++ ops (their inner aten
    calls seen by the profiler): no cat and no split (ATen's convolutions may still make a strided split input
    dense, or change a tiny output's layout: what the Triton convolutions avoid by reading in place)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = _x(2, 12, 5, 4, dtype=torch.float32, device=be.device, grad=False)
    ws = [torch.randn(3, 3, 3, 3, device=be.device) for _ in range(3)]
    bns = [_bn(3, torch.float32, be.device) for _ in range(3)]
    if be.name != "triton":
        with resfast.backend(be.name), torch.profiler.profile() as prof:
            ops.res2net_chain(x, ws, bns, scale=4, training=True)
        names = [e.name for e in prof.events()]
        assert "resfast::res2net_chain_train" in names
        assert not {"aten::cat", "aten::split", "aten::split_with_sizes", "aten::chunk"} & set(names), names
        return

    big = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("cat", "copy_", "clone", "add", "split", "_to_copy"):
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.numel() >= 2 * 9 * 5 * 4:
                        big.append(func.__name__)
            return out

    with resfast.backend(be.name), Log():
        ops.res2net_chain(x, ws, bns, scale=4, training=True)
    assert big == []


# --- gradcheck (float64) -----------------------------------------------------------------------------------------

def _gradcheck(fn, inputs, fast, be=None):
    # Triton runs float64 only under the interpreter, where the full Jacobian costs minutes (two interpreted
    # launches per input element): fast mode there (a random projection of the Jacobian, which a wrong gradient
    # still fails); its gradients are also compared element by element with eager autograd's in float64 (the
    # *_training tests). The cpu backend checks the full Jacobian.
    fast = fast or (be is not None and be.name == "triton")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_conv_bn_relu(be, training):
    _needs_dtype(be)
    x = _x(2, 3, 4, 3, dtype=F64, device=be.device)
    w = torch.randn(4, 3, 3, 3, dtype=F64, device=be.device, requires_grad=True)
    res = _x(2, 4, 2, 2, dtype=F64, device=be.device)
    bn = randomize_bn(_bn(4, F64, be.device))
    g, b = bn.weight, bn.bias

    def fn(x, w, g, b, res):
        p = ops.BatchNormParams(g, b, bn.running_mean, bn.running_var, bn.num_batches_tracked, 0.1, 1e-5)
        with resfast.backend(be.name):
            return ops.conv_bn_relu(x, w, p, stride=2, padding=1, residual=res, training=training)

    _gradcheck(fn, (x, w, g, b, res), fast=False, be=be)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_conv_bn_projection(be, training):
    _needs_dtype(be)
    x, xs = _x(2, 3, 3, 3, dtype=F64, device=be.device), _x(2, 2, 5, 5, dtype=F64, device=be.device)
    w = torch.randn(4, 3, 1, 1, dtype=F64, device=be.device, requires_grad=True)
    ws = torch.randn(4, 2, 1, 1, dtype=F64, device=be.device, requires_grad=True)
    bn, bns = randomize_bn(_bn(4, F64, be.device)), randomize_bn(_bn(4, F64, be.device))

    def fn(x, xs, w, ws, g, gs):
        main = ops.BatchNormParams(g, bn.bias, bn.running_mean, bn.running_var)
        short = ops.BatchNormParams(gs, bns.bias, bns.running_mean, bns.running_var)
        with resfast.backend(be.name):
            return ops.conv_bn_relu(x, w, main, training=training, shortcut=ops.ConvShortcut(xs, ws, short, 2))

    _gradcheck(fn, (x, xs, w, ws, bn.weight, bns.weight), fast=True)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_bn_relu_conv(be, training):
    _needs_dtype(be)
    x = _x(2, 3, 4, 3, dtype=F64, device=be.device)
    w = torch.randn(4, 3, 3, 3, dtype=F64, device=be.device, requires_grad=True)
    bn = randomize_bn(_bn(3, F64, be.device))

    def fn(x, w, g, b):
        p = ops.BatchNormParams(g, b, bn.running_mean, bn.running_var, bn.num_batches_tracked, 0.1, 1e-5)
        with resfast.backend(be.name):
            return ops.bn_relu_conv(x, p, w, padding=1, training=training)

    _gradcheck(fn, (x, w, bn.weight, bn.bias), fast=False, be=be)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("order,block_type,stride", [("timm", "normal", 1), ("paper", "stage", 2)])
def test_gradcheck_res2net_chain(be, order, block_type, stride, training):
    _needs_dtype(be)
    x = _x(2, 6, 4, 3, dtype=F64, device=be.device)
    ws = [torch.randn(2, 2, 3, 3, dtype=F64, device=be.device, requires_grad=True) for _ in range(2)]
    bns = [randomize_bn(_bn(2, F64, be.device)) for _ in range(2)]

    def fn(x, w0, w1, g0, g1, b0, b1):
        ps = [ops.BatchNormParams(g, b, bn.running_mean, bn.running_var) for g, b, bn in zip((g0, g1), (b0, b1), bns)]
        with resfast.backend(be.name):
            return ops.res2net_chain(x, [w0, w1], ps, scale=3, stride=stride, order=order, block_type=block_type,
                                     training=training)

    # the full Jacobian once (training, timm order: every gradient route of the normal chain), fast mode elsewhere
    _gradcheck(fn, (x, *ws, *[bn.weight for bn in bns], *[bn.bias for bn in bns]),
               fast=not (training and order == "timm"), be=be)


@pytest.mark.slow
def test_opcheck_training_ops(be):
    """schema, autograd registration, fake tensors (strides equal to the real kernels') and AOT dispatch of the
    training ops and their backward ops, in float64."""
    _needs_dtype(be)
    if be.name == "triton":
        from resfast.backends.triton import training  # noqa: F401

        tops = torch.ops.resfast_triton
    else:
        tops = torch.ops.resfast
    x = _x(2, 6, 5, 4, dtype=F64, device=be.device)
    w = torch.randn(4, 6, 3, 3, dtype=F64, device=be.device, requires_grad=True)
    g = torch.rand(4, dtype=F64, device=be.device) + 0.5
    b = torch.randn(4, dtype=F64, device=be.device)
    res = _x(2, 4, 5, 4, dtype=F64, device=be.device)
    torch.library.opcheck(tops.conv_bn_train, (x, w, None, g, b, res, None, None, [1, 1], [1, 1], [1, 1], 1, True,
                                               1e-5))
    w2 = torch.randn(4, 3, 3, 3, dtype=F64, device=be.device, requires_grad=True)
    torch.library.opcheck(tops.conv_bn_train, (x, w2, b, None, None, None, g, g, [2, 2], [1, 1], [1, 1], 2, False,
                                               1e-5))
    g6, b6 = torch.rand(6, dtype=F64, device=be.device) + 0.5, torch.randn(6, dtype=F64, device=be.device)
    torch.library.opcheck(tops.bn_relu_conv_train, (x, g6, b6, None, None, w, None, res, [1, 1], [1, 1], [1, 1],
                                                    1, 1e-5))
    ws = [torch.randn(2, 2, 3, 3, dtype=F64, device=be.device, requires_grad=True) for _ in range(2)]
    g2 = [torch.rand(2, dtype=F64, device=be.device) + 0.5 for _ in range(2)]
    torch.library.opcheck(tops.res2net_chain_train, (x, ws, [], g2, g2, None, None, 3, 1, 1, 1, "timm", "normal",
                                                     [1e-5, 1e-5]))
    ws_g = [torch.randn(2, 1, 3, 3, dtype=F64, device=be.device, requires_grad=True) for _ in range(2)]
    torch.library.opcheck(tops.res2net_chain_train, (x, ws_g, [], [], [], None, None, 3, 2, 1, 2, "paper", "stage",
                                                     [1e-5, 1e-3]))


# --- blocks ------------------------------------------------------------------------------------------------------

def _blocks():
    tv = pytest.importorskip("torchvision.models.resnet")
    timm_res2net = pytest.importorskip("timm.models.res2net")
    timm_v2 = pytest.importorskip("timm.models.resnetv2")
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    yield "torchvision-bottleneck-downsample", tv.Bottleneck(8, 4, stride=2, downsample=down), 8
    d2 = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    bn = dict(norm_layer=nn.BatchNorm2d)
    yield "timm-bottle2neck-stage", timm_res2net.Bottle2neck(8, 4, downsample=d2, base_width=26, scale=4, **bn), 8
    yield ("timm-bottle2neck-normal", timm_res2net.Bottle2neck(16, 4, base_width=26, scale=4, cardinality=2, **bn),
           16)
    layers = pytest.importorskip("timm.layers")
    se = functools.partial(layers.SEModule, rd_channels=8)
    yield ("timm-bottle2neck-se", timm_res2net.Bottle2neck(16, 4, base_width=26, scale=4, attn_layer=se, **bn), 16)
    yield ("timm-preact-bottleneck", timm_v2.PreActBottleneck(8, 16, stride=2, proj_layer=timm_v2.DownsampleConv,
                                                              conv_layer=layers.create_conv2d,
                                                              norm_layer=layers.BatchNormAct2d), 8)


@pytest.mark.slow
def test_converted_blocks_train_like_the_originals(be, monkeypatch):
    """Whole blocks (projection shortcut, Res2Net stage and normal chains, Res2NeXt, timm's pre-activation block),
    three training steps with SGD updates: outputs, input and parameter gradients, and every buffer as the
    originals (float64), each block through the backend's training ops (an SE block's end through Triton's
    scale_add_relu)."""
    _needs_dtype(be)
    from resfast.ops import training as tops

    calls = []

    def recording(name, fn):
        def wrapper(ns, args):
            calls.append(name)
            return fn(ns, args)
        return wrapper

    for name in ("conv_bn_relu_train", "bn_relu_conv_train", "res2net_chain_train"):
        monkeypatch.setattr(tops, name, recording(name, getattr(tops, name)))
    from resfast.nn import res2net as r2
    from resfast.nn import resnet as rn

    def recording_whole(*a, **k):
        y = whole(*a, **k)
        if y is not None:
            calls.append("res2net_bottleneck_train")
        return y

    whole = r2.res2net_bottleneck_train
    for mod in (r2, rn):
        monkeypatch.setattr(mod, "res2net_bottleneck_train", recording_whole)
    from resfast.nn import preact as preact_mod

    def recording_preact(*a, **k):
        y = whole_preact(*a, **k)
        if y is not None:
            calls.append("preact_block_train")
        return y

    whole_preact = preact_mod.preact_block_train
    monkeypatch.setattr(preact_mod, "preact_block_train", recording_preact)
    # the `cpu` backend has no scale_add_relu kernel (ATen's elementwise ops on eager are as good): no SE block there
    sar_fused = be.name == "triton"
    if be.name == "triton":
        from resfast.backends.triton import library

        def recording_sar(*a):
            calls.append("scale_add_relu")
            return sar(*a)

        sar = library.scale_add_relu_fwd
        monkeypatch.setattr(library, "scale_add_relu_fwd", recording_sar)
    for name, block, cin in _blocks():
        if "-se" in name and not sar_fused:
            continue
        calls.clear()
        orig = randomize_bn(block.to(F64)).to(be.device).train()
        new = resfast.convert(copy.deepcopy(orig))
        assert type(new) is not type(orig), name
        opt_a = torch.optim.SGD(orig.parameters(), lr=0.1, momentum=0.9)
        opt_b = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            x = _x(2, cin, 6, 5, dtype=F64, device=be.device, grad=False)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya = orig(xa)
            with resfast.backend(be.name):
                yb = new(xb)
            tol = dict(rtol=1e-9, atol=1e-9, msg=lambda m, step=step, name=name: f"{name}, step {step}: {m}")
            torch.testing.assert_close(yb, ya, **tol)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            torch.testing.assert_close(xb.grad, xa.grad, **tol)
            for (_k, pa), (_, pb) in zip(orig.named_parameters(), new.named_parameters()):
                torch.testing.assert_close(pb.grad, pa.grad, **tol)
            opt_a.step()
            opt_b.step()
            opt_a.zero_grad()
            opt_b.zero_grad()
            for (_k, ba), (_, bb) in zip(orig.state_dict().items(), new.state_dict().items()):
                torch.testing.assert_close(bb, ba, **tol)
        expected = {"res2net_chain_train", "conv_bn_relu_train"} if "bottle2neck" in name else {"conv_bn_relu_train"}
        if ("bottle2neck" in name and "-se" not in name or "torchvision-bottleneck" in name) and be.name == "triton":
            # the whole-bottleneck op (and the downsample's conv_bn_relu op)
            expected = {"res2net_bottleneck_train"} | ({"conv_bn_relu_train"} if "stage" in name or "down" in name
                                                       else set())
        if "preact" in name:  # Triton: the whole pre-activation block, its downsample included
            expected = {"preact_block_train"} if be.name == "triton" else {"bn_relu_conv_train"}
        if "-se" in name and sar_fused:
            expected.add("scale_add_relu")
        assert expected <= set(calls), (name, calls)
        if "res2net_bottleneck_train" in expected:  # and no per-op chain
            assert "res2net_chain_train" not in calls, (name, calls)
        if "preact_block_train" in expected:  # and no per-op unit
            assert "bn_relu_conv_train" not in calls, (name, calls)


@pytest.mark.slow
def test_compile_training_step_matches_eager(be):
    """torch.compile (aot_eager under the interpreter, inductor on a GPU) of a training step of converted blocks
    (Res2Net stage and normal, timm's pre-activation bottleneck with its downsample; forward, backward, SGD) through
    the backend: loss, parameters and BatchNorm buffers as eager."""
    timm_res2net = pytest.importorskip("timm.models.res2net")
    torch._dynamo.reset()
    d2 = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    bn = dict(norm_layer=nn.BatchNorm2d)
    timm_v2 = pytest.importorskip("timm.models.resnetv2")
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_res2net.Bottle2neck(8, 4, downsample=d2, base_width=26, scale=4, **bn),
                          timm_res2net.Bottle2neck(16, 4, base_width=26, scale=4, **bn),
                          timm_v2.PreActBottleneck(16, 32, stride=2, proj_layer=timm_v2.DownsampleConv,
                                                   conv_layer=layers.create_conv2d, norm_layer=layers.BatchNormAct2d))
    model = randomize_bn(model).to(be.device)
    eager, compiled = resfast.convert(copy.deepcopy(model)), resfast.convert(copy.deepcopy(model))
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.05)

    def step(m, opt, x):
        loss = m(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    cstep = torch.compile(step, backend="aot_eager" if be.device == "cpu" else "inductor")
    for _i in range(2):
        x = torch.randn(2, 8, 6, 5, device=be.device).contiguous(memory_format=torch.channels_last)
        with resfast.backend(be.name):
            le = step(eager, opt_e, x)
            lc = cstep(compiled, opt_c, x)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_autocast_dtype_decides_the_backend(be):
    """Under torch.autocast the convolutions run in the autocast dtype: on the CPU that is bfloat16, which neither the
    interpreter nor the cpu backend trains in, so an explicit request names it and auto falls back (the GPU tests
    train under AMP)."""
    if be.device != "cpu":
        pytest.skip("CPU autocast")
    x = _x(2, 4, 3, 3, dtype=torch.float32, device=be.device, grad=False)
    w = torch.randn(4, 4, 1, 1, device=be.device)
    with torch.autocast("cpu", torch.bfloat16):
        with resfast.backend(be.name), pytest.raises(resfast.BackendUnavailableError, match="torch.bfloat16"):
            ops.conv_bn_relu(x, w, _bn(4, torch.float32, be.device), training=True)
        with resfast.backend("auto"):
            out = ops.conv_bn_relu(x, w, _bn(4, torch.float32, be.device), training=True)
    assert out.dtype == torch.bfloat16


def test_chain_without_convs_and_empty_batches(be):
    """Paper order with scale 1 (no conv: the pass-through alone) with gradients, and empty batches in training:
    outputs and gradients as eager, running buffers untouched and num_batches_tracked counted (F.batch_norm's
    rule for an empty input)."""
    _needs_dtype(be)
    x = _x(2, 4, 5, 5, dtype=F64, device=be.device)
    kw = dict(scale=1, order="paper", block_type="stage", stride=2, training=True)
    _check(be, lambda bns: ops.res2net_chain(x, [], bns, **kw), lambda bns: res2net_chain_ref(x, [], bns, **kw), [x],
           [], F64)
    empty = _x(0, 6, 5, 4, dtype=F64, device=be.device)
    w = torch.randn(6, 6, 3, 3, dtype=F64, device=be.device, requires_grad=True)
    _check(be, lambda bns: ops.conv_bn_relu(empty, w, bns[0], padding=1, training=True),
           lambda bns: conv_bn_relu_ref(empty, w, bns[0], padding=1, training=True), [empty, w],
           [_bn(6, F64, be.device)], F64)
    _check(be, lambda bns: ops.bn_relu_conv(empty, bns[0], w, padding=1, training=True),
           lambda bns: bn_relu_conv_ref(empty, bns[0], w, padding=1, training=True), [empty, w],
           [_bn(6, F64, be.device)], F64)
    _check(be, lambda bns: ops.res2net_chain(empty, [w[:2, :2]] * 2, bns, scale=3, training=True),
           lambda bns: res2net_chain_ref(empty, [w[:2, :2]] * 2, bns, scale=3, training=True), [empty, w],
           [_bn(2, F64, be.device), _bn(2, F64, be.device)], F64)


def test_autocast_keeps_what_eager_keeps(be):
    """Under autocast, bn_relu_conv's input and the chain's input are normalised / passed through in their own dtype
    by eager, and a residual keeps its dtype through the add: the fused backends refuse to round them (auto runs
    eager), and says so."""
    from resfast.ops._args import prepare_bn_relu_conv, prepare_conv_bn_relu

    if be.device == "cpu" and be.name == "cpu":
        pytest.skip("the cpu backend does not train in bfloat16 (it names the dtype: test_autocast_dtype_...)")

    x = torch.randn(2, 4, 3, 3, device=be.device)
    w = torch.randn(4, 4, 1, 1, device=be.device)
    bn = _bn(4, torch.float32, be.device)
    with torch.autocast(be.device, torch.bfloat16):
        r1 = dispatch.get(be.name).not_supported_reasons(
            "bn_relu_conv", prepare_bn_relu_conv(x, bn, w, None, 1, 0, 1, 1, True, None))
        r2 = dispatch.get(be.name).not_supported_reasons(
            "conv_bn_relu", prepare_conv_bn_relu(x, w, bn, None, 1, 0, 1, 1, True, True, x))
    assert any("the input is torch.float32, not the autocast dtype torch.bfloat16" in r for r in r1), r1
    assert any("the residual is torch.float32" in r for r in r2), r2
    assert not any("the input is" in r for r in r2)  # conv_bn_relu casts its input as F.conv2d would


# --- what a fused block keeps for backward ---------------------------------------------------------------------------

def _saved_bytes(fn):
    """fn()'s output and the bytes of every distinct storage autograd saved for its backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _res2net_block(stage: bool, device):
    from resfast.nn.res2net import Bottle2neck

    down = nn.Sequential(nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64)) if stage else None
    block = Bottle2neck(16 if stage else 64, 16, downsample=down, base_width=26, scale=4)  # width 6, 24 channels
    return randomize_bn(block).to(device).train()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [False, True], ids=["normal", "stage"])
def test_block_saves_raw_conv_outputs_not_activations(be, stage, monkeypatch):
    """A Res2Net bottleneck in training saves its input, the raw conv outputs, statistics and its output: without
    the recompute scope it would save relu(bn1(z1)) and the chain's output instead of the betas their rebuild needs,
    exactly those bytes more. Against eager's modules: under 0.8x for the normal block (0.75x by count, with the input
    both save), under 0.85x for the stage block (it also saves the shortcut's raw output, as eager does).
    The training issue's goal is 0.75x of eager's whole step: benchmarks measure that."""
    from resfast.ops import recompute as tops
    from resfast.ops.bottleneck import WHOLE_BLOCK

    block = _res2net_block(stage, be.device)
    x = _x(2, block.conv1.in_channels, 8, 8, dtype=torch.float32, device=be.device)
    with resfast.backend(be.name):
        _, whole = _saved_bytes(lambda: block(x))
        monkeypatch.setattr(WHOLE_BLOCK, "enabled", False)  # the per-op path
        _, fused = _saved_bytes(lambda: block(x))
        monkeypatch.setattr(tops, "_scope", lambda: None)
        _, unscoped = _saved_bytes(lambda: block(x))
    _, eager = _saved_bytes(lambda: block._forward_modules(x))
    act = 2 * block.conv1.out_channels * 4  # one 24-channel activation per pixel, float32
    y1, out = act * 8 * 8, act * 8 * 8  # this block's 3x3 convs keep the resolution
    betas = block.bn1.bias.nbytes + sum(bn.bias.nbytes for bn in block.bns)
    assert unscoped - fused == y1 + out - betas, (unscoped, fused)
    assert fused < (0.85 if stage else 0.8) * eager, (fused, eager)
    if be.name == "triton":
        # the whole-bottleneck op keeps the same tensors, plus the pass-through split's output (its slot of Zc; the
        # per-op chain rebuilds it from its input) and the variance and scale rows of its one statistics buffer
        L = block.conv1.out_channels + block.width * (block.scale - 1) + block.conv3.out_channels
        assert whole - fused == act // block.scale * 8 * 8 + 2 * L * 4, (whole, fused)


@pytest.mark.slow
def test_activations_rebuilt_once_per_backward(be, monkeypatch):
    """Backward rebuilds relu(bn1(z1)) once (used by conv1's mask, the chain's input and conv3's input) and each
    chain split's output once; a retained graph rebuilds them again for the second backward, same gradients, also
    after a partial backward that left some users unrun."""
    _needs_dtype(be)
    from resfast.ops import recompute as tops
    from resfast.ops.bottleneck import WHOLE_BLOCK

    monkeypatch.setattr(WHOLE_BLOCK, "enabled", False)  # the per-op path (Triton's whole-bottleneck op: its own test)
    block = _res2net_block(False, be.device).double()
    calls = []
    real = tops._bn_relu

    def counting(z, *a, **kw):
        calls.append(z.shape[1])
        return real(z, *a, **kw)

    monkeypatch.setattr(tops, "_bn_relu", counting)
    nodes = []
    init = tops._Rebuild.__init__

    def recording(self, *a):
        init(self, *a)
        nodes.append(self)

    monkeypatch.setattr(tops._Rebuild, "__init__", recording)
    x = _x(2, 64, 6, 5, dtype=F64, device=be.device)
    with resfast.backend(be.name):
        y = block(x)
    assert calls == []
    g = torch.randn_like(y)
    first = torch.autograd.grad(y, [x, *block.parameters()], g, retain_graph=True)
    assert sorted(calls) == [6, 6, 6, 24], calls  # bn1 over 24 channels, three chain splits of 6
    second = torch.autograd.grad(y, [x, *block.parameters()], g, retain_graph=True)
    assert len(calls) == 8
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(nodes) == 2 and all(n.value is None for n in nodes)  # nothing kept after a backward pass
    # a partial backward (conv1's backward never runs, one user of relu(bn1(z1)) unused) keeps nothing either
    torch.autograd.grad(y, list(block.convs.parameters()), g, retain_graph=True)
    assert len(calls) == 12 and all(n.value is None and n.left == n.users for n in nodes)
    torch.autograd.grad(y, [x], g, retain_graph=True)
    assert len(calls) == 16 and all(n.value is None for n in nodes), calls
    ref = copy.deepcopy(block)
    xr = x.detach().clone().requires_grad_()
    yr = ref._forward_modules(xr)
    for a, b in zip(first, torch.autograd.grad(yr, [xr, *ref.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_activation_changed_in_place_is_saved_not_rebuilt(be):
    """An activation modified in place after its op (here doubled before the chain reads it) is no longer what the
    recipe would rebuild: the chain then saves the tensor itself, and the gradients match eager's out-of-place
    doubling."""
    _needs_dtype(be)
    from resfast.ops.recompute import recompute_scope

    torch.manual_seed(0)
    w1 = torch.randn(12, 8, 1, 1, dtype=F64, device=be.device, requires_grad=True)
    ws = [torch.randn(4, 4, 3, 3, dtype=F64, device=be.device, requires_grad=True) for _ in range(2)]
    x = _x(2, 8, 5, 6, dtype=F64, device=be.device)

    def run(backend, bn1, bns, in_place):
        with resfast.backend(backend), recompute_scope():
            y1 = ops.conv_bn_relu(x, w1, bn1, training=True)
            y1 = y1.mul_(2) if in_place else y1 * 2
            out = ops.res2net_chain(y1, ws, bns, scale=3, training=True)
        return torch.autograd.grad(out, [x, w1, *ws], torch.ones_like(out))

    bn1, bns = _bn(12, F64, be.device), [_bn(4, F64, be.device) for _ in range(2)]
    ref = run("eager", copy.deepcopy(bn1), copy.deepcopy(bns), in_place=False)
    for a, b in zip(run(be.name, bn1, bns, in_place=True), ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_gradient_checkpointing_of_a_block(be):
    """torch.utils.checkpoint (non-reentrant, what timm's set_grad_checkpointing uses) over a fused block: the
    recomputed forward saves what the original saved (rebuild recipes included), the gradients are the same as
    without checkpointing. The backend choice must hold for the backward too, where the recomputation runs."""
    _needs_dtype(be)
    from torch.utils.checkpoint import checkpoint

    block = _res2net_block(False, be.device).double()
    other = copy.deepcopy(block)
    x = _x(2, 64, 6, 5, dtype=F64, device=be.device)
    x2 = x.detach().clone().requires_grad_()
    with resfast.backend(be.name):
        y = block(x)
        y2 = checkpoint(other, x2, use_reentrant=False)
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(block.parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_rebuilt_activations_equal_the_forward_ones(be, dtype):
    """What backward rebuilds is what the forward passed on: relu(bn1(z1)) and the chain's output (stage block: the
    pooled pass-through split too), bit for bit: the rebuild runs the forward's own apply kernel (Triton's, or the
    C++ ops' bn_relu_apply_)."""
    _needs_dtype(be, dtype)
    from resfast.ops import recompute as tops

    torch.manual_seed(0)
    x = _x(2, 8, 7, 6, dtype=dtype, device=be.device)
    w1 = torch.randn(12, 8, 1, 1, dtype=dtype, device=be.device, requires_grad=True)
    ws = [torch.randn(4, 4, 3, 3, dtype=dtype, device=be.device, requires_grad=True) for _ in range(2)]
    for block_type, stride in (("normal", 1), ("stage", 2)):
        with resfast.backend(be.name), tops.recompute_scope():
            y1 = ops.conv_bn_relu(x, w1, _bn(12, dtype, be.device), training=True)
            out = ops.res2net_chain(y1, ws, [_bn(4, dtype, be.device) for _ in range(2)], scale=3, stride=stride,
                                    block_type=block_type, training=True)
            sources = [tops._source(y1), tops._source(out)]
        for t, src in zip((y1, out), sources):
            assert src.node is not None, block_type
            src.node.add_user()
            rebuilt = src.node.get(src.parts)
            assert rebuilt is not t and rebuilt.shape == t.shape and rebuilt.dtype == t.dtype
            assert torch.equal(rebuilt, t), block_type
