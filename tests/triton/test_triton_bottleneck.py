"""The whole-bottleneck training op (resfast_triton::res2net_bottleneck_train, resfast/ops/bottleneck.py): each
BatchNorm + ReLU applied in the next conv's prologue, the normalised activations never written.

Against eager timm Bottle2neck modules over several SGD steps (outputs, every gradient, running statistics), bit for
bit against the per-op path's intermediates (so what backward rebuilds is what the prologues computed), float64
gradcheck, opcheck, what the forward writes, and when the blocks fall back to the per-op path."""

import copy

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
from resfast.ops import bottleneck

pytest.importorskip("triton")
timm_res2net = pytest.importorskip("timm.models.res2net")
pytestmark = needs_triton_runtime
DEVICE = TRITON_DEVICE
F64 = torch.float64
DTYPES = [torch.float32, F64] if TRITON_INTERPRET else [torch.float32]


def _block(stage: bool, scale: int = 4, cardinality: int = 1, dilation: int = 1, stride: int = 2, planes: int = 4,
           **bn_kw):
    """A timm Bottle2neck converted to resfast's; `stage`: the first block of a stage (strided, downsample). Width
    per split floor(planes * 26 / 64) * cardinality."""
    norm = (lambda c, **kw: nn.BatchNorm2d(c, **bn_kw, **kw)) if bn_kw else nn.BatchNorm2d
    out = planes * 4
    if stage:
        down = nn.Sequential(nn.Conv2d(8, out, 1, stride=stride, bias=False), norm(out))
        block = timm_res2net.Bottle2neck(8, planes, stride=stride, downsample=down, base_width=26, scale=scale,
                                         cardinality=cardinality, dilation=dilation, norm_layer=norm)
    else:
        block = timm_res2net.Bottle2neck(out, planes, base_width=26, scale=scale, cardinality=cardinality,
                                         dilation=dilation, norm_layer=norm)
    return resfast.convert(randomize_bn_signed(block)).to(DEVICE)


def _count_whole(monkeypatch, module="res2net"):
    """True each time a block of resfast.nn.<module> ran the whole-bottleneck op, False when it fell back."""
    return record_whole_block(monkeypatch, module, "res2net_bottleneck_train")


