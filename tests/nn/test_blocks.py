"""Every drop-in block against the block it replaces: strict state_dict load, outputs, input and parameter
gradients and BatchNorm buffers over several train steps, eval, channels_last in -> channels_last out."""

import functools

import pytest
import torch
from fixtures import seed000, seed001, seed002, seed003, seed004
from helpers import compare_modules, randomize_bn
from torch import nn

import resfast

timm_res2net = pytest.importorskip("timm.models.res2net")
tv_resnet = pytest.importorskip("torchvision.models.resnet")


def _ds(cin, cout, stride, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), nn.BatchNorm2d(cout))


# name -> (original factory, resfast factory, input channels); factories take no arguments
CASES = {
    # timm Bottle2neck: normal and stage blocks, scale 1/2/4/5, Res2NeXt cardinality, dilation, SE
    "bottle2neck_normal_s4": (functools.partial(timm_res2net.Bottle2neck, 64, 16, norm_layer=nn.BatchNorm2d),
                              functools.partial(resfast.Bottle2neck, 64, 16, norm_layer=nn.BatchNorm2d), 64),
    "bottle2neck_stage_s4_stride2": (
        lambda: timm_res2net.Bottle2neck(32, 16, 2, _ds(32, 64, 2), norm_layer=nn.BatchNorm2d),
        lambda: resfast.Bottle2neck(32, 16, 2, _ds(32, 64, 2), norm_layer=nn.BatchNorm2d), 32),
    "bottle2neck_stage_stride1": (
        lambda: timm_res2net.Bottle2neck(32, 16, 1, _ds(32, 64, 1), scale=5, norm_layer=nn.BatchNorm2d),
        lambda: resfast.Bottle2neck(32, 16, 1, _ds(32, 64, 1), scale=5, norm_layer=nn.BatchNorm2d), 32),
    "bottle2neck_scale1": (functools.partial(timm_res2net.Bottle2neck, 64, 16, scale=1, norm_layer=nn.BatchNorm2d),
                           functools.partial(resfast.Bottle2neck, 64, 16, scale=1, norm_layer=nn.BatchNorm2d), 64),
    "bottle2neck_scale2_dilated": (
        functools.partial(timm_res2net.Bottle2neck, 64, 16, scale=2, dilation=2, norm_layer=nn.BatchNorm2d),
        functools.partial(resfast.Bottle2neck, 64, 16, scale=2, dilation=2, norm_layer=nn.BatchNorm2d), 64),
    "res2next_card8": (
        functools.partial(timm_res2net.Bottle2neck, 64, 16, cardinality=8, base_width=4, norm_layer=nn.BatchNorm2d),
        functools.partial(resfast.Bottle2neck, 64, 16, cardinality=8, base_width=4, norm_layer=nn.BatchNorm2d), 64),
    # torchvision
    "tv_basic": (functools.partial(tv_resnet.BasicBlock, 16, 16), functools.partial(resfast.BasicBlock, 16, 16), 16),
    "tv_basic_stride2": (lambda: tv_resnet.BasicBlock(16, 32, 2, _ds(16, 32, 2)),
                         lambda: resfast.BasicBlock(16, 32, 2, _ds(16, 32, 2)), 16),
    "tv_bottleneck": (functools.partial(tv_resnet.Bottleneck, 64, 16),
                      functools.partial(resfast.Bottleneck, 64, 16), 64),
    "tv_resnext_stride2": (lambda: tv_resnet.Bottleneck(32, 16, 2, _ds(32, 64, 2), groups=8, base_width=4),
                           lambda: resfast.Bottleneck(32, 16, 2, _ds(32, 64, 2), groups=8, base_width=4), 32),
    "tv_bottleneck_dilated": (functools.partial(tv_resnet.Bottleneck, 64, 16, dilation=2),
                              functools.partial(resfast.Bottleneck, 64, 16, dilation=2), 64),
    # seed 002 (ResNeXt article): its blocks are torchvision's with other argument names
    "seed002_bottleneck_grouped": (lambda: seed002.Bottleneck(32, 16, 2, _ds(32, 64, 2), groups=4, width_per_group=8),
                                   lambda: resfast.Bottleneck(32, 16, 2, _ds(32, 64, 2), groups=4, base_width=8), 32),
    "seed002_basic": (lambda: seed002.BasicBlock(16, 16), lambda: resfast.BasicBlock(16, 16), 16),
    # seed 001
    "seed001_se": (functools.partial(seed001.Res2NetBottleneck, 64, 16),
                   functools.partial(resfast.Res2NetBottleneck, 64, 16), 64),
    "seed001_noSE_groups2_stride2": (
        lambda: seed001.Res2NetBottleneck(32, 16, _ds(32, 64, 2, True), stride=2, groups=2, se=False),
        lambda: resfast.Res2NetBottleneck(32, 16, _ds(32, 64, 2, True), stride=2, groups=2, se=False), 32),
    "seed001_scales2": (functools.partial(seed001.Res2NetBottleneck, 64, 16, scales=2),
                        functools.partial(resfast.Res2NetBottleneck, 64, 16, scales=2), 64),
    "seed001_scales1": (functools.partial(seed001.Res2NetBottleneck, 64, 16, scales=1),
                        functools.partial(resfast.Res2NetBottleneck, 64, 16, scales=1), 64),
    # seed 000
    "seed000_res2block": (functools.partial(seed000.Res2Block, 32, 16, 32),
                          functools.partial(resfast.Res2Block, 32, 16, 32), 32),
    "seed000_res2block_stride2": (functools.partial(seed000.Res2Block, 16, 16, 32, 2),
                                  functools.partial(resfast.Res2Block, 16, 16, 32, 2), 16),
    # seed 003
    "seed003_resblock": (functools.partial(seed003.ResBlock, 16, 16), functools.partial(resfast.ResBlock, 16, 16), 16),
    "seed003_resblock_shortcut": (functools.partial(seed003.ResBlock, 16, 32, 2),
                                  functools.partial(resfast.ResBlock, 16, 32, 2), 16),
    "seed003_no_residual": (functools.partial(seed003.ResBlock, 16, 32, 2, use_residual=False),
                            functools.partial(resfast.ResBlock, 16, 32, 2, use_residual=False), 16),
    # seed 004
    "seed004_basic_v2": (lambda: seed004.BasicBlockV2(16, 32, 2, _ds(16, 32, 2)),
                         lambda: resfast.PreActBasicBlock(16, 32, 2, _ds(16, 32, 2)), 16),
    "seed004_bottleneck_v2": (lambda: seed004.BottleneckV2(32, 16, 2, _ds(32, 64, 2)),
                              lambda: resfast.PreActBottleneck(32, 16, 2, _ds(32, 64, 2)), 32),
    "seed004_bottleneck_v2_identity": (functools.partial(seed004.BottleneckV2, 64, 16),
                                       functools.partial(resfast.PreActBottleneck, 64, 16), 64),
}


