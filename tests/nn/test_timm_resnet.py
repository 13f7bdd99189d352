"""timm's own ResNet blocks (timm.models.resnet.BasicBlock / Bottleneck) against resfast's TimmBasicBlock /
TimmBottleneck: constructor drop-in (modules, state_dict keys, initial weights), outputs, input and parameter
gradients and BatchNorm buffers in training and eval (downsample_conv / downsample_avg shortcuts, ResNeXt, SE, ECA,
anti-aliasing, DropBlock, drop_path, reduce_first, dilation), fallbacks, and resfast.convert on timm's ResNet family
(every block converted; whole-model logits)."""

import copy
import functools

import pytest
import torch
from helpers import (
    TRITON_DEVICE,
    assert_fused_close,
    check_fused_model,
    compare_modules,
    needs_triton_runtime,
    randomize_bn,
    randomize_bn_signed,
    record_whole_block,
    train_steps_like_module_path,
)
from torch import nn

import resfast
from resfast import nn as rnn

timm = pytest.importorskip("timm")
tr = pytest.importorskip("timm.models.resnet")
from timm.layers import DropBlock2d, DropPath  # noqa: E402

RESFAST = {tr.BasicBlock: rnn.TimmBasicBlock, tr.Bottleneck: rnn.TimmBottleneck}
B, BN = tr.BasicBlock, tr.Bottleneck


def _conv_ds(cin, cout, stride, kernel_size=1, **kw):
    return lambda: tr.downsample_conv(cin, cout, kernel_size, stride=stride, **kw)


def _avg_ds(cin, cout, stride, **kw):
    return lambda: tr.downsample_avg(cin, cout, 1, stride=stride, **kw)


# name -> (timm class, positional args, kwargs, downsample factory or None, input channels)
CASES = {
    "basic": (B, (16, 16), {}, None, 16),
    "basic_stride2_conv": (B, (16, 32, 2), {}, _conv_ds(16, 32, 2), 16),
    "basic_stride2_avg": (B, (16, 32, 2), {}, _avg_ds(16, 32, 2), 16),
    "basic_reduce_first2": (B, (16, 16), dict(reduce_first=2), None, 16),
    "basic_dilation2": (B, (16, 16), dict(dilation=2), None, 16),
    "basic_se": (B, (16, 32, 2), dict(attn_layer="se"), _conv_ds(16, 32, 2), 16),
    "basic_aa_avgpool": (B, (16, 32, 2), dict(aa_layer=nn.AvgPool2d), _avg_ds(16, 32, 2), 16),
    "bottleneck": (BN, (64, 16), {}, None, 64),
    "bottleneck_stride2_conv": (BN, (32, 16, 2), {}, _conv_ds(32, 64, 2), 32),
    "bottleneck_stride2_avg": (BN, (32, 16, 2), {}, _avg_ds(32, 64, 2), 32),
    "bottleneck_avg_identity_pool": (BN, (32, 16), {}, _avg_ds(32, 64, 1), 32),  # stride 1: Identity, conv, BN
    "bottleneck_down_kernel3": (BN, (32, 16, 2), dict(reduce_first=2), _conv_ds(32, 64, 2, kernel_size=3), 32),
    "resnext_card32": (BN, (64, 16), dict(cardinality=32, base_width=4), None, 64),
    "seresnext_stride2_avg": (BN, (32, 16, 2), dict(cardinality=8, base_width=4, attn_layer="se"),
                              _avg_ds(32, 64, 2), 32),
    "bottleneck_eca": (BN, (32, 16, 2), dict(attn_layer="eca"), _avg_ds(32, 64, 2), 32),
    "bottleneck_reduce_first2": (BN, (64, 16), dict(reduce_first=2), None, 64),
    "bottleneck_dilation2": (BN, (64, 16), dict(dilation=2), None, 64),
    # the first block of a dilated stage (output_stride 16): first_dilation 1, stride 1, timm's AvgPool2dSame
    "bottleneck_dilated_avg_same": (BN, (32, 16), dict(dilation=2, first_dilation=1),
                                    _avg_ds(32, 64, 1, dilation=2, first_dilation=1), 32),
    "bottleneck_aa_blur": (BN, (32, 16, 2), dict(aa_layer="blurpc"), _conv_ds(32, 64, 2), 32),
    "wide_bottleneck": (BN, (32, 16), dict(base_width=128), _conv_ds(32, 64, 1), 32),
}


def _hw(name):
    """Odd sizes (ceil-mode pooling in downsample_avg), even where timm's anti-aliasing AvgPool2d needs them."""
    return (8, 6) if "aa_avgpool" in name else (9, 7)