BLOCKS = [
    dict(stage=False),
    dict(stage=True),
    dict(stage=True, stride=1),                      # a stage block without stride: pooled pass-through, stride 1
    dict(stage=False, scale=3, cardinality=2),       # Res2NeXt
    dict(stage=False, scale=1),                      # one conv over the whole width, no pass-through
    dict(stage=True, scale=5, dilation=2),
    dict(stage=False, momentum=None),                # cumulative moving average
    dict(stage=True, track_running_stats=False),
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", BLOCKS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_block_trains_like_eager(cfg, monkeypatch):
    """A converted timm Bottle2neck through the whole op, three SGD steps against its module path, in float64 (the
    interpreter; float32 on a GPU)."""
    dtype = DTYPES[-1]
    ran = _count_whole(monkeypatch)
    train_steps_like_module_path(_block(**cfg).to(dtype).train(), ran, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [False, True], ids=["normal", "stage"])
def test_block_float32_accuracy(stage, monkeypatch):
    """float32: output and every gradient within the project's rule, err(fused) <= 2 err(eager float32) + floor,
    both against the float64 module path."""
    ran = _count_whole(monkeypatch)
    new = _block(stage=stage, planes=8).train()  # 3 channels per split
    x = torch.randn(4, new.conv1.in_channels, 9, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert_block_float32_rule(new, x)
    assert ran == [True]


def test_zero_init_last(monkeypatch):
    """timm's zero_init_last (bn3's gamma = 0): the block is relu(x + beta3) exactly, gradients as eager's, bn3's
    gamma still gets its gradient."""
    ran = _count_whole(monkeypatch)
    new = _block(stage=False).double().train()
    new.zero_init_last()
    orig = copy.deepcopy(new)
    x = torch.randn(2, 16, 5, 6, dtype=F64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with resfast.backend("triton"):
        yb = new(xb)
    ya = orig._forward_modules(xa)
    assert ran == [True]
    torch.testing.assert_close(yb, torch.relu(x + new.bn3.bias.detach().reshape(1, -1, 1, 1)), rtol=0, atol=0)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-9)
    for (k, pa), (_, pb) in zip(orig.named_parameters(), new.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    assert new.bn3.weight.grad.abs().sum() > 0


def _op_inputs(dtype, scale=4, S=None, wd=3, cin=8, cout=10, groups=1, requires_grad=False, seed=0):
    r, gamma = op_tensor_factory(dtype, DEVICE, requires_grad, seed)
    S = scale - 1 if S is None else S
    C = scale * wd if scale > 1 else wd

    x = r(2, cin, 5, 4).contiguous(memory_format=torch.channels_last).detach().requires_grad_(requires_grad)
    return dict(x=x, w1=r(C, cin, 1, 1), gamma1=gamma(C), beta1=r(C, lo=-0.5, hi=0.5),
                weights=[r(wd, wd // groups, 3, 3) for _ in range(S)], gammas=[gamma(wd) for _ in range(S)],
                betas=[r(wd, lo=-0.5, hi=0.5) for _ in range(S)], w3=r(cout, C, 1, 1), gamma3=gamma(cout),
                beta3=r(cout, lo=-0.5, hi=0.5))


def _call(inp, residual, scale, stride, dilation, groups, order, block_type):
    from resfast.backends.triton import blocks  # noqa: F401  (registers the ops)

    S = len(inp["weights"])
    return torch.ops.resfast_triton.res2net_bottleneck_train(
        inp["x"], inp["w1"], inp["gamma1"], inp["beta1"], inp["weights"], inp["gammas"], inp["betas"], inp["w3"],
        inp["gamma3"], inp["beta3"], residual, scale, stride, dilation, groups, order, block_type, [1e-5] * (S + 2))


OP_CASES = [  # scale, order, block_type, stride, groups
    (4, "timm", "normal", 1, 1),
    (4, "timm", "stage", 2, 1),
    (3, "paper", "normal", 1, 1),
    (3, "paper", "stage", 1, 3),
    (1, "timm", "stage", 2, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale,order,block_type,stride,groups", OP_CASES)
def test_bit_for_bit_the_per_op_path(scale, order, block_type, stride, groups, dtype):
    """z1, the chain's raw outputs, z3, the statistics and y equal the per-op Triton ops' (conv_bn_train,
    res2net_chain_train, conv_bn_train with the residual) exactly: each prologue computes, and rounds, what the
    apply pass of the per-op path writes, so the activations backward rebuilds with that apply pass are the ones
    the forward's convolutions read."""
    from resfast.backends.triton import blocks  # noqa: F401

    ns = torch.ops.resfast_triton
    S = scale - 1 if (order == "paper" or scale > 1) else 1
    inp = _op_inputs(dtype, scale=scale, S=S, wd=3 * groups, groups=groups)
    C = inp["w1"].shape[0]
    H2, W2 = (5 - 1) // stride + 1, (4 - 1) // stride + 1
    res = torch.randn(2, 10, H2, W2, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y, z1, Zc, z3, stats = _call(inp, res, scale, stride, 1, groups, order, block_type)
    one, zero = [1, 1], [0, 0]
    a1, z1_ref, m1, i1, v1 = ns.conv_bn_train(inp["x"], inp["w1"], None, inp["gamma1"], inp["beta1"], None, None,
                                              None, one, zero, one, 1, True, 1e-5)
    out, Z, mc, ic, vc = ns.res2net_chain_train(a1, inp["weights"], [], inp["gammas"], inp["betas"], None, None,
                                                scale, stride, 1, groups, order, block_type, [1e-5] * S)
    y_ref, z3_ref, m3, i3, v3 = ns.conv_bn_train(out, inp["w3"], None, inp["gamma3"], inp["beta3"], res, None, None,
                                                 one, zero, one, 1, True, 1e-5)
    wd = Z.shape[1] // S
    first = (1 if order == "paper" else 0) * wd if scale > 1 else 0
    assert torch.equal(z1, z1_ref)
    assert torch.equal(Zc.narrow(1, first, S * wd), Z)
    assert torch.equal(z3, z3_ref)
    assert torch.equal(y, y_ref)
    for row, ref in ((0, (m1, mc.flatten(), m3)), (1, (i1, ic.flatten(), i3)), (2, (v1, vc.flatten(), v3))):
        assert torch.equal(stats[row], torch.cat(ref)), row
    if scale > 1:  # the pass-through slot holds the chain output's pass-through split
        p = 0 if order == "paper" else (scale - 1) * wd
        assert torch.equal(Zc.narrow(1, p, wd), out.narrow(1, p, wd))
    assert C == Zc.shape[1]


@pytest.mark.slow
@pytest.mark.skipif(not TRITON_INTERPRET, reason="float64 gradcheck runs under the interpreter")
@pytest.mark.parametrize("scale,order,block_type,stride,groups", OP_CASES[:3] + OP_CASES[4:])
def test_gradcheck(scale, order, block_type, stride, groups):
    """float64 gradcheck of the op's every differentiable input (x, the weights, gammas, betas, the residual)."""
    S = scale - 1 if (order == "paper" or scale > 1) else 1
    inp = _op_inputs(F64, scale=scale, S=S, wd=2 * groups, cin=3, cout=4, groups=groups, requires_grad=True)
    H2, W2 = (5 - 1) // stride + 1, (4 - 1) // stride + 1
    res = torch.randn(2, 4, H2, W2, dtype=F64, device=DEVICE, requires_grad=True)
    names = list(inp)

    def f(*flat):
        d, k = {}, 0
        for name in names:
            if isinstance(inp[name], list):
                d[name] = list(flat[k:k + S])
                k += S
            else:
                d[name] = flat[k]
                k += 1
        return _call(d, flat[k], scale, stride, 1, groups, order, block_type)[0]

    flat = [t for name in names for t in (inp[name] if isinstance(inp[name], list) else [inp[name]])] + [res]
    assert torch.autograd.gradcheck(f, flat, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.slow
def test_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration."""
    inp = _op_inputs(F64 if TRITON_INTERPRET else torch.float32, requires_grad=True)
    S = len(inp["weights"])
    args = (inp["x"], inp["w1"], inp["gamma1"], inp["beta1"], inp["weights"], inp["gammas"], inp["betas"], inp["w3"],
            inp["gamma3"], inp["beta3"], None, 4, 1, 1, 1, "timm", "normal", [1e-5] * (S + 2))
    from resfast.backends.triton import blocks

    torch.library.opcheck(blocks.OPS["res2net_bottleneck_train"], args)


@pytest.mark.slow
def test_forward_writes_no_normalised_activation(monkeypatch):
    """In the forward, conv1 and every chain conv write raw outputs only: one apply pass (bn3 + residual + ReLU into
    y), 2 + convs conv launches, each BatchNorm's statistics once."""
    from resfast.backends.triton.kernels import batchnorm, conv

    block = _block(stage=False).train()
    x = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    applies, launches = [], []
    real_apply, real_launch = batchnorm.apply, conv._launch
    monkeypatch.setattr(batchnorm, "apply", lambda *a, **k: applies.append(1) or real_apply(*a, **k))
    monkeypatch.setattr(conv, "_launch", lambda *a, **k: launches.append(k) or real_launch(*a, **k))
    ran = _count_whole(monkeypatch)
    with resfast.backend("triton"):
        y = block(x)
    assert ran == [True]
    assert len(applies) == 1
    assert len(launches) == 2 + len(block.convs)
    # conv1 plain; the chain convs normalise their input (and, after the first, add the previous split's)
    assert [(k["PRE_BN_RELU"], k["ADD_BN_RELU"], k["STATS"]) for k in launches] == (
        [(0, False, True), (2, False, True)] + [(2, True, True)] * (len(block.convs) - 1) + [(2, False, True)])
    assert launches[1]["HAS_PT"] and launches[1]["PT_BN_RELU"]
    y.sum().backward()  # backward rebuilds relu(bn1(z1)) and the chain's output: more apply passes
    assert len(applies) > 1


@pytest.mark.slow
def test_falls_back_to_the_per_op_path(monkeypatch):
    """The whole op only where it reproduces the block: otherwise the block's per-op path runs (and matches eager)."""
    ran = _count_whole(monkeypatch)
    x = torch.randn(2, 16, 5, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)

    def run(block, backend="triton", **ctx):
        ran.clear()
        with resfast.backend(backend):
            return block(x), list(ran)

    block = _block(stage=False).train()
    assert run(block)[1] == [True]
    assert run(copy.deepcopy(block).eval())[1] == [False]            # running statistics
    assert run(block, "eager")[1] == [False]                           # another backend
    biased = copy.deepcopy(block)
    biased.convs[0].bias = nn.Parameter(torch.zeros(biased.width, device=DEVICE))
    assert run(biased)[1] == [False]                                   # a conv bias
    no_affine = copy.deepcopy(block)
    no_affine.bn3.weight = None
    no_affine.bn3.bias = None
    y, r = run(no_affine)
    assert r == [False]
    torch.testing.assert_close(y, no_affine._forward_modules(x), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(bottleneck.WHOLE_BLOCK, "enabled", False)
    assert run(block)[1] == [False]                                    # switched off


@pytest.mark.parametrize("cfg", [dict(stride=1, groups=1, down=False), dict(stride=2, groups=4, down=True),
                                 dict(stride=1, groups=2, down=True, dilation=2)],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.slow
def test_resnet_bottleneck_trains_like_eager(cfg, monkeypatch):
    """torchvision's Bottleneck (ResNet, ResNeXt) runs as the same op with scale 1 (one grouped, strided 3x3 conv
    over the whole width): three SGD steps against its module path, float64 (float32 on a GPU)."""
    tv = pytest.importorskip("torchvision.models.resnet")
    dtype = DTYPES[-1]
    ran = _count_whole(monkeypatch, "resnet")
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=cfg["stride"], bias=False), nn.BatchNorm2d(16))
    block = tv.Bottleneck(8 if cfg["down"] else 16, 4, stride=cfg["stride"], groups=cfg["groups"], base_width=32,
                          dilation=cfg.get("dilation", 1), downsample=down if cfg["down"] else None)
    # NCHW input: the op reads any strides and writes channels_last, as the per-op path
    new = resfast.convert(randomize_bn_signed(block)).to(DEVICE, dtype).train()
    train_steps_like_module_path(new, ran, dtype, cl=False)