def _pair(name, dtype=torch.float64):
    make_orig, make_new, cin = CASES[name]
    torch.manual_seed(1)
    orig = randomize_bn(make_orig()).to(dtype)
    new = make_new().to(dtype)
    new.load_state_dict(orig.state_dict(), strict=True)
    assert list(new.state_dict()) == list(orig.state_dict())
    return orig, new, cin


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_block_matches_original(name, train):
    orig, new, cin = _pair(name)
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    compare_modules(orig, new, x, train, steps=3, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["bottle2neck_stage_s4_stride2", "tv_resnext_stride2", "seed001_se",
                                  "seed000_res2block_stride2", "seed003_resblock_shortcut", "seed004_bottleneck_v2"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_channels_last_in_channels_last_out(name, train):
    orig, new, cin = _pair(name, torch.float32)
    orig, new = orig.to(memory_format=torch.channels_last), new.to(memory_format=torch.channels_last)
    x = torch.randn(2, cin, 8, 8).contiguous(memory_format=torch.channels_last)
    ya, yb = compare_modules(orig, new, x, train, steps=1, rtol=1e-5, atol=1e-5)
    assert yb.is_contiguous(memory_format=torch.channels_last)


def test_blocks_run_through_resfast_ops(monkeypatch):
    """The fused path is taken: every block calls resfast.ops (and no BatchNorm module forward)."""
    calls = []
    from resfast.ops import dispatch

    real = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda op, args: calls.append(op) or real(op, args))
    called_bn = []
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, x: called_bn.append(1) or x)
    for name in CASES:
        _, new, cin = _pair(name)
        calls.clear()
        called_bn.clear()
        new.eval()(torch.randn(1, cin, 6, 6, dtype=torch.float64))
        assert calls, name
        if name.startswith(("bottle2neck", "res2next", "seed001")):
            assert "res2net_chain" in calls, name
        # every BatchNorm went through the ops, the Sequential(conv, BN) downsample / shortcut ones included
        assert not called_bn, name


