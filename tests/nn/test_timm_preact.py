"""timm's ResNetV2 blocks (resnetv2.PreActBottleneck / PreActBasic) against resfast's TimmPreActBottleneck /
TimmPreActBasic: constructor drop-in (state_dict keys, shapes, initial weights), training (outputs, gradients,
BatchNorm buffers) and both eval forms (pre-activation with grads, regrouped without), drop_path, fallbacks."""

import functools

import pytest
import torch
from helpers import assert_fused_close, compare_modules, randomize_bn
from torch import nn

import resfast
from resfast.ops import dispatch

timm = pytest.importorskip("timm")
rv2 = pytest.importorskip("timm.models.resnetv2")
from timm.layers import BatchNormAct2d, create_conv2d  # noqa: E402

BN_ACT = dict(conv_layer=create_conv2d, norm_layer=BatchNormAct2d)

# name -> (timm class, kwargs, input channels)
CASES = {
    "bottleneck_identity": (rv2.PreActBottleneck, dict(in_chs=64, out_chs=64, **BN_ACT), 64),
    "bottleneck_proj": (rv2.PreActBottleneck, dict(in_chs=32, out_chs=64, proj_layer=rv2.DownsampleConv, **BN_ACT),
                        32),
    "bottleneck_proj_stride2": (rv2.PreActBottleneck, dict(in_chs=32, out_chs=64, stride=2,
                                                           proj_layer=rv2.DownsampleConv, **BN_ACT), 32),
    "bottleneck_avg_down": (rv2.PreActBottleneck, dict(in_chs=32, out_chs=64, stride=2,
                                                       proj_layer=rv2.DownsampleAvg, **BN_ACT), 32),
    "bottleneck_groups_dilated": (rv2.PreActBottleneck, dict(in_chs=64, out_chs=64, groups=4, dilation=2,
                                                             **BN_ACT), 64),
    "bottleneck_momentum_none": (rv2.PreActBottleneck, dict(in_chs=64, out_chs=64, conv_layer=create_conv2d,
                                                            norm_layer=functools.partial(BatchNormAct2d,
                                                                                         momentum=None)), 64),
    "bottleneck_no_affine": (rv2.PreActBottleneck, dict(in_chs=32, out_chs=64, stride=2,
                                                        proj_layer=rv2.DownsampleConv, conv_layer=create_conv2d,
                                                        norm_layer=functools.partial(BatchNormAct2d, affine=False)),
                             32),
    "basic_identity": (rv2.PreActBasic, dict(in_chs=16, out_chs=16, proj_layer=rv2.DownsampleConv, **BN_ACT), 16),
    "basic_proj_stride2": (rv2.PreActBasic, dict(in_chs=16, out_chs=32, stride=2, proj_layer=rv2.DownsampleConv,
                                                 **BN_ACT), 16),
}
RESFAST = {rv2.PreActBottleneck: resfast.TimmPreActBottleneck, rv2.PreActBasic: resfast.TimmPreActBasic}


def _pair(name, dtype=torch.float64, **extra):
    cls, kw, cin = CASES[name]
    kw = dict(kw, **extra)
    torch.manual_seed(1)
    orig = randomize_bn(cls(**kw)).to(dtype)
    new = RESFAST[cls](**kw).to(dtype)
    new.load_state_dict(orig.state_dict(), strict=True)
    return orig, new, cin


def _record_ops(monkeypatch):
    calls = []
    real_run, real_bn_act = dispatch.run, resfast.ops.bn_act
    monkeypatch.setattr(dispatch, "run", lambda op, args: calls.append(op) or real_run(op, args))
    monkeypatch.setattr(resfast.ops, "bn_act", lambda *a, **k: calls.append("bn_act") or real_bn_act(*a, **k))
    return calls


@pytest.mark.parametrize("kw", [
    dict(in_chs=64, out_chs=256, **BN_ACT),
    dict(in_chs=64, out_chs=256, stride=2, proj_layer=rv2.DownsampleConv, **BN_ACT),
    dict(in_chs=128, out_chs=256, stride=2, groups=2, proj_layer=rv2.DownsampleAvg, drop_path_rate=0.1, **BN_ACT),
    dict(in_chs=64, out_chs=96, bottle_ratio=0.3, dilation=2, first_dilation=1, **BN_ACT),
    dict(in_chs=64, out_chs=256, proj_layer=rv2.DownsampleConv),  # timm's defaults: StdConv2d + GroupNormAct
], ids=["identity", "proj_stride2", "avg_down_groups_droppath", "ratio_dilation", "timm_default_layers"])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_constructor_is_timms(kw, kind):
    """Same arguments -> same modules, state_dict keys and shapes, and the same initial weights (same order of
    construction, so the same random numbers)."""
    cls = rv2.PreActBottleneck if kind == "bottleneck" else rv2.PreActBasic
    torch.manual_seed(0)
    orig = cls(**kw)
    torch.manual_seed(0)
    new = RESFAST[cls](**kw)
    so, sn = orig.state_dict(), new.state_dict()
    assert list(sn) == list(so)
    for k in so:
        assert sn[k].shape == so[k].shape and torch.equal(sn[k], so[k]), k
    assert [(n, type(m)) for n, m in new.named_modules()][1:] == [(n, type(m)) for n, m in orig.named_modules()][1:]
    new.load_state_dict(so, strict=True)


