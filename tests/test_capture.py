"""Every capture and deployment path works on converted models and gives the original's numbers (issue 18 part 2):
torch.jit.script (and save/load), torch.jit.trace (with and without grad), torch.fx.symbolic_trace, torchvision's
create_feature_extractor and timm's fx feature extraction, torch.export, torch.onnx.export with both exporters (run in
ONNX Runtime). The blocks run their plain-module computation there (resfast.nn._common.capturing); torch.compile
keeps the fused ops (checked last)."""

import io
import warnings

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import resfast
from resfast.nn._common import capturing

pytestmark = pytest.mark.slow

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# (source, name); timm's resnet50 counts once resfast.convert converts any of its blocks (skipped until then)
MODELS = [
    ("torchvision", "resnet18"),
    ("torchvision", "resnext50_32x4d"),
    ("timm", "res2net50_26w_4s"),
    ("timm", "res2next50"),
    ("timm", "resnetv2_50"),
    ("timm", "resnet50"),
]
IDS = [f"{s}-{n}" for s, n in MODELS]
X_SHAPE = (1, 3, 64, 64)


def _build(source: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)() if source == "torchvision" else timm.create_model(name)
    return randomize_bn(m).eval()


def _resfast_blocks(model: nn.Module) -> int:
    return sum(type(m).__module__.startswith("resfast.nn.") for m in model.modules())


@pytest.fixture(scope="module", params=MODELS, ids=IDS)
def case(request):
    """(original, converted, x, the original's output), built once per model (pytest groups the tests by it)."""
    orig = _build(*request.param)
    conv = resfast.convert(orig).eval()
    if _resfast_blocks(conv) == 0:
        pytest.skip(f"resfast.convert converts no block of {request.param[1]}")
    x = torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = orig(x)
    return orig, conv, x, ref


def _close(out, ref, rtol=1e-4):
    """Float32 through ~50 layers with randomised BatchNorms: logits reach 1e3-1e4, so the absolute tolerance
    scales with the output."""
    torch.testing.assert_close(out, ref, rtol=rtol, atol=1e-5 * max(1.0, ref.abs().max().item()))


def _no_resfast_ops(graph: torch.fx.Graph):
    bad = [str(n.target) for n in graph.nodes if n.op == "call_function" and "resfast" in str(n.target)]
    assert not bad, bad


def test_script(case):
    _, conv, x, ref = case
    scripted = torch.jit.script(conv)
    with torch.no_grad():
        _close(scripted(x), ref)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)  # saved: nothing Python-only (ignored functions) left in it
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        _close(loaded(x), ref)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_trace(case, grad):
    _, conv, x, ref = case
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(conv, x)  # check_trace on (the default): an inconsistent trace raises
        out = traced(x)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds or "aten::conv2d" in kinds, kinds
    assert not [k for k in kinds if k.startswith("resfast")], kinds
    _close(out.detach(), ref)


