"""resfast.convert on whole timm/torchvision/seed models and a detector backbone: identical outputs."""

import copy

import pytest
import torch
from fixtures import seed000, seed001, seed002, seed003, seed004
from helpers import assert_fused_close, check_fused_model, compare_modules, randomize_bn
from torch import nn

import resfast
from resfast import nn as rnn

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")

RESFAST_BLOCKS = (rnn.BasicBlock, rnn.Bottleneck, rnn.Bottle2neck, rnn.Res2NetBottleneck, rnn.Res2Block,
                  rnn.ResBlock, rnn.PreActBasicBlock, rnn.PreActBottleneck, rnn.TimmPreActBottleneck,
                  rnn.TimmPreActBasic)

MODELS = {
    "timm_res2net50_26w_4s": lambda: timm.create_model("res2net50_26w_4s"),
    "timm_res2next50": lambda: timm.create_model("res2next50"),
    "timm_res2net50_14w_8s": lambda: timm.create_model("res2net50_14w_8s"),
    "timm_resnetv2_50": lambda: timm.create_model("resnetv2_50"),
    "timm_resnetv2_50d": lambda: timm.create_model("resnetv2_50d"),  # deep stem, DownsampleAvg shortcuts
    "timm_resnetv2_18": lambda: timm.create_model("resnetv2_18"),  # PreActBasic
    "tv_resnet18": lambda: tvm.resnet18(),
    "tv_resnet50": lambda: tvm.resnet50(),
    "tv_resnext50_32x4d": lambda: tvm.resnext50_32x4d(),
    "seed000": seed000.Res2Net,
    "seed001": lambda: seed001.Res2Net([2, 2, 2, 2], 5),
    "seed002_resnext50": seed002.resnext50_32x4d,
    "seed002_resnet34": seed002.resnet34,
    "seed003": lambda: seed003.Model_ResNet18(3, 10),
    "seed004_resnet50_v2": seed004.resnet50_v2,
    "seed004_resnet18_v2": seed004.resnet18_v2,
}


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ in
            ("BasicBlock", "Bottleneck", "Bottle2neck", "Res2NetBottleneck", "Res2Block", "ResBlock", "BasicBlockV2",
             "BottleneckV2", "PreActBasicBlock", "PreActBottleneck", "PreActBasic", "TimmPreActBottleneck",
             "TimmPreActBasic")]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_convert_whole_model_identical_logits(name):
    orig = randomize_bn(MODELS[name]()).eval()
    conv = resfast.convert(orig)
    blocks = _blocks(conv)
    assert blocks and all(isinstance(b, RESFAST_BLOCKS) for b in blocks)
    assert not any(isinstance(b, RESFAST_BLOCKS) for b in _blocks(orig)), "inplace=False must not touch the input"
    assert list(conv.state_dict()) == list(orig.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), resfast.backend("eager"):  # the same computation: bit-identical
        torch.testing.assert_close(conv(x), orig(x), rtol=0, atol=0)
    check_fused_model(orig, conv, x)  # the default backend (folded BatchNorm on CPU): the accuracy rule


@pytest.mark.parametrize("name", ["timm_res2net50_26w_4s", "tv_resnext50_32x4d", "seed001", "seed004_resnet18_v2",
                                  "timm_resnetv2_50", "timm_resnetv2_50d", "timm_resnetv2_18"])
@pytest.mark.slow
def test_convert_training_step_identical(name):
    orig = randomize_bn(MODELS[name]()).double()
    conv = resfast.convert(orig)
    compare_modules(orig, conv, torch.randn(2, 3, 48, 48, dtype=torch.float64), True, steps=2, rtol=1e-10,
                    atol=1e-10)


@pytest.mark.parametrize("name, cls, count", [("resnetv2_50", rnn.TimmPreActBottleneck, 16),
                                              ("resnetv2_101", rnn.TimmPreActBottleneck, 33),
                                              ("resnetv2_50d", rnn.TimmPreActBottleneck, 16),
                                              ("resnetv2_18", rnn.TimmPreActBasic, 8)])
def test_convert_timm_resnetv2_every_block(name, cls, count):
    """Every pre-activation block of timm's ResNetV2 is converted (the benchmark's count says so too), the
    state_dict keys stay, and a timm checkpoint loads strictly into the converted model."""
    from resfast._bench.models import count_blocks

    orig = timm.create_model(name)
    conv = resfast.convert(orig)
    assert sum(type(m) is cls for m in conv.modules()) == count
    assert count_blocks(conv) == (count, count) and count_blocks(orig) == (0, count)
    assert list(conv.state_dict()) == list(orig.state_dict())
    conv.load_state_dict(randomize_bn(orig).state_dict(), strict=True)


