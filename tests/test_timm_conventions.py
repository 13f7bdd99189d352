"""timm's model conventions hold on converted models, checked against the unconverted model (the checks of timm's
tests/test_models.py that a converted model must keep passing, on small inputs): forward and backward, every
parameter receiving its gradient, forward_features/forward_head, forward_intermediates, features_only models,
gradient checkpointing, reset_classifier, drop_path_rate in training, dtype casts, deepcopy and pickle."""

import copy
import io
import pickle

import pytest
import torch
from helpers import randomize_bn

import resfast

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.slow

# one model per block class: timm's BasicBlock (resnet18), Bottleneck (seresnext26d_32x4d: grouped, SE, deep stem,
# avg-pool shortcuts), Bottle2neck (res2net50_26w_4s) and PreActBottleneck (resnetv2_50); the other models of the
# families are the same classes (tests/test_convert.py converts all of them, tests/test_capture.py captures more)
NAMES = ["resnet18", "seresnext26d_32x4d", "res2net50_26w_4s", "resnetv2_50"]
X = (2, 3, 32, 32)


def _blocks(model):
    return sum(type(m).__module__.startswith("resfast.nn") for m in model.modules())


def _pair(name, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    orig = randomize_bn(timm.create_model(name, pretrained=False, **kw)).to(dtype)
    conv = resfast.convert(orig)
    assert _blocks(conv) > 0 and _blocks(orig) == 0, "the converted model holds resfast blocks"
    return orig, conv


def _x(dtype=torch.float64, seed=1):
    return torch.randn(*X, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or dict(rtol=1e-9, atol=1e-9)))


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_like_timm(name):
    """timm's test_model_forward/test_model_backward on the converted model: output shape and values,
    forward_features + forward_head(pre_logits), every parameter gets a gradient equal to the original's, and the
    running statistics move the same way."""
    orig, conv = _pair(name)
    for m in (orig, conv):
        m.eval()
    x = _x()
    with torch.no_grad():
        y = conv(x)
        assert y.shape == (X[0], orig.num_classes) and not torch.isnan(y).any()
        _close(y, orig(x))
        feats = conv.forward_features(x)
        _close(feats, orig.forward_features(x))
        assert conv.forward_head(feats, pre_logits=True).shape == (X[0], conv.num_features)
    for m in (orig, conv):
        m.train()
    ya, yb = orig(x), conv(x)
    _close(yb, ya)
    ya.mean().backward()
    yb.mean().backward()
    pa, pb = dict(orig.named_parameters()), dict(conv.named_parameters())
    assert list(pa) == list(pb)
    assert sum(p.grad is not None for p in pb.values()) == len(pb)
    for k in pa:
        _close(pb[k].grad, pa[k].grad, rtol=1e-7, atol=1e-9)
    for k, v in orig.state_dict().items():
        _close(conv.state_dict()[k], v)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    orig, conv = _pair(name)
    x = _x()
    with torch.no_grad():
        fa, ia = orig.eval().forward_intermediates(x, indices=3)
        fb, ib = conv.eval().forward_intermediates(x, indices=3)
        _close(fb, fa)
        assert len(ib) == len(ia) == 3
        for a, b in zip(ia, ib):
            _close(b, a)
        # intermediates_only and pruning keep working on the converted model
        only = conv.forward_intermediates(x, indices=2, intermediates_only=True)
        for a, b in zip(ia[-2:], only):
            _close(b, a)
    pruned = copy.deepcopy(conv)
    pruned.prune_intermediate_layers(indices=1, prune_head=True)
    with torch.no_grad():
        _close(pruned.forward_intermediates(x, indices=1, intermediates_only=True)[0], ia[-1])


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    """timm's test_model_forward_features: feature_info's channels and reductions agree with the outputs, and the
    values with the unconverted features_only model."""
    orig, conv = _pair(name, features_only=True, out_indices=(1, 2, 3))
    x = _x()
    with torch.no_grad():
        outs, ref = conv.eval()(x), orig.eval()(x)
    assert len(outs) == len(ref) == 3
    for o, r, c, red in zip(outs, ref, conv.feature_info.channels(), conv.feature_info.reduction()):
        assert o.shape[1] == c and o.shape[-1] == X[-1] // red
        _close(o, r)


