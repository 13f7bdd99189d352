"""torch.compile(fullgraph=True) of the blocks matches eager (running stats included); fx.symbolic_trace of a block
runs its modules, of an op raises a TraceError that says why."""


import pytest
import torch
from helpers import randomize_bn
from torch import nn

import resfast


def _blocks():
    def ds():
        return nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))

    return {
        "bottle2neck_stage": (lambda: resfast.Bottle2neck(32, 16, 2, ds(), norm_layer=nn.BatchNorm2d), 32),
        "bottle2neck_normal": (lambda: resfast.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d), 64),
        "resnext_bottleneck": (lambda: resfast.Bottleneck(64, 16, groups=8, base_width=8), 64),
        "res2net_seed001": (lambda: resfast.Res2NetBottleneck(64, 16), 64),
        "preact_bottleneck": (lambda: resfast.PreActBottleneck(64, 16), 64),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_blocks()))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_matches_eager(name, train):
    make, cin = _blocks()[name]
    torch.manual_seed(0)
    eager = randomize_bn(make()).train(train)
    compiled_mod = randomize_bn(make()).train(train)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, cin, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled_mod.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow
def test_compile_inductor_res2net_block_eval():
    """One real inductor compile (C++ codegen on the CPU) of a Res2Net stage block."""
    make, cin = _blocks()["bottle2neck_stage"]
    m = randomize_bn(make()).eval()
    x = torch.randn(2, cin, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fx_symbolic_trace_runs_the_modules_and_ops_say_why_they_cannot():
    """A block under torch.fx.symbolic_trace records its plain-module computation (resfast.nn._common.capturing): a
    GraphModule without resfast ops, with the block's numbers (whole models: tests/test_capture.py). An op called
    directly on a Proxy still raises TraceError saying why: the ops check shapes and choose a backend from real
    tensor metadata."""
    blk = resfast.Bottleneck(64, 16).eval()
    gm = torch.fx.symbolic_trace(blk)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "resfast" in str(n.target)]
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(gm(x), blk(x), rtol=1e-5, atol=1e-5)

    class OpCaller(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)

        def forward(self, x):
            return resfast.ops.conv_bn_relu(x, self.conv.weight, self.bn, padding=1)

    match = "cannot be traced by torch.fx.symbolic_trace.*torch.compile or torch.export"
    with pytest.raises(torch.fx.proxy.TraceError, match=match):
        torch.fx.symbolic_trace(OpCaller())


def test_torch_export_works():
    blk = resfast.Bottle2neck(64, 16, norm_layer=nn.BatchNorm2d).eval()
    x = torch.randn(2, 64, 8, 8)
    ep = torch.export.export(blk, (x,))
    torch.testing.assert_close(ep.module()(x), blk(x))


