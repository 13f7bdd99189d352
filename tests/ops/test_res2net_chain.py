"""res2net_chain against independent module-based references written from timm's Bottle2neck and seed 001."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resfast import ops
from resfast.ops import BatchNormParams


def _layers(scale, order, width, groups, stride, dilation, bias, dtype):
    n = max(1, scale - 1) if order == "timm" else scale - 1
    cin = width
    convs = [nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=groups, bias=bias, dtype=dtype)
             for _ in range(n)]
    bns = [nn.BatchNorm2d(cin, dtype=dtype) for _ in range(n)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return convs, bns


def reference_chain(x, convs, bns, scale, order, block_type, stride):
    """Written from the originals, independent of resfast."""
    width = x.shape[1] // scale
    spx = torch.split(x, width, 1)
    if order == "timm":  # timm Bottle2neck.forward
        is_first = block_type == "stage"
        spo, sp = [], spx[0]
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            sp = spx[i] if i == 0 or is_first else sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            spo.append(sp)
        if scale > 1:
            spo.append(F.avg_pool2d(spx[-1], 3, stride, 1) if is_first else spx[-1])
        return torch.cat(spo, 1)
    # seed 001's loop (paper order); 'stage': independent splits, split 0 pooled
    ys = []
    for s in range(scale):
        if s == 0:
            ys.append(F.avg_pool2d(spx[0], 3, stride, 1) if block_type == "stage" else spx[0])
        elif s == 1 or block_type == "stage":
            ys.append(F.relu(bns[s - 1](convs[s - 1](spx[s]))))
        else:
            ys.append(F.relu(bns[s - 1](convs[s - 1](spx[s] + ys[-1]))))
    return torch.cat(ys, 1)


def _case(scale, order, block_type, stride, groups, dilation, channels_last, training, bias=False,
          dtype=torch.float64, shape=(2, 7, 5)):
    width = 2 * groups
    N, H, W = shape
    x = torch.randn(N, scale * width, H, W, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    convs, bns = _layers(scale, order, width, groups, stride, dilation, bias, dtype)
    bns_op = [nn.BatchNorm2d(b.num_features, dtype=dtype) for b in bns]
    for a, b in zip(bns_op, bns):
        a.load_state_dict(b.state_dict())
    for b in bns:
        b.train(training)
    ref = reference_chain(x, convs, bns, scale, order, block_type, stride)
    out = ops.res2net_chain(
        x, [c.weight for c in convs], bns_op, scale=scale, biases=[c.bias for c in convs], stride=stride,
        dilation=dilation, groups=groups, order=order, block_type=block_type, training=training,
    )
    return x, ref, out, bns, bns_op


CASES = [
    c for c in itertools.product([1, 2, 4, 5], ["timm", "paper"], ["normal", "stage"], [1, 2], [1, 2], [1, 2])
    if not (c[2] == "normal" and c[3] != 1)
]


@pytest.mark.parametrize("scale,order,block_type,stride,groups,dilation", CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_matches_reference(scale, order, block_type, stride, groups, dilation, training):
    x, ref, out, bns, bns_op = _case(scale, order, block_type, stride, groups, dilation, False, training)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(bns_op, bns):
        for k, v in b.state_dict().items():
            torch.testing.assert_close(a.state_dict()[k], v, rtol=0, atol=1e-14, msg=k)


@pytest.mark.parametrize("order,block_type,stride",
                         [("timm", "normal", 1), ("timm", "stage", 2), ("paper", "normal", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_in_channels_last_out(order, block_type, stride, dtype):
    x, ref, out, *_ = _case(4, order, block_type, stride, 1, 1, True, True, bias=True, dtype=dtype)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 2), (2, 9, 11), (3, 1, 6)], ids=str)
@pytest.mark.parametrize("block_type,stride", [("normal", 1), ("stage", 2), ("stage", 1)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_odd_shapes(shape, block_type, stride, training):
    n, h, w = shape
    if training and n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) == 1:
        pytest.skip("one value per channel: training is an error (tested in test_bad_inputs)")
    x, ref, out, *_ = _case(4, "timm", block_type, stride, 1, 1, False, training, shape=shape, dtype=torch.float32)
    torch.testing.assert_close(out, ref)


def test_zero_batch_eval():
    x, ref, out, *_ = _case(4, "timm", "stage", 2, 1, 1, False, False, shape=(0, 6, 6))
    assert out.shape == ref.shape == (0, 8, 3, 3)


@pytest.mark.parametrize("order,block_type,stride", [("timm", "normal", 1), ("timm", "stage", 2),
                                                    ("paper", "normal", 1), ("paper", "stage", 2)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck(order, block_type, stride, training):
    scale, width = 3, 2
    x = torch.randn(2, scale * width, 4, 3, dtype=torch.float64, requires_grad=True)
    n = scale - 1
    ws = [torch.randn(width, width, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    gs = [torch.rand(width, dtype=torch.float64).add(0.5).requires_grad_() for _ in range(n)]
    bs = [torch.randn(width, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    cb = [torch.randn(width, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    rms = [torch.randn(width, dtype=torch.float64) * 0.1 for _ in range(n)]
    rvs = [torch.rand(width, dtype=torch.float64) + 0.5 for _ in range(n)]

    def f(x, *params):
        w, g, b, c = params[:n], params[n:2 * n], params[2 * n:3 * n], params[3 * n:]
        bns = [BatchNormParams(g[i], b[i], rms[i].clone(), rvs[i].clone(), None, 0.1, 1e-5) for i in range(n)]
        return ops.res2net_chain(x, w, bns, scale=scale, biases=c, stride=stride, order=order,
                                 block_type=block_type, training=training)

    assert torch.autograd.gradcheck(f, (x, *ws, *gs, *bs, *cb))


def _weights(n, width, groups=1):
    return [torch.randn(width, width // groups, 3, 3) for _ in range(n)], [nn.BatchNorm2d(width) for _ in range(n)]


def test_bad_inputs():
    x = torch.randn(2, 8, 5, 5)
    w, b = _weights(3, 2)
    with pytest.raises(ValueError, match="does not divide the 8 input channels"):
        ops.res2net_chain(x, w, b, scale=3)
    with pytest.raises(ValueError, match="needs 3 convs"):
        ops.res2net_chain(x, w[:2], b[:2], scale=4)
    with pytest.raises(ValueError, match="4-D"):
        ops.res2net_chain(x[0], w, b, scale=4)
    with pytest.raises(ValueError, match="groups=3 does not divide"):
        ops.res2net_chain(x, w, b, scale=4, groups=3)
    with pytest.raises(ValueError, match="'normal' block .* stride 1"):
        ops.res2net_chain(x, w, b, scale=4, stride=2)
    with pytest.raises(TypeError, match="dtype torch.float64 but the input has dtype torch.float32"):
        ops.res2net_chain(x, [t.double() for t in w], b, scale=4)
    with pytest.raises(ValueError, match="is on meta but the input is on cpu"):
        ops.res2net_chain(x, [t.to("meta") for t in w], b, scale=4)
    with pytest.raises(ValueError, match="order must be one of"):
        ops.res2net_chain(x, w, b, scale=4, order="official")
    with pytest.raises(ValueError, match="bns\\[0\\].weight has shape"):
        ops.res2net_chain(x, w, [nn.BatchNorm2d(3)] + b[1:], scale=4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.res2net_chain(torch.randn(1, 8, 1, 1), w, b, scale=4, training=True)
    with pytest.raises(TypeError, match="BatchNormParams, nn.BatchNorm2d or FrozenBatchNorm2d"):
        ops.res2net_chain(x, w, [nn.GroupNorm(1, 2)] * 3, scale=4)
