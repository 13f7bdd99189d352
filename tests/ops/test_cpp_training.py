"""The C++ training ops of resfast._C one by one (csrc/training.cpp over csrc/cpu/bn_train.cpp here; the same ops
run the CUDA kernels on a GPU): every op registered for CPU and, when the build had CUDA, for CUDA; opcheck of the
backward ops, bn_stats and bn_running_update; the statistics kernel over odd channel counts, both layouts, channel
slices, |x| ~ 1e30 and bfloat16; the running update's formula; both copies of the CPU kernels (AVX2 and baseline) at
real channel widths against eager and against each other; bad inputs rejected by name. The ops against eager
through whole blocks, gradcheck and the BatchNorm rules: tests/test_training.py (backend `cpu`)."""

import contextlib

import pytest
import torch

from resfast import _ext
from resfast.backends import cpp
from resfast.ops import dispatch

pytestmark = pytest.mark.skipif(bool(dispatch.get("cpu").static_reasons("conv_bn_relu")),
                                reason="resfast._C with the C++ ops is not built")
F64 = torch.float64
R = torch.ops.resfast


def test_every_op_has_kernels_for_cpu_and_for_cuda_when_built_with_cuda():
    with_cuda = bool(_ext.build_info()["with_cuda"])
    for op in cpp.CPP_OPS:
        name = f"resfast::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == with_cuda, name


def _x(*shape, dtype=F64, cl=True, grad=False):
    t = torch.randn(*shape, dtype=dtype)
    t = t.contiguous(memory_format=torch.channels_last) if cl else t
    return t.requires_grad_(grad)