def _pair(name, dtype=torch.float64, **extra):
    cls, args, kw, ds, cin = CASES[name]
    kw = dict(kw, **extra)
    torch.manual_seed(1)
    orig = randomize_bn(cls(*args, downsample=ds() if ds else None, **kw)).to(dtype)
    new = RESFAST[cls](*args, downsample=ds() if ds else None, **kw).to(dtype)
    new.load_state_dict(orig.state_dict(), strict=True)
    return orig, new, cin


@pytest.mark.parametrize("name", list(CASES))
def test_constructor_is_timms(name):
    """Same arguments -> same modules (names and types), state_dict keys, shapes and initial weights (same order
    of construction, so the same random numbers)."""
    cls, args, kw, ds, _ = CASES[name]
    torch.manual_seed(0)
    orig = cls(*args, downsample=ds() if ds else None, **kw)
    torch.manual_seed(0)
    new = RESFAST[cls](*args, downsample=ds() if ds else None, **kw)
    so, sn = orig.state_dict(), new.state_dict()
    assert list(sn) == list(so)
    for k in so:
        assert sn[k].shape == so[k].shape and torch.equal(sn[k], so[k]), k
    assert [(n, type(m)) for n, m in new.named_modules()][1:] == [(n, type(m)) for n, m in orig.named_modules()][1:]
    for attr in ("stride", "dilation", "drop_path", "expansion"):
        assert getattr(new, attr) == getattr(orig, attr), attr
    new.zero_init_last()
    orig.zero_init_last()
    last = "bn2" if cls is B else "bn3"
    assert torch.equal(getattr(new, last).weight, getattr(orig, last).weight)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_matches_timm(name, train):
    """Outputs, input and parameter gradients and the whole state (running statistics included) over steps."""
    orig, new, cin = _pair(name)
    compare_modules(orig, new, torch.randn(2, cin, *_hw(name), dtype=torch.float64), train, steps=3, rtol=1e-10,
                    atol=1e-10)


@pytest.mark.parametrize("name", ["basic_stride2_avg", "bottleneck_stride2_avg", "seresnext_stride2_avg",
                                  "bottleneck_eca"])
def test_eval_bit_identical_on_eager_and_accurate_fused(name):
    """Eval, no grad: bit-identical to timm on the eager backend (the same computation); on the default backend
    (folded BatchNorm on CPU) the float32 run is within the accuracy rule against float64."""
    orig, new, cin = _pair(name)
    orig32, new32, _ = _pair(name, torch.float32)
    for m in (orig, new, orig32, new32):
        m.eval()
    x = torch.randn(2, cin, 9, 7).double()
    with torch.no_grad():
        ref = orig(x)
        with resfast.backend("eager"):
            torch.testing.assert_close(new(x), ref, rtol=0, atol=0)
        assert_fused_close(new32(x.float()), orig32(x.float()), ref)


def _record_ops(monkeypatch):
    from resfast.ops import dispatch

    calls, called_bn = [], []
    real = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda op, args: calls.append(op) or real(op, args))
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, x: called_bn.append(1) or x)
    return calls, called_bn


@pytest.mark.parametrize("name", ["basic", "basic_stride2_conv", "basic_stride2_avg", "basic_se", "bottleneck",
                                  "bottleneck_stride2_avg", "resnext_card32", "seresnext_stride2_avg",
                                  "bottleneck_eca", "bottleneck_aa_blur", "bottleneck_down_kernel3"])
def test_fused_path_is_taken(name, monkeypatch):
    """Every BatchNorm, the downsample's included, goes through resfast.ops (no BatchNorm module forward); SE as
    its gate and one scale_add_relu."""
    _, new, cin = _pair(name)
    calls, called_bn = _record_ops(monkeypatch)
    new.eval()(torch.randn(1, cin, 6, 6, dtype=torch.float64))
    assert calls.count("conv_bn_relu") >= (2 if name.startswith("basic") else 3)
    assert not called_bn
    assert ("scale_add_relu" in calls) == ("se" in name)


def test_avg_downsample_runs_its_pool_then_one_op(monkeypatch):
    """timm's downsample_avg (AvgPool2d, conv 1x1, BN): the pool module, then the projection in the last conv's op
    (the shortcut's BatchNorm folded, no separate op for it)."""
    _, new, cin = _pair("bottleneck_stride2_avg")
    pooled = []
    new.downsample[0].register_forward_hook(lambda m, i, o: pooled.append(o.shape))
    calls, called_bn = _record_ops(monkeypatch)
    new.eval()(torch.randn(1, cin, 6, 6, dtype=torch.float64))
    assert pooled == [torch.Size([1, cin, 3, 3])]
    assert calls == ["conv_bn_relu"] * 3 and not called_bn


