"""The whole pre-activation block op (resfast_triton::preact_block_train, resfast/ops/bottleneck.py): each BatchNorm's
statistics from the epilogue of the conv before it, each BN + ReLU in the next conv's prologue, timm's downsample as
a second GEMM of the last conv's launch reading relu(bn1(x)) through its own prologue.

Against eager timm PreActBottleneck / PreActBasic and seed 004's blocks over several SGD steps (outputs, every
gradient, running statistics), float64 gradcheck, opcheck, what the forward launches, and when the blocks fall back
to the per-op path."""

import copy
import functools

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    TRITON_INTERPRET,
    assert_block_float32_rule,
    needs_triton_runtime,
    op_tensor_factory,
    randomize_bn_signed,
    record_whole_block,
    train_steps_like_module_path,
)
from torch import nn

import resfast

pytest.importorskip("triton")
rv2 = pytest.importorskip("timm.models.resnetv2")
from timm.layers import BatchNormAct2d, DropPath, create_conv2d  # noqa: E402

pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
F64 = torch.float64
DTYPE = F64 if TRITON_INTERPRET else torch.float32
BN_ACT = dict(conv_layer=create_conv2d, norm_layer=BatchNormAct2d)

# name -> (timm class, kwargs)
TIMM = {
    "bottleneck_identity": (rv2.PreActBottleneck, dict(in_chs=16, out_chs=16)),
    "bottleneck_proj": (rv2.PreActBottleneck, dict(in_chs=8, out_chs=16, proj_layer=rv2.DownsampleConv)),
    "bottleneck_proj_stride2": (rv2.PreActBottleneck, dict(in_chs=8, out_chs=16, stride=2,
                                                           proj_layer=rv2.DownsampleConv)),
    "bottleneck_groups_dilated": (rv2.PreActBottleneck, dict(in_chs=32, out_chs=32, groups=2, dilation=2)),
    "bottleneck_momentum_none": (rv2.PreActBottleneck, dict(in_chs=16, out_chs=16, norm_layer=functools.partial(
        BatchNormAct2d, momentum=None))),
    "bottleneck_untracked": (rv2.PreActBottleneck, dict(in_chs=8, out_chs=16, stride=2, proj_layer=rv2.DownsampleConv,
                                                        norm_layer=functools.partial(BatchNormAct2d,
                                                                                     track_running_stats=False))),
    "basic_identity": (rv2.PreActBasic, dict(in_chs=8, out_chs=8, proj_layer=rv2.DownsampleConv)),
    "basic_proj_stride2": (rv2.PreActBasic, dict(in_chs=8, out_chs=16, stride=2, proj_layer=rv2.DownsampleConv)),
}


def _timm_block(name: str, **extra) -> nn.Module:
    cls, kw = TIMM[name]
    torch.manual_seed(0)
    block = cls(**{**BN_ACT, **kw, **extra})
    return resfast.convert(randomize_bn_signed(block)).to(DEVICE)


def _count_whole(monkeypatch):
    """True each time a pre-activation block ran the whole op, False when it fell back."""
    return record_whole_block(monkeypatch, "preact", "preact_block_train")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_block_trains_like_eager(name, monkeypatch):
    """A converted timm block through the whole op, three SGD steps against its module path, in float64 (the
    interpreter; float32 on a GPU): output, every gradient, running statistics, num_batches_tracked."""
    ran = _count_whole(monkeypatch)
    train_steps_like_module_path(_timm_block(name).to(DTYPE).train(), ran, DTYPE)