@pytest.mark.parametrize("C", [1, 26, 63, 65, 104])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice_nchw", "slice_cl"])
def test_bn_stats_matches_var_mean(C, layout):
    base = torch.randn(3, C + 5, 7, 5, dtype=F64) * 3 + 1.5
    if layout.endswith("cl") or layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    x = base[:, 2:2 + C] if layout.startswith("slice") else base[:, :C].contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    mean, invstd, var = R.bn_stats(x, 1e-5)
    v, m = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(invstd, (v + 1e-5).rsqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, torch.var(x, dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    m32 = R.bn_stats(x.float(), 1e-5)[0]
    assert m32.dtype == torch.float32
    torch.testing.assert_close(m32.double(), m, rtol=1e-5, atol=1e-6)


def test_bn_stats_large_values_and_low_precision():
    """|x| ~ 1e30 in float32 (equal values: exact mean, zero variance), a spread of ~3e18 (variance ~1e37: its sum
    of squares over 100 values overflows float32, the statistics do not), one pixel per channel (the unbiased
    variance is then the biased one), bfloat16 input with float32 statistics."""
    x = torch.full((4, 3, 5, 5), 1e30)
    x[:, 1] = -3e29
    x[:, 2] = torch.randn(4, 5, 5) * 3e18
    mean, invstd, var = R.bn_stats(x, 1e-5)
    assert mean[0] == x[0, 0, 0, 0] and mean[1] == x[0, 1, 0, 0]  # exact
    assert var[0].item() == 0 and var[1].item() == 0 and invstd[0].item() == pytest.approx(1e-5 ** -0.5)
    assert torch.isfinite(var).all() and var[2] > 0
    torch.testing.assert_close(var[2].double(), torch.var(x[:, 2].double()), rtol=1e-5, atol=0)
    one = torch.randn(1, 4, 1, 1, dtype=F64)
    m1, _, v1 = R.bn_stats(one, 1e-5)
    torch.testing.assert_close(m1, one.flatten())
    assert (v1 == 0).all()
    xb = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    mb, _, vb = R.bn_stats(xb, 1e-5)
    assert mb.dtype == torch.float32
    v, m = torch.var_mean(xb.float(), dim=(0, 2, 3))
    torch.testing.assert_close(mb, m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vb, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("running_dtype", [torch.float32, F64, torch.bfloat16])
def test_running_update_is_batchnorm_formula(running_dtype):
    rm, rv = torch.randn(7, dtype=running_dtype), torch.rand(7, dtype=running_dtype) + 0.5
    m, v = torch.randn(7), torch.rand(7)
    exp_m = (0.7 * rm.float() + 0.3 * m).to(running_dtype)
    exp_v = (0.7 * rv.float() + 0.3 * v).to(running_dtype)
    R.bn_running_update(rm, rv, m, v, 0.3)
    torch.testing.assert_close(rm, exp_m)
    torch.testing.assert_close(rv, exp_v)


@pytest.mark.slow
def test_opcheck_backward_and_statistics_ops():
    """schema, fake tensors (their strides equal the real kernels') and AOT dispatch of the ops autograd calls."""
    x = _x(2, 6, 5, 4)
    w = torch.randn(4, 6, 3, 3, dtype=F64)
    g, b = torch.rand(4, dtype=F64) + 0.5, torch.randn(4, dtype=F64)
    y, z, mean, invstd, _ = R.conv_bn_train(x, w, None, g, b, None, None, None, [1, 1], [1, 1], [1, 1], 1, True, 1e-5)
    dy = torch.randn_like(y)
    torch.library.opcheck(R.conv_bn_train_backward, (dy, x, w, z, y, g, mean, invstd, [1, 1], [1, 1], [1, 1], 1,
                                                     True, True, [True, True, True, True, True, True]))
    torch.library.opcheck(R.conv_bn_train_backward, (dy, x, w, z, None, None, mean, invstd, [1, 1], [1, 1], [1, 1],
                                                     1, False, False, [False, True, False, False, False, True]))
    g6, b6 = torch.rand(6, dtype=F64) + 0.5, torch.randn(6, dtype=F64)
    y2, m6, i6, _ = R.bn_relu_conv_train(x, g6, b6, None, None, w, b, None, [1, 1], [1, 1], [1, 1], 1, 1e-5)
    torch.library.opcheck(R.bn_relu_conv_train_backward, (torch.randn_like(y2), x, g6, b6, m6, i6, w, [1, 1], [1, 1],
                                                          [1, 1], 1, True, True, [True, True, True, True, True]))
    ws = [torch.randn(2, 2, 3, 3, dtype=F64) for _ in range(2)]
    g2 = [torch.rand(2, dtype=F64) + 0.5 for _ in range(2)]
    for order, bt, stride in (("timm", "normal", 1), ("paper", "stage", 2)):
        args = (ws, [], g2, g2, None, None, 3, stride, 1, 1, order, bt, [1e-5, 1e-5])
        out, zs, cm, ci, _ = R.res2net_chain_train(x, *args)
        torch.library.opcheck(R.res2net_chain_train, (x, *args))
        torch.library.opcheck(R.res2net_chain_train_backward,
                              (torch.randn_like(out), x, out, zs, ws, g2, cm, ci, 3, stride, 1, 1, order, bt, True,
                               False, True, True, False, True, True))
    torch.library.opcheck(R.bn_stats, (x, 1e-5))
    torch.library.opcheck(R.bn_running_update, (torch.zeros(6), torch.ones(6), torch.randn(6), torch.rand(6), 0.1))
    torch.library.opcheck(R.bn_relu_apply_, (torch.empty_like(z), z, mean, invstd, g, b))


def test_bn_relu_apply_rebuilds_the_forward_output_into_a_slice():
    """bn_relu_apply_ (backward's rebuild of an activation) writes exactly conv_bn_train's ReLU output, also into a
    channel slice of a larger tensor, affine or not, in both layouts."""
    for cl in (True, False):
        x = _x(2, 6, 5, 4, cl=cl)
        w = torch.randn(4, 6, 3, 3, dtype=F64)
        for g, b in ((torch.rand(4, dtype=F64) + 0.5, torch.randn(4, dtype=F64)), (None, None)):
            y, z, mean, invstd, _ = R.conv_bn_train(x, w, None, g, b, None, None, None, [1, 1], [1, 1], [1, 1], 1,
                                                    True, 1e-5)
            big = torch.full((2, 9, 5, 4), 7.0, dtype=F64)
            big = big.contiguous(memory_format=torch.channels_last) if cl else big
            R.bn_relu_apply_(big.narrow(1, 3, 4), z, mean, invstd, g, b)
            assert torch.equal(big.narrow(1, 3, 4), y)
            assert (big.narrow(1, 0, 3) == 7).all() and (big.narrow(1, 7, 2) == 7).all()


@pytest.fixture(params=["avx2", "baseline"])
def cpu_isa(request, monkeypatch):
    """Each copy of the CPU kernels (csrc/cpu/bn_train_kernels.h, compiled for AVX2 + FMA and for the baseline
    ISA), switched through RESFAST_CPU_ISA, which the extension reads per call."""
    if request.param == "baseline":
        monkeypatch.setenv("RESFAST_CPU_ISA", "baseline")
    else:
        monkeypatch.delenv("RESFAST_CPU_ISA", raising=False)
        if _ext.C.cpu_kernel_isa() != "avx2":
            pytest.skip("no AVX2 copy on this CPU or compiler")
    assert _ext.C.cpu_kernel_isa() == request.param
    return request.param


def _train_step(kind, C, layout, dtype):
    """A training forward and backward of one op at a real channel width (both vector bodies and scalar tails of
    the kernels run: C = 26 is 3 AVX2 float vectors + 2, 67 is 8 + 3; planes of 81 and 63 pixels are 10 or 7
    lanes of 8 + a tail), through the cpu backend and eagerly: outputs, gradients, running statistics."""
    from resfast import backend, ops
    from resfast.ops.reference import conv_bn_relu_ref, res2net_chain_ref

    torch.manual_seed(0)
    cl = layout == "channels_last"
    H, W = (9, 9) if kind == "conv" else (9, 7)
    x = _x(2, C, H, W, dtype=dtype, cl=cl, grad=True)
    results = []
    for run in ("fused", "eager"):
        torch.manual_seed(1)
        if kind == "conv":
            w = (torch.randn(C, C, 3, 3, dtype=dtype) * 0.1).requires_grad_()
            res = _x(2, C, H, W, dtype=dtype, cl=cl, grad=True)
            bns = [torch.nn.BatchNorm2d(C, dtype=dtype)]
            leaves = [x, w, res]
            f, args, kw = (conv_bn_relu_ref if run == "eager" else ops.conv_bn_relu), (x, w, bns[0]), \
                dict(padding=1, residual=res, training=True)
        else:
            ws = [(torch.randn(C // 4, C // 4, 3, 3, dtype=dtype) * 0.2).requires_grad_() for _ in range(3)]
            bns = [torch.nn.BatchNorm2d(C // 4, dtype=dtype) for _ in range(3)]
            leaves = [x, *ws]
            f, args, kw = (res2net_chain_ref if run == "eager" else ops.res2net_chain), (x, ws, bns), \
                dict(scale=4, training=True)
        for bn in bns:
            with torch.no_grad():
                bn.weight.uniform_(-1.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        leaves += [p for bn in bns for p in (bn.weight, bn.bias)]
        with backend("cpu") if run == "fused" else contextlib.nullcontext():
            out = f(*args, **kw)
        torch.manual_seed(2)
        grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
        results.append([out, *grads, *(b for bn in bns for b in (bn.running_mean, bn.running_var))])
    return results


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("kind,C", [("conv", 26), ("conv", 67), ("chain", 104)])
def test_cpu_kernels_at_real_widths_match_eager(cpu_isa, kind, C, layout, dtype):
    fused, eager = _train_step(kind, C, layout, dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for i, (a, b) in enumerate(zip(fused, eager)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"{cpu_isa} tensor {i}: {m}")


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_cpu_kernel_copies_agree(monkeypatch, layout):
    """The AVX2 and baseline copies compute the same sums in the same order (lanes, not reassociation): float64
    results agree to rounding (FMA contraction is the only difference)."""
    if _ext.C.cpu_kernel_isa() != "avx2":
        pytest.skip("no AVX2 copy on this CPU or compiler")
    avx2 = _train_step("chain", 104, layout, F64)[0]
    monkeypatch.setenv("RESFAST_CPU_ISA", "baseline")
    base = _train_step("chain", 104, layout, F64)[0]
    for i, (a, b) in enumerate(zip(avx2, base)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=lambda m, i=i: f"tensor {i}: {m}")


def _conv_args(x, w, **kw):
    a = dict(bias=None, gamma=None, beta=None, residual=None, mean_in=None, invstd_in=None, stride=[1, 1],
             padding=[1, 1], dilation=[1, 1], groups=1, relu=True, eps=1e-5)
    a.update(kw)
    return (x, w, a["bias"], a["gamma"], a["beta"], a["residual"], a["mean_in"], a["invstd_in"], a["stride"],
            a["padding"], a["dilation"], a["groups"], a["relu"], a["eps"])


@pytest.mark.parametrize("case,message", [
    ("rank", "resfast::conv_bn_train: x must be 4-D"),
    ("channels", "x has 5 channels but weight expects"),
    ("groups", r"groups \(4\) must divide the output channels \(6\)"),
    ("dtype", "weight must have x's dtype"),
    ("gamma", r"gamma must have shape \(6\)"),
    ("residual", "residual must have the output's shape"),
    ("stats", "mean_in and invstd_in come together"),
    ("integer", "x must be floating point"),
])
def test_conv_bn_train_rejects_bad_inputs_by_name(case, message):
    x, w = _x(2, 6, 5, 4), torch.randn(6, 6, 3, 3, dtype=F64)
    args = {
        "rank": _conv_args(x[0], w), "channels": _conv_args(x[:, :5], w),
        "groups": _conv_args(x, torch.randn(6, 3, 3, 3, dtype=F64), groups=4),
        "dtype": _conv_args(x, w.float()), "gamma": _conv_args(x, w, gamma=torch.ones(5, dtype=F64)),
        "residual": _conv_args(x, w, residual=_x(2, 6, 4, 4)),
        "stats": _conv_args(x, w, mean_in=torch.zeros(6, dtype=F64)),
        "integer": _conv_args(torch.ones(2, 6, 5, 4, dtype=torch.int64), w.long()),
    }[case]
    with pytest.raises(RuntimeError, match=message):
        R.conv_bn_train(*args)


def test_chain_and_other_ops_reject_bad_inputs_by_name():
    x = _x(2, 6, 5, 4)
    ws = [torch.randn(2, 2, 3, 3, dtype=F64) for _ in range(2)]
    tail = (None, None, 3, 1, 1, 1, "timm", "normal", [1e-5, 1e-5])
    with pytest.raises(RuntimeError, match=r"resfast::res2net_chain_train: scale \(4\) must divide the channels"):
        R.res2net_chain_train(x, ws + ws[:1], [], [], [], None, None, 4, 1, 1, 1, "timm", "normal", [1e-5] * 3)
    with pytest.raises(RuntimeError, match="expected 2 weights, got 1"):
        R.res2net_chain_train(x, ws[:1], [], [], [], *tail)
    with pytest.raises(RuntimeError, match="order must be 'timm' or 'paper'"):
        R.res2net_chain_train(x, ws, [], [], [], None, None, 3, 1, 1, 1, "other", "normal", [1e-5, 1e-5])
    with pytest.raises(RuntimeError, match="a 'normal' block has stride 1"):
        R.res2net_chain_train(x, ws, [], [], [], None, None, 3, 2, 1, 1, "timm", "normal", [1e-5, 1e-5])
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have 2 output channels"):
        R.res2net_chain_train(x, [ws[0], torch.randn(3, 2, 3, 3, dtype=F64)], [], [], [], *tail)
    with pytest.raises(RuntimeError, match="resfast::bn_running_update: running_mean, running_var, mean and var"):
        R.bn_running_update(torch.zeros(6), torch.ones(5), torch.zeros(6), torch.ones(6), 0.1)
    with pytest.raises(RuntimeError, match="mean and var must both be float32 or float64"):
        R.bn_running_update(torch.zeros(6), torch.ones(6), torch.zeros(6, dtype=torch.half),
                            torch.ones(6, dtype=torch.half), 0.1)
    with pytest.raises(RuntimeError, match="resfast::bn_stats: x must be 4-D"):
        R.bn_stats(x[0], 1e-5)
    z, m4 = _x(2, 4, 5, 4), torch.zeros(4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"resfast::bn_relu_apply_: out must have z's shape"):
        R.bn_relu_apply_(torch.empty(2, 3, 5, 4, dtype=F64), z, m4, m4 + 1, None, None)
    with pytest.raises(RuntimeError, match="bn_relu_apply_: out must have x's dtype"):
        R.bn_relu_apply_(torch.empty(2, 4, 5, 4), z, m4, m4 + 1, None, None)
    with pytest.raises(RuntimeError, match=r"bn_relu_apply_: mean must have shape \(4\)"):
        R.bn_relu_apply_(torch.empty_like(z), z, m4[:3], m4 + 1, None, None)
    with pytest.raises(RuntimeError, match="bn_relu_apply_: mean and invstd must be Double"):
        R.bn_relu_apply_(torch.empty_like(z), z, m4.float(), m4.float() + 1, None, None)