def _seeded(m):
    """Reseeds torch before each forward (the same seed sequence for two wrapped modules): DropPath / DropBlock draw
    the same masks in timm's block and in resfast's."""

    class Seeded(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            torch.manual_seed(100 + self.calls)
            return self.inner(x)

    return Seeded(m)


@pytest.mark.parametrize("name,kw", [
    ("bottleneck_stride2_avg", dict(drop_path=DropPath(0.5))),
    ("seresnext_stride2_avg", dict(drop_path=DropPath(0.5))),
    ("basic_stride2_conv", dict(drop_path=DropPath(0.5))),
    ("basic", dict(drop_block=functools.partial(DropBlock2d, drop_prob=0.3, block_size=3))),
    ("bottleneck", dict(drop_block=functools.partial(DropBlock2d, drop_prob=0.3, block_size=3),
                        drop_path=DropPath(0.2))),
])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_drop_path_and_drop_block(name, kw, train):
    """Active stochastic depth / DropBlock in training (the modules run between the ops, drawing the same masks as
    timm); in eval they are skipped."""
    orig, new, cin = _pair(name, **{k: copy.deepcopy(v) for k, v in kw.items()})
    compare_modules(_seeded(orig), _seeded(new), torch.randn(4, cin, 9, 7, dtype=torch.float64), train, steps=2,
                    rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(act_layer=nn.SiLU), dict(norm_layer=functools.partial(nn.GroupNorm, 4))],
                         ids=["silu", "groupnorm"])
@pytest.mark.parametrize("name", ["basic_stride2_avg", "seresnext_stride2_avg"])
def test_other_layers_run_the_modules(name, kw, monkeypatch):
    """An activation or norm layer the ops do not reproduce: timm's computation with the modules, no op."""
    orig, new, cin = _pair(name, **kw)
    from resfast.ops import dispatch

    calls = []
    real = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda op, args: calls.append(op) or real(op, args))
    compare_modules(orig, new, torch.randn(2, cin, 9, 7, dtype=torch.float64), True, steps=2, rtol=1e-10,
                    atol=1e-10)
    assert not calls


def test_constructor_checks_and_names():
    with pytest.raises(AssertionError, match="cardinality"):
        rnn.TimmBasicBlock(16, 16, cardinality=2)
    with pytest.raises(AssertionError, match="base width"):
        rnn.TimmBasicBlock(16, 16, base_width=32)
    assert rnn.TimmBasicBlock.expansion == 1 and rnn.TimmBottleneck.expansion == 4
    assert resfast.TimmBasicBlock is rnn.TimmBasicBlock and resfast.TimmBottleneck is rnn.TimmBottleneck
    blk = rnn.TimmBottleneck(64, 16, act_layer="relu")  # a name, resolved as timm's ResNet does
    assert type(blk.act1) is nn.ReLU


def test_timm_resnet_builds_with_resfast_blocks():
    """timm's ResNet takes the resfast classes as its block; a timm checkpoint loads strictly; same logits."""
    kw = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=5, stem_type="deep", stem_width=8,
              avg_down=True, block_args=dict(attn_layer="se"))
    torch.manual_seed(0)
    ref = randomize_bn(tr.ResNet(tr.Bottleneck, **kw)).eval()
    new = tr.ResNet(rnn.TimmBottleneck, **kw).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), resfast.backend("eager"):
        torch.testing.assert_close(new(x), ref(x), rtol=0, atol=0)


# timm model -> number of timm BasicBlock / Bottleneck instances (every one must be converted)
MODELS = {
    "resnet10t": 4, "resnet14t": 4, "resnet18": 8, "resnet18d": 8, "resnet34": 16, "resnet26t": 8, "resnet50": 16,
    "resnet50d": 16, "resnet101": 33, "resnext50_32x4d": 16, "seresnext50_32x4d": 16, "ecaresnet50d": 16,
    "wide_resnet50_2": 16, "resnetaa50d": 16, "resnetblur50": 16, "resnetrs50": 16, "senet154": 50,
    "resnet50_gn": 16,
}