def test_timm_stage_builds_with_resfast_block():
    """timm's ResNetStage takes the resfast class as its block_fn, and a timm stage's checkpoint loads strictly."""
    args = dict(in_chs=64, out_chs=256, stride=2, dilation=1, depth=2, **BN_ACT)
    torch.manual_seed(0)
    ref = randomize_bn(rv2.ResNetStage(block_fn=rv2.PreActBottleneck, **args)).eval()
    new = rv2.ResNetStage(block_fn=resfast.TimmPreActBottleneck, **args).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval_grad"])
def test_block_matches_timm(name, train):
    """Pre-activation form: outputs, input and parameter gradients and BatchNorm buffers over steps."""
    orig, new, cin = _pair(name)
    compare_modules(orig, new, torch.randn(2, cin, 9, 7, dtype=torch.float64), train, steps=3, rtol=1e-10,
                    atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_block_eval_no_grad_regrouped(name):
    """Regrouped form (eval, no grad): bit-identical to timm on the eager backend; on the default backend (the
    cpu backend folds BatchNorm into the weights) within the accuracy rule of a float32 run against float64."""
    orig, new, cin = _pair(name)
    orig.eval()
    new.eval()
    x = torch.randn(2, cin, 9, 7).double()  # float32 values: the float32 run below sees the same input
    orig32, new32, _ = _pair(name, torch.float32)  # the same weights, in float32
    orig32.eval()
    new32.eval()
    with torch.no_grad():
        ref = orig(x)
        with resfast.backend("eager"):
            torch.testing.assert_close(new(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(new(x), ref, rtol=1e-10, atol=1e-10)
        assert_fused_close(new32(x.float()), orig32(x.float()), ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_identity_bn_is_exact(dtype):
    """The regrouped form's conv-only step (conv_bn_relu with an identity eval BatchNorm) is the bare conv +
    residual bit for bit on the eager backend in every dtype, with eps > 0 (torch >= 2.11's batch_norm rejects eps
    0, even in eval)."""
    from resfast.nn.preact import _conv, _identity_bn

    torch.manual_seed(3)
    conv = nn.Conv2d(8, 6, 3, padding=1).to(dtype)
    x = (torch.randn(2, 8, 5, 7) * 100).to(dtype)
    r = torch.randn(2, 6, 5, 7).to(dtype)
    assert _identity_bn(6, x, None).eps > 0
    with torch.no_grad(), resfast.backend("eager"):
        y = conv(x)
        torch.testing.assert_close(_conv(x, conv), y, rtol=0, atol=0)
        torch.testing.assert_close(_conv(x, conv, r), y + r, rtol=0, atol=0)


def test_fused_paths_are_taken(monkeypatch):
    """Training runs bn_relu_conv; eval without grad runs bn_act once and conv_bn_relu for every conv (the
    DownsampleConv's included); neither calls a BatchNormAct2d forward when there is no downsample."""
    calls = _record_ops(monkeypatch)
    bn_calls = []
    real = BatchNormAct2d.forward
    monkeypatch.setattr(BatchNormAct2d, "forward", lambda self, x: bn_calls.append(1) or real(self, x))
    orig, new, cin = _pair("bottleneck_identity")
    x = torch.randn(2, cin, 6, 6, dtype=torch.float64)
    new.train()(x)
    assert calls == ["bn_relu_conv"] * 3 and not bn_calls
    calls.clear()
    with torch.no_grad():
        new.eval()(x)
    assert calls == ["bn_act"] + ["conv_bn_relu"] * 3 and not bn_calls
    orig, new, cin = _pair("bottleneck_proj_stride2")
    calls.clear()
    with torch.no_grad():
        new.eval()(torch.randn(2, cin, 6, 6, dtype=torch.float64))
    assert calls == ["bn_act"] + ["conv_bn_relu"] * 4 and not bn_calls
    calls.clear()
    new.train()(torch.randn(2, cin, 6, 6, dtype=torch.float64))
    assert calls == ["bn_relu_conv"] * 2 and len(bn_calls) == 1  # relu(norm1(x)) made once for both convs


def test_regrouped_fold_cache_is_reused():
    """The identity BatchNorm of the last conv and the folded norm1 are cached: a second eval call rebuilds
    nothing, a weight update rebuilds."""
    _, new, cin = _pair("bottleneck_proj_stride2", torch.float32)
    new.eval()
    x = torch.randn(2, cin, 8, 8)
    with torch.no_grad():
        y = new(x)
        cache = new.__dict__["_resfast_fold_cache"]
        builds = cache.builds
        torch.testing.assert_close(new(x), y, rtol=0, atol=0)
        assert cache.builds == builds
        new.norm1.weight.mul_(2)
        new(x)
        assert cache.builds > builds


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_drop_path_active(train):
    """drop_path_rate > 0 with DropPath training: the conv output is dropped, then the shortcut added; same
    random mask as timm's (the same generator state), same gradients and buffers. In eval (norms eval, DropPath
    forced to train) the regrouped form applies it too."""
    orig, new, cin = _pair("bottleneck_proj_stride2", drop_path_rate=0.5)
    orig.train(train)
    new.train(train)
    orig.drop_path.train()
    new.drop_path.train()
    x = torch.randn(8, cin, 6, 6, dtype=torch.float64)
    for step in range(2):
        xa, xb = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            torch.manual_seed(step)
            ya = orig(xa)
            torch.manual_seed(step)
            yb = new(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        if train:
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)
            for (k, pa), (_, pb) in zip(orig.named_parameters(), new.named_parameters()):
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-10, atol=1e-10, msg=k)
    for k, v in orig.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=1e-10, atol=1e-10, msg=k)
    # the mask really dropped something (otherwise this test proves nothing)
    with torch.no_grad():
        orig.drop_path.eval()
        assert not torch.allclose(orig(x), ya)


@pytest.mark.parametrize("norm_layer", [functools.partial(BatchNormAct2d, act_layer=nn.SiLU),
                                        functools.partial(BatchNormAct2d, act_layer=nn.LeakyReLU)],
                         ids=["silu", "leaky_relu"])
def test_other_activation_runs_the_modules(norm_layer, monkeypatch):
    """A BatchNormAct2d with another activation is not BN + ReLU: the block runs timm's computation with its
    modules, in training and in eval without grad."""
    calls = _record_ops(monkeypatch)
    orig, new, cin = _pair("bottleneck_proj_stride2", norm_layer=norm_layer)
    compare_modules(orig, new, torch.randn(2, cin, 8, 8, dtype=torch.float64), True, rtol=1e-10, atol=1e-10)
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(x), orig.eval()(x), rtol=0, atol=0)
    assert calls == []


def test_bit_style_layers_run_the_modules(monkeypatch):
    """timm's defaults (StdConv2d, GroupNormAct: BiT) are not reproduced by the ops: the modules run."""
    calls = _record_ops(monkeypatch)
    kw = dict(in_chs=64, out_chs=128, proj_layer=rv2.DownsampleConv)
    torch.manual_seed(0)
    orig = rv2.PreActBottleneck(**kw).double()
    new = resfast.TimmPreActBottleneck(**kw).double()
    new.load_state_dict(orig.state_dict(), strict=True)
    compare_modules(orig, new, torch.randn(2, 64, 6, 6, dtype=torch.float64), True, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(new.eval()(x), orig.eval()(x), rtol=0, atol=0)
    assert calls == []


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_channels_last_in_channels_last_out(train):
    orig, new, cin = _pair("bottleneck_proj_stride2", torch.float32)
    orig, new = orig.to(memory_format=torch.channels_last), new.to(memory_format=torch.channels_last)
    x = torch.randn(2, cin, 8, 8).contiguous(memory_format=torch.channels_last)
    _, yb = compare_modules(orig, new, x, train, steps=1, rtol=1e-5, atol=1e-5)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = new.eval()(x)
        torch.testing.assert_close(y, orig.eval()(x), rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_matches_eager(train):
    """torch.compile(fullgraph=True) traces both forms (no fold cache while compiling)."""
    _, eager, cin = _pair("bottleneck_proj_stride2", torch.float32)
    _, mod, _ = _pair("bottleneck_proj_stride2", torch.float32)
    eager.train(train)
    mod.train(train)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, cin, 8, 8)
    with torch.set_grad_enabled(train):
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(mod.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_eval_under_inference_mode():
    """torch.inference_mode (what serving code and the model benchmark use): the blocks' cached folds include
    tensors made under it (inference tensors have no version counter); two forwards match the original."""
    m = timm.create_model("resnetv2_50", pretrained=False, num_classes=10)
    randomize_bn(m).eval()
    new = resfast.convert(m)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        ref = m(x)
        out1, out2 = new(x), new(x)
    torch.testing.assert_close(out1, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
