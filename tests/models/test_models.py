"""Every builder against the original model: same state_dict keys (strict load), same logits; a few in
training mode with gradients and running stats; weights from a path or dict; num_classes."""

import pytest
import torch
from fixtures import seed000, seed001, seed003, seed004
from helpers import check_fused_model, compare_modules, randomize_bn

from resfast import models

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")

TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d"]
TIMM = ["res2net50_26w_4s", "res2net50_26w_6s", "res2net50_26w_8s", "res2net50_48w_2s", "res2net50_14w_8s",
        "res2net101_26w_4s", "res2next50"]
V2 = ["resnet18_v2", "resnet34_v2", "resnet50_v2", "resnet101_v2", "resnet152_v2"]


def _original(name, num_classes=1000):
    if name in TORCHVISION:
        return getattr(tvm, name)(weights=None, num_classes=num_classes)
    if name in TIMM:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if name in V2:
        return getattr(seed004, name)(num_classes)
    if name == "res2net_fashion_mnist":
        return seed000.Res2Net()
    if name == "se_res2net":
        return seed001.Res2Net([3, 4, 6, 3], 5)
    if name == "resnet18_mnist":
        return seed003.Model_ResNet18(3, 10)
    raise KeyError(name)


ARTICLES = ["res2net_fashion_mnist", "se_res2net", "resnet18_mnist"]  # the source articles' small models


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION + TIMM + V2 + ARTICLES)
def test_builder_matches_original_in_eval(name):
    orig = randomize_bn(_original(name)).eval()
    new = models.get_model(name, weights=orig.state_dict()).eval()
    assert list(new.state_dict()) == list(orig.state_dict())
    x = torch.randn(2, 3, 64, 64)
    check_fused_model(orig, new, x)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "res2net50_26w_4s", "res2next50", "resnet50_v2"]
                         + ARTICLES)
@pytest.mark.slow
def test_builder_matches_original_in_training(name):
    orig = randomize_bn(_original(name)).double()
    new = models.get_model(name, weights=orig.state_dict()).double()
    compare_modules(orig, new, torch.randn(2, 3, 48, 48, dtype=torch.float64), True, steps=2, rtol=1e-9, atol=1e-9)


def test_resnet18_mnist_without_residual():
    orig = randomize_bn(seed003.Model_ResNet18(1, 10, use_residual=False)).eval()
    new = models.resnet18_mnist(1, 10, use_residual=False, weights=orig.state_dict()).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(new(x), orig(x))


@pytest.mark.slow
def test_se_res2net_small_layout_and_options():
    for kw in (dict(scales=2, se=False), dict(groups=2, width=8), dict(zero_init_residual=False)):
        orig = randomize_bn(seed001.Res2Net([1, 1, 1, 1], 7, **kw)).eval()
        new = models.se_res2net([1, 1, 1, 1], 7, weights=orig.state_dict(), **kw).eval()
        x = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(new(x), orig(x))
        torch.testing.assert_close(new(x).sum(1), torch.ones(2))  # the article's model returns probabilities


def test_weights_from_path_and_checkpoint(tmp_path):
    orig = randomize_bn(tvm.resnet18(num_classes=10)).eval()
    path = tmp_path / "r18.pth"
    torch.save(orig.state_dict(), path)
    a = models.resnet18(num_classes=10, weights=path).eval()
    torch.save({"state_dict": orig.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    b = models.resnet18(num_classes=10, weights=str(tmp_path / "ckpt.pth")).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a(x), orig(x))
    torch.testing.assert_close(b(x), orig(x))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        models.resnet18(weights=tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        models.resnet18(num_classes=5, weights=path)


def test_num_classes_and_unknown_model():
    assert models.res2net50_26w_4s(num_classes=7).fc.out_features == 7
    assert models.resnet18_v2(num_classes=3).fc.out_features == 3
    assert models.res2net_fashion_mnist(num_classes=4).fc.out_features == 4
    with pytest.raises(ValueError, match="unknown model 'res2net50'"):
        models.get_model("res2net50")


OLD_NAMES = {  # deprecated alias -> new name
    "seed000_res2net": "res2net_fashion_mnist", "seed001_res2net": "se_res2net", "seed003_resnet18": "resnet18_mnist",
    "Seed000Res2Net": "Res2NetFashionMNIST", "Seed001Res2Net": "SERes2Net", "Seed003ResNet18": "ResNet18MNIST",
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_names_are_deprecated_aliases(old):
    import warnings

    from resfast.models import seeds

    new = OLD_NAMES[old]
    assert old not in models.BUILDERS and old not in models.__all__ and new in models.__all__
    for module in (models, seeds):
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; use resfast.models.{new}"):
            obj = getattr(module, old)
        assert obj is getattr(models, new)
    with pytest.warns(DeprecationWarning, match=new):
        exec(f"from resfast.models import {old}", {})
    if old[0].islower():  # a builder: by name too, same structure and state_dict keys
        with pytest.warns(DeprecationWarning, match=new):
            m_old = models.get_model(old, num_classes=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m_new = models.get_model(new, num_classes=3)
        assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
        assert type(m_old) is type(m_new) and str(m_old) == str(m_new)
        shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (m_old, m_new)]
        assert list(shapes[0]) == list(shapes[1]) and shapes[0] == shapes[1]
    assert not hasattr(models, "seed002_resnext")  # only the three old names resolve


def test_res2net_is_zero_initialised_like_timm():
    m = models.res2net50_26w_4s()
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in m.modules() if hasattr(b, "convs"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["res2net50_26w_4s", "resnext50_32x4d", "resnet50_v2"])
def test_channels_last_model(name):
    orig = randomize_bn(_original(name)).eval().to(memory_format=torch.channels_last)
    new = models.get_model(name, weights=orig.state_dict()).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    check_fused_model(orig, new, x)
    with torch.no_grad():
        # the trunk (stem + first stage of resfast blocks) keeps channels_last; the logits are 2-D
        feats = new.layer1(new.maxpool(new.relu(new.bn1(new.conv1(x)))))
        assert feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()
