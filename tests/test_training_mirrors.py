"""The two implementations of the per-op training ops are declared mirrors: one orchestration per device-primitive
set, kept step for step in sync. csrc/training.cpp (``torch.ops.resfast``: ATen convolutions + the csrc BatchNorm
kernels) and resfast/backends/triton/training.py (``torch.ops.resfast_triton``: Triton kernels) implement
conv_bn_train, bn_relu_conv_train, res2net_chain_train (each with its backward op), bn_running_update and
bn_relu_apply_ with the same schemas. This test holds them to each other: both run on the same inputs (float64,
small shapes, seeded) and every returned tensor of every forward and backward op is compared, empty placeholders
of gradients not asked for included; each backward op gets the same saved tensors (the C++ forward's), so a
mismatch points at one op. The only declared difference: the chain's raw conv outputs are one tensor of channel
slices (Triton) or a list (C++), compared slice by slice.

Float64 on the CPU (the Triton interpreter, TRITON_INTERPRET=1 from tests/conftest.py). With a GPU (no
interpreter; the Triton kernels take float64 only under it) float32 on CUDA, both sides on their CUDA primitives (cuDNN
against Triton's kernels, TF32 off: tests/conftest.py), to float32's tolerance."""

import itertools

import pytest
import torch
from helpers import TRITON_DEVICE, TRITON_INTERPRET

import resfast  # noqa: F401  (loads resfast._C, which registers torch.ops.resfast)
from resfast import _ext

if _ext.C is None:
    pytest.skip(f"resfast._C is not loaded ({_ext.C_ERROR}): no C++ training ops to mirror",
                allow_module_level=True)
pytest.importorskip("triton")
if not TRITON_INTERPRET and not torch.cuda.is_available():
    pytest.skip("the Triton ops need TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU) or a GPU",
                allow_module_level=True)
if TRITON_DEVICE == "cuda" and not _ext.build_info().get("with_cuda"):
    pytest.skip("resfast._C was built without CUDA: no C++ training ops for the Triton ops' CUDA tensors",
                allow_module_level=True)

import resfast.backends.triton.training  # noqa: E402,F401  (registers torch.ops.resfast_triton)

CPP = torch.ops.resfast
TRI = torch.ops.resfast_triton
DEVICE = TRITON_DEVICE
DTYPE = torch.float64 if TRITON_INTERPRET else torch.float32
# float64: the two sides sum in different orders (oneDNN's convolution and the csrc kernels' per-channel sums
# against the Triton tiles and their partials), which moves results by a few ulps of the sums' magnitude: measured
# at most ~1e-14 absolute (dgamma/dbeta, sums over N*H*W of values up to ~30), ~1e-15 elsewhere. 1e-9 / 1e-10
# leaves four orders of headroom and still catches a 1e-7 perturbation of any one input. The atol also covers the
# conv bias gradient under batch statistics, zero up to rounding (~1e-15: the mean subtraction cancels the bias); it
# is a real comparison in the given-statistics cases. float32 (GPU): the project's 1e-4.
TOL = dict(rtol=1e-9, atol=1e-10) if DTYPE == torch.float64 else dict(rtol=1e-4, atol=1e-4)
CL = torch.channels_last
EPS = 1e-5


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=DTYPE, device=DEVICE) * scale


def _stats(C, shape=None):
    """Given statistics (eval BatchNorm): a mean and a positive invstd."""
    shape = (C,) if shape is None else shape
    return _rand(*shape, scale=0.3), torch.rand(*shape, dtype=DTYPE, device=DEVICE) + 0.5


def _close(name, got, want):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name} (Triton vs C++): {m}")


def _close_all(names, tri, cpp):
    assert len(tri) == len(cpp) == len(names)
    for name, a, b in zip(names, tri, cpp):
        if isinstance(b, (list, tuple)):
            assert len(a) == len(b), f"{name}: {len(a)} tensors (Triton) vs {len(b)} (C++)"
            for k, (ak, bk) in enumerate(zip(a, b)):
                _close(f"{name}[{k}]", ak, bk)
        else:
            _close(name, a, b)


def _case_ids(cases):
    return [c[0] for c in cases]