@pytest.mark.slow
def test_convert_timm_resnetv2_drop_path_training():
    """With drop_path_rate > 0 every block holds a DropPath: training drops the residual branch per sample
    exactly as timm does (same generator state -> same mask), gradients and buffers included."""
    orig = randomize_bn(timm.create_model("resnetv2_50", num_classes=10, drop_path_rate=0.3)).double().train()
    conv = resfast.convert(orig)
    assert sum(isinstance(m, rnn.TimmPreActBottleneck) for m in conv.modules()) == 16
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = orig(xa)
    torch.manual_seed(5)
    yb = conv(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-9, atol=1e-9)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-9)
    for k, v in orig.state_dict().items():
        torch.testing.assert_close(conv.state_dict()[k], v, rtol=1e-9, atol=1e-9, msg=k)


@pytest.mark.slow
def test_convert_detector_backbone_with_frozen_bn():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    bb = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    with torch.no_grad():
        for m in bb.modules():
            if type(m).__name__ == "FrozenBatchNorm2d":
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    bb.eval()
    conv = resfast.convert(bb)
    assert all(isinstance(b, rnn.Bottleneck) for b in _blocks(conv)) and _blocks(conv)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = bb(x), conv(x)
        ref = copy.deepcopy(bb).double()(x.double())
        with resfast.backend("eager"):
            c = conv(x)
    assert list(a) == list(b)
    for k in a:
        assert_fused_close(b[k], a[k], ref[k])
        torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-5)


def test_inplace_and_root_block():
    m = tvm.resnet18()
    out = resfast.convert(m, inplace=True)
    assert out is m and isinstance(m.layer1[0], rnn.BasicBlock)
    blk = randomize_bn(timm.models.res2net.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d)).eval()
    new = resfast.convert(blk)
    assert isinstance(new, rnn.Bottle2neck)
    x = torch.randn(1, 64, 8, 8)
    torch.testing.assert_close(new(x), blk(x), rtol=0, atol=0)


def test_unrecognised_blocks_are_left_alone():
    class Bottleneck(nn.Module):  # a look-alike name with other children: not torchvision's block
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 3, 1)
            self.act1 = nn.ReLU()

        def forward(self, x):
            return self.act1(self.conv1(x))

    model = nn.Sequential(Bottleneck(), nn.Conv2d(3, 3, 3), timm.create_model("resnet18", num_classes=3))
    conv = resfast.convert(model)
    assert type(conv[0]) is Bottleneck and type(conv[1]) is nn.Conv2d
    assert not any(isinstance(m, RESFAST_BLOCKS) for m in conv.modules())  # no torchvision-style block swapped in
    assert sum(isinstance(m, rnn.TimmBasicBlock) for m in conv.modules()) == 8  # timm's own: their resfast class
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(conv.eval()(x), model.eval()(x))


def test_lookalike_with_other_semantics_is_not_converted():
    """A pre-activation block named BasicBlock (same children as torchvision's) must not be swapped for the
    post-activation one: the behavioural check rejects it, and the model's outputs stay the same."""

    class BasicBlock(nn.Module):  # e.g. bearpaw/pytorch-classification's preresnet block
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.downsample = downsample

        def forward(self, x):
            out = self.conv1(self.relu(self.bn1(x)))
            out = self.conv2(self.relu(self.bn2(out)))
            return out + (x if self.downsample is None else self.downsample(x))

    m = nn.Sequential(BasicBlock(16, 16), seed002.BasicBlock(16, 16)).eval()
    c = resfast.convert(m)
    assert type(c[0]) is BasicBlock  # rejected by the check
    assert isinstance(c[1], rnn.BasicBlock)  # seed 002's true torchvision-style block passes it
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)


# The families resfast converts: every model timm registers under these names, and torchvision's builders
FAMILIES = ["resnet*", "resnext*", "seresnext*", "seresnet*", "ecaresnet*", "wide_resnet*", "res2net*", "res2next*",
            "resnetv2*", "resnetrs*", "resnetblur*", "resnetaa*"]
TV_BUILDERS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
               "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
_RESIDUAL_BLOCKS = {"BasicBlock", "Bottleneck", "Bottle2neck", "PreActBottleneck", "PreActBasic"}


def _family_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in _RESIDUAL_BLOCKS]


@pytest.mark.slow
def test_every_family_model_converts_all_its_blocks():
    """Built on the meta device (no weights): every residual block of every timm model of the families and of
    torchvision's ResNet/ResNeXt/Wide-ResNet builders becomes a resfast block."""
    names = timm.list_models(FAMILIES)
    missed, checked = {}, 0
    for name in names + [f"tv:{n}" for n in TV_BUILDERS]:
        with torch.device("meta"):
            model = getattr(tvm, name[3:])() if name.startswith("tv:") else timm.create_model(name)
        blocks = len(_family_blocks(model))
        if not blocks:  # a name in the family built on other blocks (timm's byobnet resnet32ts, resnet50_clip ...)
            assert type(model).__module__ not in ("timm.models.resnet", "timm.models.resnetv2"), name
            continue
        checked += 1
        conv = resfast.convert(model)
        ours = sum(isinstance(m, RESFAST_BLOCKS + (rnn.TimmBasicBlock, rnn.TimmBottleneck)) for m in conv.modules())
        if ours != blocks:
            missed[name] = (ours, blocks)
    assert not missed, missed
    assert checked > 100