def test_trace_check_matches_exactly_on_the_eager_backend(case):
    """check_trace compares the trace with the module's eager forward. That forward runs the fused kernels, which
    round differently (folded BatchNorm, oneDNN): on deep models the check may warn about a last-bits mismatch.
    With the `eager` backend (plain PyTorch ops) the eager forward is the traced computation: no warning at all."""
    _, conv, x, ref = case
    with resfast.backend("eager"), warnings.catch_warnings():
        warnings.filterwarnings("error", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(conv, x)
    _close(traced(x).detach(), ref)


def test_fx_symbolic_trace(case):
    _, conv, x, ref = case
    gm = torch.fx.symbolic_trace(conv)
    _no_resfast_ops(gm.graph)
    with torch.no_grad():
        _close(gm(x), ref)


def test_feature_extractor(case):
    """torchvision's create_feature_extractor (torchvision models) / timm's FeatureGraphNet (timm models) over the
    converted model give the original's features."""
    orig, conv, x, _ = case
    if isinstance(orig, torchvision.models.ResNet):
        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = {"layer1": "f1", "layer2": "f2", "layer4": "f4"}
        fa, fb = create_feature_extractor(orig, return_nodes=nodes), create_feature_extractor(conv, return_nodes=nodes)
    else:
        from timm.models import FeatureGraphNet

        fa = FeatureGraphNet(orig, out_indices=(1, 2, 4), return_dict=True)
        fb = FeatureGraphNet(conv, out_indices=(1, 2, 4), return_dict=True)
    with torch.no_grad():
        ya, yb = fa(x), fb(x)
    assert list(ya) == list(yb) and len(ya) == 3
    for k in ya:
        _close(yb[k], ya[k])


def test_timm_features_only_fx_then_convert():
    """A timm ``features_only=True, feature_cls='fx'`` model is traced when built: its graph calls the blocks' layers,
    not the blocks, so resfast.convert finds nothing to swap (convert first, then extract: test_feature_extractor).
    Converting it still leaves a model with the same features, in eval mode (torch.fx's GraphModule loses the
    train/eval flags of its submodules in copy.deepcopy; convert restores them)."""
    torch.manual_seed(0)
    fm = randomize_bn(timm.create_model("res2net50_26w_4s", features_only=True, feature_cls="fx")).eval()
    conv = resfast.convert(fm)
    assert not any(m.training for m in conv.modules())
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        ya, yb = fm(x), conv(x)
    assert len(ya) == len(yb) == 5
    for a, b in zip(ya, yb):
        _close(b, a)


def test_torch_export(case):
    _, conv, x, ref = case
    ep = torch.export.export(conv, (x,))
    _no_resfast_ops(ep.graph)
    with torch.no_grad():
        _close(ep.module()(x), ref)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime(case, dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    _, conv, x, ref = case
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(conv, (x,), path, dynamo=dynamo, input_names=["x"], output_names=["y"])
    proto = onnx.load(path)
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    assert not [n for n in nodes if "resfast" in n.domain or "resfast" in n.op_type]
    assert not [o for o in proto.opset_import if "resfast" in o.domain]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    _close(torch.from_numpy(y), ref, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# every block class of resfast.nn, in the configurations the models above do not reach


def _ds(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _block_cases():
    from timm.layers import BatchNormAct2d, SEModule, create_conv2d
    from timm.models import resnet as tr
    from timm.models import resnetv2 as tv2

    return {
        "BasicBlock_ds": (lambda: resfast.BasicBlock(32, 64, 2, _ds(32, 64, 2)), 32),
        "Bottleneck_resnext": (lambda: resfast.Bottleneck(64, 16, groups=8, base_width=8), 64),
        "ResBlock_1x1": (lambda: resfast.ResBlock(32, 64, stride=2), 32),
        "ResBlock_identity": (lambda: resfast.ResBlock(64, 64), 64),
        "ResBlock_plain": (lambda: resfast.ResBlock(32, 64, use_residual=False), 32),
        "Res2NetBottleneck_se": (lambda: resfast.Res2NetBottleneck(64, 16), 64),
        "Res2NetBottleneck_ds": (lambda: resfast.Res2NetBottleneck(32, 16, downsample=_ds(32, 64, 1), se=False), 32),
        "Res2NetBottleneck_empty_ds": (lambda: resfast.Res2NetBottleneck(64, 16, downsample=nn.Sequential()), 64),
        "Res2Block_ds": (lambda: resfast.Res2Block(32, 16, 64, stride=2), 32),
        "Res2Block": (lambda: resfast.Res2Block(64, 16, 64), 64),
        "Bottle2neck_stage": (lambda: resfast.Bottle2neck(32, 16, 2, _ds(32, 64, 2), norm_layer=nn.BatchNorm2d), 32),
        "Bottle2neck_se": (lambda: resfast.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d, attn_layer=SEModule), 64),
        "PreActBasicBlock": (lambda: resfast.PreActBasicBlock(64, 64), 64),
        "PreActBottleneck_ds": (lambda: resfast.PreActBottleneck(32, 16, 2, nn.Conv2d(32, 64, 1, 2, bias=False)), 32),
        "TimmPreActBottleneck_proj": (lambda: resfast.TimmPreActBottleneck(
            32, 64, stride=2, conv_layer=create_conv2d, norm_layer=BatchNormAct2d, proj_layer=tv2.DownsampleConv), 32),
        "TimmPreActBasic": (lambda: resfast.TimmPreActBasic(
            64, 64, conv_layer=create_conv2d, norm_layer=BatchNormAct2d), 64),
        # timm's own ResNet blocks, through resfast.convert (left as timm's while convert does not take them)
        "timm_BasicBlock_se": (lambda: resfast.convert(tr.BasicBlock(32, 64, 2, _ds(32, 64, 2), attn_layer=SEModule)),
                               32),
        "timm_Bottleneck_avgdown": (lambda: resfast.convert(tr.Bottleneck(
            64, 16, 2, nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                                     *_ds(64, 64, 1)), cardinality=4, base_width=16)), 64),
    }


@pytest.mark.parametrize("name", list(_block_cases()))
def test_block_capture_paths(name):
    make, cin = _block_cases()[name]
    torch.manual_seed(0)
    blk = randomize_bn(make()).eval()
    if not type(blk).__module__.startswith("resfast.nn."):
        pytest.skip(f"{name}: resfast.convert does not convert it (yet)")
    x = torch.randn(2, cin, 8, 8)
    with torch.no_grad():
        ref = blk._forward_modules(x)
        _close(blk(x), ref)  # the fused path computes the same
        _close(torch.jit.script(blk)(x), ref, rtol=1e-5)
        _close(torch.jit.trace(blk, x, check_trace=False)(x), ref, rtol=1e-5)
        _close(torch.fx.symbolic_trace(blk)(x), ref, rtol=1e-5)
    ep = torch.export.export(blk, (x,))
    _no_resfast_ops(ep.graph)
    with torch.no_grad():
        _close(ep.module()(x), ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the predicate itself, and torch.compile keeping the fused ops


def test_capturing_is_false_in_eager_and_under_compile():
    x = torch.randn(1, 3, 4, 4)
    assert not capturing(x)
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        seen.append(capturing(x))
        return x + 1

    f(x)
    assert seen == [False]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_keeps_the_fused_ops(train):
    """Dynamo traces the fused path (capturing() is False under torch.compile): resfast ops in the graph. Training
    on the `cpu` backend explicitly (`auto` runs CPU training on `eager`, plain PyTorch ops)."""
    torch.manual_seed(0)
    blk = randomize_bn(resfast.Bottleneck(64, 16)).train(train)
    ref = randomize_bn(resfast.Bottleneck(64, 16)).train(train)
    ref.load_state_dict(blk.state_dict())
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(2, 64, 8, 8)
    with resfast.backend("cpu"):
        out = torch.compile(blk, fullgraph=True, backend=record)(x.clone().requires_grad_(train))
        expected = ref(x.clone().requires_grad_(train))
    assert any(t.startswith("resfast") for t in targets), targets
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