# The Triton backward ops take their convolutions' data and weight gradients from ATen (the default) or from the
# Triton dgrad/wgrad kernels (RESFAST_CONV_BACKWARD=triton, read at each call). Every mask runs under ATen; the
# full mask also under the Triton kernels for the cases below, one per convolution geometry (the interpreted
# dgrad/wgrad kernels take seconds per case: all of them would double the file's runtime).
TRITON_CONV_BACKWARD = {"groups2", "stride2", "pad2-dil2", "1x1-stride2", "nchw", "timm-normal-s2-groups2-dil2",
                        "paper-stage-s2-stride2"}


def _backward_runs(case_id, full, needs):
    """(conv-gradient implementation, need mask) of each backward call of a case."""
    runs = [("aten", full)] + [("aten", tuple(map(bool, n))) for n in needs]
    return runs + [("triton", full)] if case_id in TRITON_CONV_BACKWARD else runs


# ---------------------------------------------------------------------------------------------------------------
# conv_bn_train / conv_bn_train_backward

# (id, C_in, C_out, k, stride, padding, dilation, groups, bias, affine, residual, relu, given_stats, nchw, needs)
# needs: the backward masks (dx, dw, db, dgamma, dbeta, dres) run besides the full one
CONV_BN = [
    ("base", 4, 6, 3, 1, 1, 1, 1, True, True, True, True, False, False, [(1, 0, 0, 0, 0, 0)]),
    ("no-res", 4, 6, 3, 1, 1, 1, 1, True, True, False, True, False, False, [(0, 1, 1, 1, 1, 0)]),
    ("no-relu", 4, 6, 3, 1, 1, 1, 1, True, True, True, False, False, False, [(0, 0, 0, 1, 1, 1)]),
    ("bare", 4, 6, 3, 1, 1, 1, 1, False, False, False, False, False, False, [(1, 1, 0, 0, 0, 0)]),
    ("given-stats", 4, 6, 3, 1, 1, 1, 1, True, True, True, True, True, False, [(1, 0, 0, 1, 0, 1)]),
    ("given-no-affine", 4, 6, 3, 1, 1, 1, 1, False, False, False, True, True, False, [(0, 1, 0, 0, 0, 0)]),
    ("no-bias", 4, 6, 3, 1, 1, 1, 1, False, True, True, True, False, False, [(0, 0, 1, 0, 1, 0)]),
    ("no-affine", 4, 6, 3, 1, 1, 1, 1, True, False, True, True, False, False, [(1, 0, 1, 0, 0, 1)]),
    ("groups2", 4, 6, 3, 1, 1, 1, 2, True, True, True, True, False, False, [(0, 1, 0, 0, 0, 0)]),
    ("depthwise", 4, 4, 3, 1, 1, 1, 4, True, True, False, True, False, False, []),
    ("stride2", 4, 6, 3, 2, 1, 1, 1, True, True, True, True, False, False, [(1, 0, 0, 0, 0, 0)]),
    ("pad2-dil2", 4, 6, 3, 1, 2, 2, 1, True, True, True, True, False, False, []),
    ("1x1-stride2", 4, 8, 1, 2, 0, 1, 1, False, True, False, False, False, False, [(0, 1, 0, 1, 1, 0)]),
    ("pad0", 4, 6, 3, 1, 0, 1, 1, True, True, False, True, False, False, []),
    ("nchw", 4, 6, 3, 2, 1, 1, 2, True, True, True, True, False, True, [(1, 1, 1, 0, 0, 0)]),
]