def test_fallback_for_layers_the_ops_do_not_reproduce():
    """A GroupNorm norm_layer (or any custom layer) runs the original computation, not a wrong fused one."""
    gn = functools.partial(nn.GroupNorm, 4)
    orig = tv_resnet.Bottleneck(64, 16, norm_layer=gn).double()
    new = resfast.Bottleneck(64, 16, norm_layer=gn).double()
    new.load_state_dict(orig.state_dict())
    compare_modules(orig, new, torch.randn(2, 64, 5, 5, dtype=torch.float64), True, rtol=1e-10, atol=1e-10)
    orig = timm_res2net.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d, act_layer=nn.SiLU).double()
    new = resfast.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d, act_layer=nn.SiLU).double()
    new.load_state_dict(orig.state_dict())
    compare_modules(orig, new, torch.randn(2, 64, 5, 5, dtype=torch.float64), True, rtol=1e-10, atol=1e-10)


def test_timm_attn_layer_and_drop_path():
    from timm.layers import DropPath
    from timm.models.resnet import create_attn

    se = functools.partial(create_attn, "se")
    for train in (True, False):
        torch.manual_seed(3)
        orig = randomize_bn(timm_res2net.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d, attn_layer=se,
                                                     drop_path=DropPath(0.0))).double()
        new = resfast.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d, attn_layer=se, drop_path=DropPath(0.0)).double()
        new.load_state_dict(orig.state_dict())
        compare_modules(orig, new, torch.randn(2, 64, 6, 5, dtype=torch.float64), train, rtol=1e-10, atol=1e-10)


def test_constructor_checks_match_the_originals():
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        resfast.BasicBlock(16, 16, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        resfast.BasicBlock(16, 16, dilation=2)
    with pytest.raises(ValueError, match="Planes must be divisible by scales"):
        resfast.Res2NetBottleneck(64, 18, scales=4)
    assert resfast.Bottleneck.expansion == resfast.Bottle2neck.expansion == resfast.Res2NetBottleneck.expansion == 4
    assert resfast.BasicBlock.expansion == resfast.PreActBasicBlock.expansion == 1
    assert resfast.PreActBottleneck.expansion == 4


def test_block_errors_are_clear():
    blk = resfast.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="expects 64 input channels .* but the input has 32 channels"):
        blk(torch.randn(2, 32, 5, 5))
    with pytest.raises(ValueError, match="expected a 4-D input"):
        blk(torch.randn(64, 5, 5))
    with pytest.raises(TypeError, match="dtype"):
        blk(torch.randn(2, 64, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        blk.train()(torch.randn(1, 64, 1, 1))


def test_zero_batch_eval():
    for name in CASES:
        _, new, cin = _pair(name)
        y = new.eval()(torch.randn(0, cin, 8, 8, dtype=torch.float64))
        assert y.shape[0] == 0, name


def test_timm_resnet_accepts_resfast_bottle2neck():
    from timm.models.resnet import ResNet

    ref = randomize_bn(ResNet(timm_res2net.Bottle2neck, [1, 1, 1, 1], base_width=26, block_args=dict(scale=4),
                              num_classes=10)).eval()
    new = ResNet(resfast.Bottle2neck, [1, 1, 1, 1], base_width=26, block_args=dict(scale=4), num_classes=10).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(new(x), ref(x))


def test_torchvision_resnet_accepts_resfast_bottleneck():
    ref = randomize_bn(tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)).eval()
    new = tv_resnet.ResNet(resfast.Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(new(x), ref(x))


def test_sync_batchnorm_keeps_the_module_path(monkeypatch):
    """convert_sync_batchnorm swaps in SyncBatchNorm: the block must run it (synchronised statistics), not a
    fused op that would silently drop the synchronisation."""
    orig, new, cin = _pair("bottle2neck_stage_s4_stride2")
    new = nn.SyncBatchNorm.convert_sync_batchnorm(new).eval()
    from resfast.ops import dispatch

    calls = []
    real = dispatch.run
    monkeypatch.setattr(dispatch, "run", lambda op, args: calls.append(op) or real(op, args))
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(new(x), orig.eval()(x), rtol=1e-10, atol=1e-10)
    assert calls == []


def test_preact_block_with_other_activation_keeps_module_path():
    """A block whose `relu` was swapped for another activation runs its modules, not the fused ReLU op."""
    orig, new, cin = _pair("seed004_bottleneck_v2")
    orig.relu = nn.LeakyReLU(0.5)
    new.relu = nn.LeakyReLU(0.5)
    compare_modules(orig, new, torch.randn(2, cin, 8, 8, dtype=torch.float64), True, rtol=1e-10, atol=1e-10)