def _same_training_step(orig, conv):
    """One training forward/backward of each model from the same random state: same outputs, same gradients."""
    orig.train()
    conv.train()
    x = _x()
    torch.manual_seed(3)
    ya = orig(x)
    torch.manual_seed(3)
    yb = conv(x)
    _close(yb, ya)
    ya.sum().backward()
    yb.sum().backward()
    for (k, a), b in zip(orig.named_parameters(), conv.parameters()):
        _close(b.grad, a.grad, rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing(name):
    orig, conv = _pair(name)
    conv.set_grad_checkpointing(True)
    _same_training_step(orig, conv)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    orig, conv = _pair(name)
    x = _x()
    for m in (orig, conv):
        m.reset_classifier(0)
        m.eval()
    with torch.no_grad():
        y = conv(x)
        assert y.shape == (X[0], conv.num_features)
        _close(y, orig(x))
    conv.reset_classifier(7)
    assert conv(x).shape == (X[0], 7)


@pytest.mark.parametrize("name", NAMES)
def test_drop_path_rate_training(name):
    """Stochastic depth in training: the same random draws give the same outputs and gradients."""
    orig, conv = _pair(name, drop_path_rate=0.25)
    _same_training_step(orig, conv)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_casts(name, dtype):
    """model.half() / .bfloat16(): the converted model's error against float64 stays within twice the original's
    (same dtype) plus a floor; float64 itself is checked in the other tests."""
    orig, conv = _pair(name, dtype=torch.float64)
    x = _x()
    with torch.no_grad():
        ref = orig.eval()(x)
        a = copy.deepcopy(orig).to(dtype).eval()(x.to(dtype)).double()
        b = (conv.half() if dtype == torch.float16 else conv.bfloat16()).eval()(x.to(dtype))
    assert b.dtype == dtype
    assert next(conv.parameters()).dtype == dtype
    err_eager, err_fused = (a - ref).abs().max().item(), (b.double() - ref).abs().max().item()
    assert err_fused <= 2 * err_eager + 1e-3 * ref.abs().max().item(), (err_fused, err_eager)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_pickle_and_torch_save(name):
    orig, conv = _pair(name)
    x = _x()
    with torch.no_grad():
        ref = orig.eval()(x)
        copies = [copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))]
        buf = io.BytesIO()
        torch.save(conv, buf)
        buf.seek(0)
        copies.append(torch.load(buf, weights_only=False))
        for c in copies:
            assert _blocks(c) == _blocks(conv)
            _close(c.eval()(x), ref)


@pytest.mark.parametrize("name", NAMES)
def test_forward_fx_exactly_like_eager(name):
    """timm's test_model_forward_fx: the graph of timm's FX feature extraction (get_notrace_modules() as leaves) gives
    exactly (``==``) the eager model's output, in float32. The converted blocks are leaves of timm's tracer
    (registered by convert), so the graph calls them and they run the same fused ops as in eager; traced into, their
    plain-module computation differs from the fused ops in the last bits."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    orig, conv = _pair(name, dtype=torch.float32)
    conv.eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(conv, tracer_kwargs=tracer_kwargs)
    fx = create_feature_extractor(conv, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                  tracer_kwargs=tracer_kwargs)
    called = {n.target for n in fx.graph.nodes if n.op == "call_module"}
    assert any(type(fx.get_submodule(t)).__module__.startswith("resfast.nn") for t in called)
    x = _x(torch.float32)
    with torch.inference_mode():
        y = conv(x)
        y_fx = torch.cat(tuple(fx(x).values()))
        assert torch.equal(y_fx, y)
        torch.testing.assert_close(y, orig.eval()(x), rtol=1e-4, atol=1e-4 * max(1.0, y.abs().max().item()))
    # and the graph still scripts (timm's test_model_forward_fx_torchscript): the blocks compile _forward_modules
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(fx)(x)[eval_nodes[-1]], y, rtol=1e-4,
                                   atol=1e-4 * max(1.0, y.abs().max().item()))
