"""Hypothesis over the grouped-conv shape space (ResNeXt 4..32 channels per group, depthwise, odd sizes):
conv_bn_relu and res2net_chain against nn modules."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from resfast import ops


@st.composite
def grouped_conv(draw):
    groups = draw(st.sampled_from([1, 2, 3, 4, 8]))
    cin_g = draw(st.sampled_from([1, 2, 4]))
    cout_g = draw(st.sampled_from([1, 2, 3]))
    k = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2])) if k == 3 else 1
    n = draw(st.integers(1, 3))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    return groups, cin_g * groups, cout_g * groups, k, stride, dilation, n, h, w


@settings(max_examples=60, deadline=None)
@given(grouped_conv(), st.booleans(), st.booleans())
def test_conv_bn_relu_grouped(cfg, training, channels_last):
    groups, cin, cout, k, stride, dilation, n, h, w = cfg
    pad = dilation * (k - 1) // 2
    conv = nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False, dtype=torch.float64)
    bn_a = nn.BatchNorm2d(cout, dtype=torch.float64)
    bn_b = nn.BatchNorm2d(cout, dtype=torch.float64)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = conv(x)
    if training and y.shape[0] * y.shape[2] * y.shape[3] == 1:
        training = False
    bn_a.train(training)
    ref = F.relu(bn_a(y))
    out = ops.conv_bn_relu(x, conv.weight, bn_b, stride=stride, padding=pad, dilation=dilation, groups=groups,
                           training=training)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn_b.running_var, bn_a.running_var, rtol=0, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(2, 6), st.sampled_from([1, 2]), st.integers(2, 8), st.integers(2, 8))
def test_res2next_chain_grouped(cardinality, scale, per_group, h, w):
    width = cardinality * per_group
    x = torch.randn(2, scale * width, h, w, dtype=torch.float64)
    convs = [nn.Conv2d(width, width, 3, 1, 1, groups=cardinality, bias=False, dtype=torch.float64)
             for _ in range(scale - 1)]
    bns = [nn.BatchNorm2d(width, dtype=torch.float64) for _ in range(scale - 1)]
    spx = torch.split(x, width, 1)
    outs, sp = [], None
    for i, (c, b) in enumerate(zip(convs, bns)):
        sp = spx[i] if i == 0 else sp + spx[i]
        sp = F.relu(b(c(sp)))
        outs.append(sp)
    ref = torch.cat(outs + [spx[-1]], 1)
    bns2 = [nn.BatchNorm2d(width, dtype=torch.float64) for _ in range(scale - 1)]
    out = ops.res2net_chain(x, [c.weight for c in convs], bns2, scale=scale, groups=cardinality, training=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