def _seed_block(kind: str, down: bool) -> nn.Module:
    """Seed 004's BottleneckV2 / BasicBlockV2 (resfast.PreActBottleneck / PreActBasicBlock), the downsample (on the
    raw input) a Sequential(conv 1x1 strided, BatchNorm)."""
    torch.manual_seed(0)
    if kind == "bottleneck":
        cin, planes, stride = (8, 4, 2) if down else (16, 4, 1)
        out = planes * 4
    else:
        cin, planes, stride = (8, 16, 2) if down else (8, 8, 1)
        out = planes
    ds = nn.Sequential(nn.Conv2d(cin, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)) if down else None
    cls = resfast.PreActBottleneck if kind == "bottleneck" else resfast.PreActBasicBlock
    return randomize_bn_signed(cls(cin, planes, stride, ds)).to(DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
@pytest.mark.parametrize("down", [False, True], ids=["identity", "downsample"])
def test_seed_block_trains_like_eager(kind, down, monkeypatch):
    """Seed 004's blocks: the shortcut (x, or the downsample of the raw input) comes in as the residual; NCHW input
    (the op reads any strides)."""
    ran = _count_whole(monkeypatch)
    train_steps_like_module_path(_seed_block(kind, down).to(DTYPE).train(), ran, DTYPE, cl=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bottleneck_identity", "bottleneck_proj_stride2"])
def test_float32_accuracy(name, monkeypatch):
    """float32: output and every gradient within the project's rule, err(fused) <= 2 err(eager float32) + floor,
    both against the float64 module path."""
    ran = _count_whole(monkeypatch)
    new = _timm_block(name).train()
    x = torch.randn(4, new.conv1.in_channels, 9, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert_block_float32_rule(new, x)
    assert ran == [True]


@pytest.mark.parametrize("name", ["bottleneck_identity", "bottleneck_proj_stride2"])
def test_zero_init_last(name, monkeypatch):
    """timm's zero_init_last (conv3's weight = 0): the block's output is exactly its shortcut, gradients as eager's."""
    ran = _count_whole(monkeypatch)
    new = _timm_block(name).to(DTYPE).train()
    new.zero_init_last()
    orig = copy.deepcopy(new)
    x = torch.randn(2, new.conv1.in_channels, 5, 6, dtype=DTYPE, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with resfast.backend("triton"):
        yb = new(xb)
    ya = orig._forward_modules(xa)
    assert ran == [True]
    if new.downsample is None:
        torch.testing.assert_close(yb, x, rtol=0, atol=0)
    tol = dict(rtol=1e-9, atol=1e-9) if DTYPE == F64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(yb, ya, **tol)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    for (k, pa), (_, pb) in zip(orig.named_parameters(), new.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, **tol, msg=lambda m, k=k: f"{k}: {m}")


def _op_inputs(dtype, units, ds: bool, requires_grad=False, seed=0):
    """Inputs of preact_block_train: units = [(C_in, C_out, k, stride, padding, dilation, groups), ...]."""
    r, gamma = op_tensor_factory(dtype, DEVICE, requires_grad, seed)

    x = r(2, units[0][0], 5, 4).contiguous(memory_format=torch.channels_last).detach().requires_grad_(requires_grad)
    weights = [r(co, ci // gr, k, k) for ci, co, k, _, _, _, gr in units]
    geometry = [v for _, _, _, s, p, d, gr in units for v in (s, s, p, p, d, d, gr)]
    stride = 1
    for u in units:
        stride *= u[3]
    w_ds = r(units[-1][1], units[0][0], 1, 1) if ds else None
    return dict(x=x, weights=weights, gammas=[gamma(u[0]) for u in units],
                betas=[r(u[0], lo=-0.5, hi=0.5) for u in units], geometry=geometry, w_ds=w_ds,
                ds_stride=[stride, stride])


def _call(inp, residual):
    from resfast.backends.triton import blocks  # noqa: F401  (registers the ops)

    return torch.ops.resfast_triton.preact_block_train(
        inp["x"], inp["weights"], inp["gammas"], inp["betas"], inp["geometry"], inp["w_ds"], inp["ds_stride"],
        residual, [1e-5] * len(inp["weights"]))


BOTTLENECK = [(3, 2, 1, 1, 0, 1, 1), (2, 2, 3, 2, 1, 1, 1), (2, 4, 1, 1, 0, 1, 1)]
BASIC_GROUPED = [(4, 4, 3, 1, 2, 2, 2), (4, 4, 3, 1, 1, 1, 4)]


@pytest.mark.skipif(not TRITON_INTERPRET, reason="float64 gradcheck runs under the interpreter")
@pytest.mark.parametrize("units,ds", [(BOTTLENECK, True), (BOTTLENECK, False), (BASIC_GROUPED, False)],
                         ids=["bottleneck-downsample", "bottleneck-residual", "basic-grouped-dilated"])
@pytest.mark.slow
def test_gradcheck(units, ds):
    """float64 gradcheck of the op's every differentiable input (x, the weights, gammas, betas, the downsample's
    weight or the residual)."""
    inp = _op_inputs(F64, units, ds, requires_grad=True)
    n = len(units)
    res = None
    if not ds:
        s = inp["ds_stride"][0]
        res = torch.randn(2, units[-1][1], (5 - 1) // s + 1, (4 - 1) // s + 1, dtype=F64, device=DEVICE,
                          requires_grad=True)

    def f(x, *flat):
        d = dict(inp, x=x, weights=list(flat[:n]), gammas=list(flat[n:2 * n]), betas=list(flat[2 * n:3 * n]))
        if ds:
            d["w_ds"] = flat[3 * n]
        return _call(d, None if ds else flat[3 * n])[0]

    flat = [inp["x"], *inp["weights"], *inp["gammas"], *inp["betas"], inp["w_ds"] if ds else res]
    assert torch.autograd.gradcheck(f, flat, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("ds", [True, False], ids=["downsample", "residual"])
def test_opcheck(ds):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration."""
    inp = _op_inputs(F64 if TRITON_INTERPRET else torch.float32, BOTTLENECK, ds, requires_grad=True)
    res = None if ds else torch.randn(2, 4, 3, 2, dtype=inp["x"].dtype, device=DEVICE, requires_grad=True)
    from resfast.backends.triton import blocks

    torch.library.opcheck(blocks.OPS["preact_block_train"],
                          (inp["x"], inp["weights"], inp["gammas"], inp["betas"], inp["geometry"], inp["w_ds"],
                           inp["ds_stride"], res, [1e-5] * 3))


def test_forward_launches(monkeypatch):
    """The forward of a downsample block: one statistics pass (over x), one launch per conv, each BN + ReLU in a
    prologue, the next BatchNorm's statistics in each epilogue but the last, the downsample in the last launch with
    its own prologue; no apply pass (no normalised activation is written). Backward rebuilds them."""
    from resfast.backends.triton.kernels import batchnorm, conv

    block = _timm_block("bottleneck_proj_stride2").train()
    x = torch.randn(2, 8, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    applies, launches, passes = [], [], []
    real_apply, real_launch, real_stats = batchnorm.apply, conv._launch, batchnorm.stats_partials
    monkeypatch.setattr(batchnorm, "apply", lambda *a, **k: applies.append(1) or real_apply(*a, **k))
    monkeypatch.setattr(batchnorm, "stats_partials", lambda *a, **k: passes.append(1) or real_stats(*a, **k))
    monkeypatch.setattr(conv, "_launch", lambda *a, **k: launches.append(k) or real_launch(*a, **k))
    ran = _count_whole(monkeypatch)
    with resfast.backend("triton"):
        y = block(x)
    assert ran == [True]
    assert applies == [] and passes == [1]
    assert [(k["PRE_BN_RELU"], k["STATS"], k["HAS_DS"], k["DS_BN_RELU"], k["HAS_RES"]) for k in launches] == [
        (2, True, False, False, False), (2, True, False, False, False), (2, False, True, True, False)]
    y.sum().backward()
    assert len(applies) == 3  # each conv's input rebuilt once


@pytest.mark.slow
def test_falls_back_to_the_per_op_path(monkeypatch):
    """The whole op only where it reproduces the block: otherwise the block's per-op path runs (and matches eager)."""
    from resfast.ops import bottleneck

    ran = _count_whole(monkeypatch)
    x = torch.randn(2, 8, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)

    def run(block, backend="triton"):
        ran.clear()
        xx = x.clone().requires_grad_()
        with resfast.backend(backend):
            y = block(xx)
        torch.testing.assert_close(y, block._forward_modules(xx), rtol=1e-4, atol=1e-4)
        return list(ran)

    block = _timm_block("bottleneck_proj_stride2").train()
    assert run(block) == [True]
    assert run(copy.deepcopy(block).eval()) == [False]                     # running statistics
    assert run(block, "eager") == [False]                                 # another backend
    biased = copy.deepcopy(block)
    biased.conv2.bias = nn.Parameter(torch.zeros(biased.conv2.out_channels, device=DEVICE))
    assert run(biased) == [False]                                         # a conv bias
    no_affine = _timm_block("bottleneck_proj_stride2", norm_layer=functools.partial(BatchNormAct2d, affine=False))
    assert run(no_affine.train()) == [False]                              # affine=False
    torch.manual_seed(0)
    avg = _timm_block("bottleneck_proj_stride2", proj_layer=rv2.DownsampleAvg).train()
    assert run(avg) == []                                                  # DownsampleAvg: not tried
    dropped = _timm_block("bottleneck_identity").train()
    dropped.drop_path = DropPath(0.5)
    ran.clear()
    with resfast.backend("triton"):
        dropped(torch.randn(2, 16, 5, 6, device=DEVICE))
    assert ran == []                                                       # drop path in training: not tried
    monkeypatch.setattr(bottleneck.WHOLE_BLOCK, "enabled", False)
    assert run(block) == [False]                                           # switched off


def test_bad_input_keeps_the_per_op_errors(monkeypatch):
    """Inputs the op cannot take fall back, so the per-op path's clear errors are what the user sees."""
    block = _timm_block("bottleneck_identity").train()
    with resfast.backend("triton"):
        with pytest.raises((ValueError, RuntimeError), match="channel"):
            block(torch.randn(2, 8, 5, 6, device=DEVICE))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            block(torch.randn(1, 16, 1, 1, device=DEVICE))


def test_saves_only_raw_tensors(monkeypatch):
    """What autograd keeps for the whole op: the input x, the raw outputs of conv1 and conv2, one statistics buffer
    (4 rows x all BatchNorm channels) and the parameters, nothing else (no normalised activation, no shortcut);
    less than the per-op path, which for a downsample block also keeps relu(norm1(x))."""
    from resfast.ops.bottleneck import WHOLE_BLOCK

    block = _timm_block("bottleneck_proj_stride2").train()
    x = torch.randn(2, 8, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def saved(fn):
        storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), resfast.backend("triton"):
            fn()
        return sum(storages.values())

    whole = saved(lambda: block(x))
    mid = block.conv1.out_channels
    L = 8 + 2 * mid
    params = sum(p.nbytes for p in block.parameters())
    assert whole == x.nbytes + (2 * mid * 8 * 8 + 2 * mid * 4 * 4) * 4 + 4 * L * 4 + params, whole
    monkeypatch.setattr(WHOLE_BLOCK, "enabled", False)
    per_op = saved(lambda: block(x))
    # relu(norm1(x)) has x's size; the per-op ops keep 3 statistics vectors per BatchNorm where the op keeps 4 rows
    assert per_op - whole >= x.nbytes - 4 * L * 4, (whole, per_op)
