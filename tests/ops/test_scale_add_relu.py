"""scale_add_relu (an SE bottleneck's end: ``relu(x * gate[n, c] + residual)``) against its reference, and the SE
blocks that use it: the eager op is exactly the originals' three steps, gradcheck in float64, bad inputs; which SE
modules are recognised (resfast's/seed 001's, timm's) and that others are still called."""

import functools

import pytest
import torch
from fixtures import seed001
from helpers import compare_modules, randomize_bn
from torch import nn

import resfast
from resfast import ops
from resfast.nn._common import se_gate

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, True), (True, False)])
def test_eager_is_the_originals_three_steps(cl, residual, relu):
    x = torch.randn(2, 7, 5, 3)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    gate = torch.rand(2, 7, 1, 1)
    r = torch.randn(2, 7, 5, 3) if residual else None
    expected = x * gate
    if residual:
        expected = expected + r
    if relu:
        expected = torch.relu(expected)
    with resfast.backend("eager"):
        out = ops.scale_add_relu(x, gate, r, relu=relu)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(ops.scale_add_relu_ref(x, gate.flatten(1), r, relu=relu), expected, rtol=0, atol=0)


def test_gradcheck():
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.scale_add_relu(*t), (x, g, r))


def test_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 3\)"):
        ops.scale_add_relu(x, torch.rand(2, 4))
    with pytest.raises(ValueError, match="residual has shape"):
        ops.scale_add_relu(x, torch.rand(2, 3), torch.randn(2, 3, 4, 5))
    with pytest.raises((TypeError, ValueError), match="gate"):
        ops.scale_add_relu(x, torch.rand(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D"):
        ops.scale_add_relu(torch.randn(3, 4, 4), torch.rand(3, 4))


def _timm_se(**kw):
    from timm.layers.squeeze_excite import SEModule

    return functools.partial(SEModule, **kw)


def test_recognised_se_modules_give_their_gate():
    y = torch.randn(2, 32, 5, 4)
    for se in (resfast.SEModule(32, 4), seed001.SEModule(32, 4), _timm_se()(32), _timm_se(act_layer=nn.SiLU)(32)):
        gate = se_gate(se, y)
        assert gate is not None and gate.shape == (2, 32, 1, 1)
        torch.testing.assert_close(y * gate, se(y), rtol=0, atol=0)
    assert se_gate(_timm_se(add_maxpool=True)(32), y) is None  # not y * gate(mean): the module runs itself
    assert se_gate(nn.Identity(), y) is None and se_gate(None, y) is None


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("se_kw", [dict(), dict(add_maxpool=True)], ids=["se", "se-maxpool"])
def test_timm_se_block_matches(train, se_kw):
    from timm.models import res2net as timm_res2net

    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    orig = randomize_bn(timm_res2net.Bottle2neck(32, 16, stride=2, downsample=ds, norm_layer=nn.BatchNorm2d,
                                                 attn_layer=_timm_se(**se_kw))).double()
    new = resfast.convert(orig)
    compare_modules(orig, new, torch.randn(2, 32, 7, 6, dtype=torch.float64), train, rtol=1e-10, atol=1e-10)


def test_seed001_se_block_uses_the_op(monkeypatch):
    orig = randomize_bn(seed001.Res2NetBottleneck(64, 16, stride=1, se=True)).double().eval()
    new = resfast.convert(orig)
    calls = []
    real = ops.scale_add_relu
    monkeypatch.setattr(ops, "scale_add_relu", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert type(new) is resfast.Res2NetBottleneck
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), orig(x), rtol=1e-10, atol=1e-10)
    assert calls == [1]