@pytest.mark.parametrize("case", CONV_BN, ids=_case_ids(CONV_BN))
def test_conv_bn_train(case, monkeypatch):
    _, C_in, C_out, k, s, p, d, g, has_bias, affine, has_res, relu, given, nchw, needs = case
    N, H, W = 2, 6, 5
    x = _rand(N, C_in, H, W)
    x = x if nchw else x.contiguous(memory_format=CL)
    weight = _rand(C_out, C_in // g, k, k, scale=0.3)
    bias = _rand(C_out) if has_bias else None
    gamma, beta = (_rand(C_out), _rand(C_out)) if affine else (None, None)
    mean_in, invstd_in = _stats(C_out) if given else (None, None)
    H_out, W_out = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
    residual = _rand(N, C_out, H_out, W_out) if has_res else None
    args = (x, weight, bias, gamma, beta, residual, mean_in, invstd_in, [s, s], [p, p], [d, d], g, relu, EPS)
    fwd_cpp = CPP.conv_bn_train(*args)
    fwd_tri = TRI.conv_bn_train(*args)
    _close_all(("y", "z", "mean", "invstd", "var"), fwd_tri, fwd_cpp)

    y, z, mean, invstd, _ = fwd_cpp  # the same saved tensors for both backward ops
    dy = _rand(*y.shape)
    full = (True, True, True, affine, affine, has_res)
    for conv_bwd, need in _backward_runs(case[0], full, needs):
        monkeypatch.setenv("RESFAST_CONV_BACKWARD", conv_bwd)
        bargs = (dy, x, weight, z, y if relu else None, gamma, mean, invstd, [s, s], [p, p], [d, d], g, not given,
                 has_bias, list(need))
        _close_all([f"{n} need={need} conv_backward={conv_bwd}"
                    for n in ("dx", "dweight", "dbias", "dgamma", "dbeta", "dresidual")],
                   TRI.conv_bn_train_backward(*bargs), CPP.conv_bn_train_backward(*bargs))


# ---------------------------------------------------------------------------------------------------------------
# bn_relu_conv_train / bn_relu_conv_train_backward

# (id, C_in, C_out, k, stride, padding, dilation, groups, bias, affine, residual, given_stats, nchw, needs)
# needs: the backward masks (dx, dgamma, dbeta, dw, db) run besides the full one
BN_RELU_CONV = [
    ("base", 4, 6, 3, 1, 1, 1, 1, True, True, True, False, False, [(1, 0, 0, 0, 0)]),
    ("no-res", 4, 6, 3, 1, 1, 1, 1, True, True, False, False, False, [(0, 0, 0, 1, 1)]),
    ("bare", 4, 6, 3, 1, 1, 1, 1, False, False, False, False, False, [(0, 0, 0, 1, 0)]),
    ("given-stats", 4, 6, 3, 1, 1, 1, 1, True, True, True, True, False, [(1, 1, 0, 0, 0), (0, 0, 0, 1, 0)]),
    ("given-no-affine", 4, 6, 3, 1, 1, 1, 1, False, False, True, True, False, [(1, 0, 0, 0, 0)]),
    ("no-bias", 4, 6, 3, 1, 1, 1, 1, False, True, True, False, False, [(0, 1, 1, 0, 0)]),
    ("no-affine", 4, 6, 3, 1, 1, 1, 1, True, False, False, False, False, [(1, 0, 0, 1, 0)]),
    ("groups2", 4, 6, 3, 1, 1, 1, 2, True, True, True, False, False, [(0, 0, 1, 0, 1)]),
    ("depthwise", 4, 4, 3, 1, 1, 1, 4, False, True, False, False, False, []),
    ("stride2", 4, 6, 3, 2, 1, 1, 1, True, True, True, False, False, [(1, 0, 0, 0, 0)]),
    ("pad2-dil2", 4, 6, 3, 1, 2, 2, 1, True, True, False, False, False, []),
    ("1x1-stride2", 4, 8, 1, 2, 0, 1, 1, False, True, False, False, False, [(1, 1, 1, 0, 0)]),
    ("nchw", 4, 6, 3, 2, 1, 1, 2, True, True, True, False, True, [(0, 1, 1, 1, 1)]),
]


@pytest.mark.parametrize("case", BN_RELU_CONV, ids=_case_ids(BN_RELU_CONV))
def test_bn_relu_conv_train(case, monkeypatch):
    _, C_in, C_out, k, s, p, d, g, has_bias, affine, has_res, given, nchw, needs = case
    N, H, W = 2, 6, 5
    x = _rand(N, C_in, H, W)
    x = x if nchw else x.contiguous(memory_format=CL)
    gamma, beta = (_rand(C_in), _rand(C_in)) if affine else (None, None)
    mean_in, invstd_in = _stats(C_in) if given else (None, None)
    weight = _rand(C_out, C_in // g, k, k, scale=0.3)
    bias = _rand(C_out) if has_bias else None
    H_out, W_out = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
    residual = _rand(N, C_out, H_out, W_out) if has_res else None
    args = (x, gamma, beta, mean_in, invstd_in, weight, bias, residual, [s, s], [p, p], [d, d], g, EPS)
    fwd_cpp = CPP.bn_relu_conv_train(*args)
    fwd_tri = TRI.bn_relu_conv_train(*args)
    _close_all(("y", "mean", "invstd", "var"), fwd_tri, fwd_cpp)

    y, mean, invstd, _ = fwd_cpp
    dy = _rand(*y.shape)
    full = (True, affine, affine, True, True)
    for conv_bwd, need in _backward_runs(case[0], full, needs):
        monkeypatch.setenv("RESFAST_CONV_BACKWARD", conv_bwd)
        bargs = (dy, x, gamma, beta, mean, invstd, weight, [s, s], [p, p], [d, d], g, not given, has_bias,
                 list(need))
        _close_all([f"{n} need={need} conv_backward={conv_bwd}"
                    for n in ("dx", "dgamma", "dbeta", "dweight", "dbias")],
                   TRI.bn_relu_conv_train_backward(*bargs), CPP.bn_relu_conv_train_backward(*bargs))


# ---------------------------------------------------------------------------------------------------------------
# res2net_chain_train / res2net_chain_train_backward

# (id, scale, order, block_type, stride, dilation, groups, bias, affine, given_stats, needs)
# needs: the backward masks (dx, dw, db, dgamma, dbeta) run besides the full one
CHAIN = [
    ("timm-normal-s4", 4, "timm", "normal", 1, 1, 1, True, True, False, [(1, 0, 0, 0, 0)]),
    ("paper-normal-s4", 4, "paper", "normal", 1, 1, 1, True, True, False, [(0, 1, 1, 0, 0)]),
    ("timm-stage-s4-stride2", 4, "timm", "stage", 2, 1, 1, True, True, False, [(0, 0, 0, 1, 1)]),
    ("paper-stage-s4-stride2", 4, "paper", "stage", 2, 1, 1, False, True, False, [(1, 0, 0, 0, 0)]),
    ("timm-normal-s2", 2, "timm", "normal", 1, 1, 1, True, False, False, [(0, 1, 0, 0, 0)]),
    ("paper-stage-s2-stride2", 2, "paper", "stage", 2, 1, 1, True, True, False, [(0, 0, 1, 1, 0)]),
    ("timm-normal-s1", 1, "timm", "normal", 1, 1, 1, True, True, False, [(1, 0, 0, 0, 0)]),
    ("timm-stage-s1-stride2", 1, "timm", "stage", 2, 1, 1, True, True, False, []),
    ("timm-stage-s2-stride1", 2, "timm", "stage", 1, 1, 1, True, True, False, [(1, 0, 0, 0, 0)]),
    ("timm-normal-s4-given", 4, "timm", "normal", 1, 1, 1, True, True, True, [(1, 0, 0, 0, 0), (0, 0, 0, 1, 1)]),
    ("paper-stage-s2-given-bare", 2, "paper", "stage", 2, 1, 1, False, False, True, [(0, 1, 0, 0, 0)]),
    ("timm-normal-s2-groups2-dil2", 2, "timm", "normal", 1, 2, 2, True, True, False, [(1, 0, 0, 0, 0)]),
    ("paper-stage-s4-stride2-groups2", 4, "paper", "stage", 2, 1, 2, True, True, False, []),
    ("paper-normal-s1-no-conv", 1, "paper", "normal", 1, 1, 1, False, True, False, []),  # pass-through only
    ("paper-stage-s1-stride2-no-conv", 1, "paper", "stage", 2, 1, 1, False, True, False, []),
]


@pytest.mark.parametrize("case", CHAIN, ids=_case_ids(CHAIN))
def test_res2net_chain_train(case, monkeypatch):
    _, scale, order, block_type, s, d, g, has_bias, affine, given, needs = case
    wd = 4
    n_convs = max(1, scale - 1) if order == "timm" else scale - 1
    N, H, W = 2, 6, 5
    x = _rand(N, scale * wd, H, W).contiguous(memory_format=CL)
    weights = [_rand(wd, wd // g, 3, 3, scale=0.3) for _ in range(n_convs)]
    biases = [_rand(wd) for _ in range(n_convs)] if has_bias else []
    gammas = [_rand(wd) for _ in range(n_convs)] if affine else []
    betas = [_rand(wd) for _ in range(n_convs)] if affine else []
    mean_in, invstd_in = _stats(wd, (n_convs, wd)) if given else (None, None)
    args = (x, weights, biases, gammas, betas, mean_in, invstd_in, scale, s, d, g, order, block_type,
            [EPS] * n_convs)
    out_c, zs, mean_c, invstd_c, var_c = CPP.res2net_chain_train(*args)
    out_t, Z, mean_t, invstd_t, var_t = TRI.res2net_chain_train(*args)
    assert len(zs) == n_convs and Z.shape[1] == n_convs * wd
    Z_slices = [Z[:, k * wd:(k + 1) * wd] for k in range(n_convs)]
    _close_all(("out", "Z", "mean", "invstd", "var"), (out_t, Z_slices, mean_t, invstd_t, var_t),
               (out_c, zs, mean_c, invstd_c, var_c))

    dout = _rand(*out_c.shape)
    # the C++ forward's raw outputs, as Triton takes them (one tensor; no channels when the chain has no conv)
    Z_same = torch.cat(zs, dim=1).contiguous(memory_format=CL) if zs else Z.new_empty(Z.shape)
    full = (True, True, True, affine, affine)
    for conv_bwd, need in _backward_runs(case[0], full, needs):
        monkeypatch.setenv("RESFAST_CONV_BACKWARD", conv_bwd)
        common = (weights, gammas, mean_c, invstd_c, scale, s, d, g, order, block_type, not given, has_bias, *need)
        _close_all([f"{n} need={need} conv_backward={conv_bwd}"
                    for n in ("dx", "dweights", "dbiases", "dgammas", "dbetas")],
                   TRI.res2net_chain_train_backward(dout, x, out_c, Z_same, *common),
                   CPP.res2net_chain_train_backward(dout, x, out_c, zs, *common))


# ---------------------------------------------------------------------------------------------------------------
# bn_running_update, bn_relu_apply_


@pytest.mark.parametrize("factor", [0.1, 1.0])
def test_bn_running_update(factor):
    C = 6
    mean, var = _rand(C), torch.rand(C, dtype=DTYPE, device=DEVICE) + 0.5
    rm, rv = _rand(C), torch.rand(C, dtype=DTYPE, device=DEVICE) + 0.5
    rm_c, rv_c, rm_t, rv_t = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    CPP.bn_running_update(rm_c, rv_c, mean, var, factor)
    TRI.bn_running_update(rm_t, rv_t, mean, var, factor)
    _close_all(("running_mean", "running_var"), (rm_t, rv_t), (rm_c, rv_c))
    assert not torch.equal(rm_c, rm) or factor == 0  # the update happened in place


@pytest.mark.parametrize("affine,layout,sliced", list(itertools.product([True, False], ["cl", "nchw"], [False, True])))
def test_bn_relu_apply_(affine, layout, sliced):
    if not hasattr(TRI, "bn_relu_apply_"):
        pytest.skip("torch.ops.resfast_triton has no bn_relu_apply_")
    N, C, H, W = 2, 4, 5, 6
    fmt = CL if layout == "cl" else torch.contiguous_format
    z = _rand(N, C, H, W).contiguous(memory_format=fmt)
    mean, invstd = _stats(C)
    gamma, beta = (_rand(C), _rand(C)) if affine else (None, None)
    outs = []
    for ns in (TRI, CPP):
        if sliced:  # out a channel slice of a wider tensor (the chain's splits), its other channels untouched
            full = torch.full((N, 3 * C, H, W), 7.0, dtype=DTYPE, device=DEVICE).contiguous(memory_format=fmt)
            ns.bn_relu_apply_(full[:, C:2 * C], z, mean, invstd, gamma, beta)
            outs.append(full)
        else:
            out = torch.full_like(z, 7.0)
            ns.bn_relu_apply_(out, z, mean, invstd, gamma, beta)
            outs.append(out)
    _close("out", outs[0], outs[1])
    assert not torch.equal(outs[1], torch.full_like(outs[1], 7.0))
