"""The `cpu` backend (resfast._C's CPU kernels, BatchNorm folded into cached, oneDNN-prepacked weights) against the
eager reference: float64 to 1e-10, float32/bfloat16 under the accuracy rule, odd shapes, both layouts, the fold
cache's refresh, opcheck of the C++ ops, bad inputs, torch.compile."""

import copy
import io
import itertools

import pytest
import torch
from helpers import assert_fused_close, randomize_bn
from timm.models import res2net as timm_res2net
from torch import nn
from torchvision.models import resnet as tv_resnet

import resfast
from resfast import ops
from resfast.ops import dispatch

pytestmark = pytest.mark.skipif(dispatch.get("cpu").static_reasons("conv_bn_relu") != (),
                                reason="resfast._C with the cpu kernels is not built")


def _bn(c, dtype=torch.float64):
    return randomize_bn(nn.BatchNorm2d(c, dtype=dtype)).eval()


def _x(shape, dtype, cl):
    x = torch.randn(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


CONV_CASES = list(itertools.product([1, 3], [1, 2], [1, 2, "dw"], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("k,stride,groups,dilation,residual,cl", CONV_CASES)
def test_conv_bn_relu_float64(k, stride, groups, dilation, residual, cl):
    cin, cout = 6, 6 if groups == "dw" else 10
    g = cin if groups == "dw" else groups
    x = _x((2, cin, 7, 5), torch.float64, cl)
    w = torch.randn(cout, cin // g, k, k, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64)
    bn = _bn(cout)
    pad = dilation * (k // 2)
    oh, ow = (7 + 2 * pad - dilation * (k - 1) - 1) // stride + 1, (5 + 2 * pad - dilation * (k - 1) - 1) // stride + 1
    r = _x((2, cout, oh, ow), torch.float64, cl) if residual else None
    kw = dict(bias=b, stride=stride, padding=pad, dilation=dilation, groups=g, residual=r)
    ref = ops.conv_bn_relu_ref(x, w, bn, **kw)
    with resfast.backend("cpu"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, **kw)
        no_relu = ops.conv_bn_relu(x, w, bn, relu=False, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(no_relu, ops.conv_bn_relu_ref(x, w, bn, relu=False, **kw), rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("residual,cl,stride", list(itertools.product([False, True], [False, True], [1, 2])))
def test_bn_relu_conv_float64(residual, cl, stride):
    x = _x((2, 6, 9, 6), torch.float64, cl)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    oh, ow = (9 - 1) // stride + 1, (6 - 1) // stride + 1
    r = _x((2, 8, oh, ow), torch.float64, cl) if residual else None
    kw = dict(stride=stride, padding=1, residual=r)
    with resfast.backend("cpu"), torch.no_grad():
        out = ops.bn_relu_conv(x, _bn(6), w, **kw)
    torch.testing.assert_close(out, ops.bn_relu_conv_ref(x, _bn(6), w, **kw), rtol=1e-10, atol=1e-10)


CHAIN_CASES = [c for c in itertools.product([1, 2, 4, 5], ["timm", "paper"], ["normal", "stage"], [1, 2], [1, 2],
                                            [1, 2], [False, True])
               if not (c[2] == "normal" and c[3] != 1)]


@pytest.mark.parametrize("scale,order,block_type,stride,groups,dilation,cl", CHAIN_CASES)
def test_res2net_chain_float64(scale, order, block_type, stride, groups, dilation, cl):
    width = 3 * groups
    n = max(1, scale - 1) if order == "timm" else scale - 1
    x = _x((2, scale * width, 7, 6), torch.float64, cl)
    ws = [torch.randn(width, width // groups, 3, 3, dtype=torch.float64) * 0.3 for _ in range(n)]
    bs = [torch.randn(width, dtype=torch.float64) for _ in range(n)]
    bns = [_bn(width) for _ in range(n)]
    kw = dict(scale=scale, biases=bs, stride=stride, dilation=dilation, groups=groups, order=order,
              block_type=block_type)
    with resfast.backend("cpu"), torch.no_grad():
        out = ops.res2net_chain(x, ws, bns, **kw)
    torch.testing.assert_close(out, ops.res2net_chain_ref(x, ws, bns, **kw), rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 56, 1, 1), (3, 104, 9, 11), (2, 208, 14, 14)], ids=str)
def test_res2net_chain_low_precision_accuracy_rule(dtype, shape):
    """Folding changes the rounding: err(cpu) <= 2 x err(eager same dtype) + floor, both against float64."""
    N, C, H, W = shape
    scale, width = 4, C // 4
    x64 = torch.randn(N, C, H, W, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(width, width, 3, 3, dtype=torch.float64) / (3 * width ** 0.5) for _ in range(3)]
    bns = [_bn(width) for _ in range(3)]
    for block_type, stride in (("normal", 1), ("stage", 2)):
        kw = dict(scale=scale, stride=stride, block_type=block_type)
        ref = ops.res2net_chain_ref(x64, ws, bns, **kw)
        low = [copy.deepcopy(b).to(dtype) for b in bns]
        x, wl = x64.to(dtype), [w.to(dtype) for w in ws]
        eager = ops.res2net_chain_ref(x, wl, low, **kw)
        with resfast.backend("cpu"), torch.no_grad():
            out = ops.res2net_chain(x, wl, low, **kw)
        assert out.dtype == dtype
        assert_fused_close(out, eager, ref, floor=1e-6 if dtype == torch.float32 else 1e-2)


def test_zero_batch_and_auto_choice():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), _bn(6, torch.float32)
    x = torch.randn(0, 4, 5, 5)
    with torch.no_grad():
        assert ops.conv_bn_relu(x, conv.weight, bn, padding=1).shape == (0, 6, 5, 5)
        assert dispatch.select("conv_bn_relu", _args(torch.randn(1, 4, 5, 5), conv, bn)).name == "cpu"
    # gradients needed, or training BatchNorm: the cpu backend runs them (the C++ training ops, float32/float64), but
    # auto keeps eager (measured slower on CPU so far); bfloat16 training: not on the cpu backend
    grad_args = _args(torch.randn(1, 4, 5, 5, requires_grad=True), conv, bn)
    assert dispatch.select("conv_bn_relu", grad_args).name == "eager"
    assert dispatch.get("cpu").not_supported_reasons("conv_bn_relu", grad_args) == []
    assert any("auto keeps eager" in r for r in dispatch.get("cpu").auto_input_reasons("conv_bn_relu", grad_args))
    with torch.no_grad():
        assert dispatch.select("conv_bn_relu", _args(torch.randn(2, 4, 5, 5), conv, bn, True)).name == "eager"
        with resfast.backend("cpu"):
            assert dispatch.select("conv_bn_relu", _args(torch.randn(2, 4, 5, 5), conv, bn, True)).name == "cpu"
        bf = _bn(6, torch.bfloat16).train()
        assert dispatch.select("conv_bn_relu", _args(torch.randn(2, 4, 5, 5, dtype=torch.bfloat16),
                                                     conv.bfloat16(), bf, True)).name == "eager"
        with resfast.backend("cpu"), pytest.raises(ops.BackendUnavailableError, match="in training"):
            ops.conv_bn_relu(torch.randn(2, 4, 5, 5, dtype=torch.bfloat16), conv.weight, bf, padding=1,
                             training=True)


def _args(x, conv, bn, training=False):
    from resfast.ops._args import prepare_conv_bn_relu

    return prepare_conv_bn_relu(x, conv.weight, bn, None, 1, 1, 1, 1, training, True, None)


def _timm_block(stride=2):
    ds = nn.Sequential(nn.Conv2d(64, 256, 1, stride, bias=False), nn.BatchNorm2d(256))
    orig = timm_res2net.Bottle2neck(64, 64, stride=stride, downsample=ds, norm_layer=nn.BatchNorm2d)
    orig = randomize_bn(orig).eval()
    new = resfast.Bottle2neck(64, 64, stride=stride, downsample=copy.deepcopy(ds), norm_layer=nn.BatchNorm2d)
    new.load_state_dict(orig.state_dict())
    return orig, new.eval()


def test_fold_cache_is_reused_and_refreshed():
    orig, new = _timm_block()
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(new(x), orig(x), rtol=1e-4, atol=1e-4)

    check()
    cache = new.__dict__["_resfast_fold_cache"]
    built = cache.builds
    assert built == 6  # conv1, three chain convs, downsample, conv3
    check()
    assert cache.builds == built, "an unchanged block must not fold again"
    # a buffer changed in place (as load_state_dict / a train step do): rebuilt, and the output follows
    for m in (orig, new):
        with torch.no_grad():
            m.bns[1].running_var.mul_(3.0)
    check()
    assert cache.builds == built + 1
    # load_state_dict of other weights
    other, _ = _timm_block()
    randomize_bn(other, generator_seed=3)
    orig.load_state_dict(other.state_dict())
    new.load_state_dict(other.state_dict())
    check()
    # an optimizer step on the conv weights
    for m in (orig, new):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for p in m.parameters():
            p.grad = torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel()))
        opt.step()
    check()
    # a training-mode forward empties the cache (running statistics change); eager's, so both models' float32
    # running statistics stay identical for the float64 comparison below
    orig.train()(x)
    with resfast.backend("eager"):
        new.train()(x)
    assert len(cache) == 0
    orig.eval(), new.eval()
    check()
    # another dtype: rebuilt in float64, exact
    orig.double(), new.double()
    with torch.no_grad():
        torch.testing.assert_close(new(x.double()), orig(x.double()), rtol=1e-10, atol=1e-10)
    # copies and pickles of a block with a filled cache start empty (oneDNN-packed tensors do not pickle)
    buf = io.BytesIO()
    torch.save(new, buf)
    assert len(copy.deepcopy(new).__dict__["_resfast_fold_cache"]) == 0


def test_clear_fold_caches_after_data_writes():
    orig, new = _timm_block(stride=1)
    x = torch.randn(1, 64, 6, 6)
    with torch.no_grad():
        new(x)
        for m in (orig, new):
            m.conv3.weight.data.mul_(0.5)  # .data bypasses the version counter: invisible to the cache
        ops.clear_fold_caches(new)
        torch.testing.assert_close(new(x), orig(x), rtol=1e-4, atol=1e-4)


def test_whole_torchvision_resnext_block_channels_last_fp32():
    orig = randomize_bn(tv_resnet.Bottleneck(64, 32, groups=4, base_width=16, downsample=nn.Sequential(
        nn.Conv2d(64, 128, 1, bias=False), nn.BatchNorm2d(128)))).eval()
    new = resfast.Bottleneck(64, 32, groups=4, base_width=16, downsample=copy.deepcopy(orig.downsample))
    new.load_state_dict(orig.state_dict())
    new.eval()
    x = torch.randn(2, 64, 11, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(orig).double()(x.double())
        out = new(x)
        assert_fused_close(out, orig(x), ref)
    assert out.is_contiguous(memory_format=torch.channels_last)


def _sample_inputs():
    f = torch.float32
    x = torch.randn(2, 8, 7, 6, dtype=f).contiguous(memory_format=torch.channels_last)
    yield "conv_bias_act", (x, torch.randn(6, 4, 3, 3), torch.randn(6), [2, 2], [1, 1], [1, 1], 2,
                            torch.randn(2, 6, 4, 3).contiguous(memory_format=torch.channels_last), True)
    yield "conv_bias_act", (x.double().contiguous(), torch.randn(5, 8, 1, 1, dtype=torch.float64), None, [1, 1],
                            [0, 0], [1, 1], 1, None, False)
    ws = [torch.randn(2, 2, 3, 3) for _ in range(3)]
    bs = [torch.randn(2) for _ in range(3)]
    yield "res2net_chain_folded", (x, ws, bs, 2, 1, 1, 1, "normal", [0, 1, 2], 3)
    yield "res2net_chain_folded", (x, ws, bs, 2, 2, 2, 1, "stage", [1, 2, 3], 0)


@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    name, args = list(_sample_inputs())[i]
    torch.library.opcheck(getattr(torch.ops.resfast, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["plain_weight", "prepacked"])
@pytest.mark.parametrize("x_cl,r_cl", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("hw,k,stride", [((1, 1), 1, 1), ((3, 3), 3, 1), ((2, 2), 1, 2), ((1, 3), 1, 1),
                                         ((5, 4), 3, 1), ((7, 7), 1, 2)])
def test_conv_bias_act_residual_every_layout(hw, k, stride, x_cl, r_cl, packed, dtype):
    """conv + bias + residual (+ ReLU) in float32/bfloat16, where oneDNN runs it: 1x1 outputs (channels_last and
    contiguous strides coincide; torch 2.11's oneDNN cannot take that residual as a post-op), NCHW inputs (where
    torch 2.11 falls back to add_relu, which has no bfloat16 kernel), either residual layout, plain and prepacked
    weights; within the accuracy rule of eager in the same dtype against float64."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available")
    conv = torch.ops.resfast.conv_bias_act
    x = _x((2, 8, *hw), dtype, x_cl)
    w = torch.randn(6, 8, k, k, dtype=dtype)
    b = torch.randn(6, dtype=dtype)
    out_hw = [(s - k) // stride + 1 for s in hw]
    r = _x((2, 6, *out_hw), dtype, r_cl)
    wk = w
    if packed:
        wk = torch.ops.mkldnn._reorder_convolution_weight(w, [0, 0], [stride, stride], [1, 1], 1, list(x.shape))
    for relu in (False, True):
        out = conv(x, wk, b, [stride, stride], [0, 0], [1, 1], 1, r, relu)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride) + r.double()
        eager = torch.nn.functional.conv2d(x, w, b, stride) + r
        if relu:
            ref, eager = ref.relu(), eager.relu()
        assert out.shape == ref.shape and out.dtype == dtype
        assert_fused_close(out, eager, ref)


def test_bad_inputs_are_clear_errors():
    x = torch.randn(2, 8, 5, 5)
    conv = torch.ops.resfast.conv_bias_act
    with pytest.raises(RuntimeError, match="resfast::conv_bias_act: groups=3 must divide"):
        conv(x, torch.randn(6, 2, 3, 3), None, [1, 1], [1, 1], [1, 1], 3, None, True)
    with pytest.raises(RuntimeError, match="weight expects 4 input channels"):
        conv(x, torch.randn(6, 4, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        conv(x, torch.randn(6, 8, 3, 3, dtype=torch.float64), None, [1, 1], [1, 1], [1, 1], 1, None, True)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        conv(x, torch.randn(6, 8, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, torch.randn(2, 6, 4, 4), True)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        conv(x[0], torch.randn(6, 8, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, None, True)
    chain = torch.ops.resfast.res2net_chain_folded
    ws, bs = [torch.randn(2, 2, 3, 3)] * 3, [torch.randn(2)] * 3
    with pytest.raises(RuntimeError, match="x has 8 channels, expected 4 splits of 3"):
        chain(x, ws, bs, 3, 1, 1, 1, "normal", [0, 1, 2], 3)
    with pytest.raises(RuntimeError, match="'normal' chain has stride 1"):
        chain(x, ws, bs, 2, 2, 1, 1, "normal", [0, 1, 2], 3)
    with pytest.raises(RuntimeError, match="one weight and one bias per conv split"):
        chain(x, ws[:2], bs, 2, 1, 1, 1, "normal", [0, 1, 2], 3)


def test_compile_fullgraph_block_through_cpu_backend():
    orig, new = _timm_block()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(new, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), resfast.backend("cpu"):
        torch.testing.assert_close(compiled(x), orig(x), rtol=1e-4, atol=1e-4)