def _timm_blocks(model):
    return [m for m in model.modules() if type(m) in (tr.BasicBlock, tr.Bottleneck)]


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_converts_every_block(name):
    """Built on the meta device (no weights, no time): convert swaps every timm block for the resfast one (trusted
    by class: no behavioural probe), keeps the state_dict keys and leaves the input model alone."""
    with torch.device("meta"):
        orig = timm.create_model(name, pretrained=False)
    assert len(_timm_blocks(orig)) == MODELS[name]
    conv = resfast.convert(orig)
    ours = [m for m in conv.modules() if isinstance(m, (rnn.TimmBasicBlock, rnn.TimmBottleneck))]
    assert len(ours) == MODELS[name] and not _timm_blocks(conv)
    assert len(_timm_blocks(orig)) == MODELS[name]  # inplace=False: the input is untouched
    assert list(conv.state_dict()) == list(orig.state_dict())
    for a, b in zip(_timm_blocks(orig), ours):
        assert RESFAST[type(a)] is type(b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet50d", "resnext50_32x4d",
                                  "seresnext50_32x4d", "ecaresnet50d", "wide_resnet50_2", "resnet26t",
                                  "resnetaa50d", "resnetblur50", "resnet50_gn"])
def test_convert_whole_model_identical_logits(name):
    """Eval: bit-identical logits on the eager backend; the default backend within the accuracy rule."""
    orig = randomize_bn(timm.create_model(name, pretrained=False)).eval()
    conv = resfast.convert(orig)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), resfast.backend("eager"):
        torch.testing.assert_close(conv(x), orig(x), rtol=0, atol=0)
    check_fused_model(orig, conv, x)


@pytest.mark.slow
@pytest.mark.parametrize("block,extra", [(tr.Bottleneck, dict(block_args=dict(attn_layer="eca"))),
                                         (tr.BasicBlock, dict(output_stride=16))],
                         ids=["eca_bottleneck", "basic_os16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_convert_narrow_resnet_d(block, extra, train):
    """A narrow timm ResNet-D (deep stem, avg-pool downsample) converted: every block, then outputs, gradients and
    BatchNorm buffers as timm's over two steps (float64)."""
    torch.manual_seed(0)
    orig = tr.ResNet(block, layers=(2, 1, 1, 1), channels=(8, 16, 16, 32), num_classes=5, stem_type="deep",
                     stem_width=8, avg_down=True, **extra)
    orig = randomize_bn(orig).double()
    new = resfast.convert(orig)
    assert sum(isinstance(m, RESFAST[block]) for m in new.modules()) == 5
    compare_modules(orig, new, torch.randn(2, 3, 33, 31, dtype=torch.float64), train, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_convert_resnet50d_tiny_input():
    """resfast.convert on timm's resnet50d (avg-pool downsample, deep stem) matches its logits in eval."""
    torch.manual_seed(0)
    orig = randomize_bn(timm.create_model("resnet50d", pretrained=False, num_classes=10)).eval()
    conv = resfast.convert(orig)
    assert sum(isinstance(m, rnn.TimmBottleneck) for m in conv.modules()) == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), orig(x), rtol=1e-4, atol=1e-4)


def test_convert_trusts_timm_blocks_by_module():
    """timm's blocks are converted by (module, class) although torchvision's share their names; a block whose
    children are not timm's layout is left alone."""
    blk = tr.Bottleneck(64, 16)
    assert type(resfast.convert(blk)) is rnn.TimmBottleneck
    tv = pytest.importorskip("torchvision.models.resnet")
    assert type(resfast.convert(tv.Bottleneck(64, 16))) is rnn.Bottleneck
    odd = tr.BasicBlock(16, 16)
    odd.extra = nn.Conv2d(16, 16, 1)
    assert type(resfast.convert(odd)) is tr.BasicBlock


@needs_triton_runtime
@pytest.mark.slow
@pytest.mark.parametrize("name", ["bottleneck", "bottleneck_stride2_avg", "resnext_card32"])
def test_triton_whole_bottleneck_trains_like_modules(name, monkeypatch):
    """Training on the Triton backend: TimmBottleneck without SE/attn/drop_path runs the whole-bottleneck op (scale
    1, as torchvision's), three SGD steps against its module path."""
    pytest.importorskip("triton")
    ran = record_whole_block(monkeypatch, "timm_resnet", "res2net_bottleneck_train")
    _, new, _ = _pair(name)
    new = randomize_bn_signed(new).to(TRITON_DEVICE).train()
    train_steps_like_module_path(new, ran, torch.float64, cl=False)


@needs_triton_runtime
def test_triton_basic_block_se(monkeypatch):
    """The per-op path on the Triton backend (conv_bn_relu with the folded avg-pool projection, SE through
    scale_add_relu) against timm's block, eval, float64."""
    pytest.importorskip("triton")
    orig, new, cin = _pair("basic_se")
    orig, new = orig.to(TRITON_DEVICE).eval(), new.to(TRITON_DEVICE).eval()
    x = torch.randn(2, cin, 6, 5, dtype=torch.float64, device=TRITON_DEVICE)
    with torch.no_grad():
        ref = orig(x)
        with resfast.backend("triton"):
            y = new(x)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
