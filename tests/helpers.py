"""Helpers shared by the tests (import as `from helpers import ...`)."""

import os

import pytest
import torch
from torch import nn


def randomize_bn(model: nn.Module, generator_seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics, so eval mode tests something."""
    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def bn_state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def assert_same_state(a: nn.Module, b: nn.Module, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


def compare_modules(orig: nn.Module, new: nn.Module, x: torch.Tensor, train: bool, steps: int = 2, **tol):
    """Outputs, input and parameter gradients, and the whole state (running stats included) after `steps`
    forward/backward passes, original vs resfast, from identical weights."""
    orig.train(train)
    new.train(train)
    for step in range(steps):
        xa = x.detach().clone().requires_grad_(True)
        xb = x.detach().clone().requires_grad_(True)
        ya, yb = orig(xa), new(xb)
        torch.testing.assert_close(yb, ya, msg=lambda m, step=step: f"output, step {step}: {m}", **tol)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, msg=lambda m, step=step: f"input grad, step {step}: {m}", **tol)
        pa, pb = dict(orig.named_parameters()), dict(new.named_parameters())
        assert list(pa) == list(pb)
        for k in pa:
            if pa[k].grad is None:
                assert pb[k].grad is None, k
                continue
            torch.testing.assert_close(pb[k].grad, pa[k].grad, msg=lambda m, k=k: f"grad {k}: {m}", **tol)
        orig.zero_grad()
        new.zero_grad()
        assert_same_state(orig, new, **tol)
    return ya, yb


# Triton tests: the interpreter runs CPU tensors (CI); on a GPU machine the same tests run compiled kernels on
# CUDA tensors. tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is visible.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if TRITON_INTERPRET else "cuda"
needs_triton_runtime = pytest.mark.skipif(
    not TRITON_INTERPRET and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU) or a GPU")


def assert_fused_close(fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6,
                       factor: float = 2.0):
    """The project's accuracy rule for fused paths that round differently from eager (folded BatchNorm, other
    conv algorithms): err(fused) <= factor * err(eager, same dtype) + floor * max|ref|, both errors measured
    against a higher-precision reference `ref` (float64)."""
    ref = ref.double()
    err_fused = (fused.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    bound = factor * err_eager + floor * max(1.0, ref.abs().max().item())
    assert err_fused <= bound, f"fused error {err_fused:.3g} > {factor} x eager error {err_eager:.3g} + floor"


def check_fused_model(orig: nn.Module, new: nn.Module, x: torch.Tensor):
    """`new` (resfast, default backend) against `orig` (eager) under the accuracy rule, with a float64 copy of
    `orig` as the reference; and, on the eager backend, `new` must equal `orig` to fp32 precision."""
    import copy

    import resfast

    ref_model = copy.deepcopy(orig).double()
    with torch.no_grad():
        ref = ref_model(x.double())
        eager = orig(x)
        fused = new(x)
        assert_fused_close(fused, eager, ref)
        with resfast.backend("eager"):
            torch.testing.assert_close(new(x), eager, rtol=1e-5, atol=1e-5)
    return fused


def conv_inputs(conv, shape, dtype, channels_last, bias, device):
    """x, weight, bias for a conv case ``conv = (C_in, C_out, k, stride, padding, dilation, groups)``, ``shape =
    (N, H, W)``: the inputs of the Triton conv tests."""
    cin, cout, k, _, _, _, g = conv
    N, H, W = shape
    x = torch.randn(N, cin, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // g, k, k, dtype=dtype, device=device) * 0.3
    b = torch.randn(cout, dtype=dtype, device=device) if bias else None
    return x, w, b


def block_through(backend: str, block: nn.Module, x: torch.Tensor):
    """(the original block's output, its resfast.convert copy's output on `backend`), eval, no grad."""
    import resfast

    fused = resfast.convert(block)
    with torch.no_grad():
        ref = block(x)
        with resfast.backend(backend):
            out = fused(x)
    return out, ref


def randomize_bn_signed(block: nn.Module, seed: int = 0) -> nn.Module:
    """Negative and positive gammas, shifted betas, non-trivial running statistics (every nn.BatchNorm2d,
    timm's BatchNormAct2d included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 3 - 1.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return block


def train_steps_like_module_path(new: nn.Module, ran: list, dtype, cl: bool = True, steps: int = 3,
                                 size: tuple[int, int] = (7, 6)) -> None:
    """SGD steps (momentum) of converted block `new` on the Triton backend against a copy's ``_forward_modules``:
    output, input and parameter gradients, running statistics and num_batches_tracked, at 1e-9 in float64 (1e-4
    otherwise). ``ran``: a list the caller's hook appends True to each time the whole-block op ran (asserted for
    every step; None: not checked, for blocks on the per-op path). The last step's grad_output is expanded (the
    backward of .sum())."""
    import copy

    import resfast

    orig = copy.deepcopy(new)
    opt_a = torch.optim.SGD(orig.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for step in range(steps):
        x = torch.randn(2, new.conv1.in_channels, *size, dtype=dtype, device=TRITON_DEVICE)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = orig._forward_modules(xa)
        with resfast.backend("triton"):
            yb = new(xb)
        assert ran is None or ran[-1] is True
        torch.testing.assert_close(yb, ya, **tol)
        if step < steps - 1:
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
        else:
            ya.sum().backward()
            yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, **tol)
        for (k, pa), (_, pb) in zip(orig.named_parameters(), new.named_parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, **tol, msg=lambda m, k=k, s=step: f"step {s}, {k}: {m}")
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
        for (k, ba), (_, bb) in zip(orig.state_dict().items(), new.state_dict().items()):
            torch.testing.assert_close(bb, ba, **tol, msg=lambda m, k=k, s=step: f"step {s}, {k}: {m}")


def assert_block_float32_rule(new: nn.Module, x: torch.Tensor, floor: float = 1e-5) -> None:
    """Converted block `new` (float32) on the Triton backend against float32 and float64 copies' module path
    (``_forward_modules``): the output and every gradient (input, parameters) under the project's rule,
    err(fused) <= 2 err(eager float32) + floor, both against float64."""
    import copy

    import resfast

    ref32, ref64 = copy.deepcopy(new), copy.deepcopy(new).double()
    outs = []
    for m, xx, fused in ((new, x, True), (ref32, x, False), (ref64, x.double(), False)):
        xx = xx.clone().requires_grad_()
        with resfast.backend("triton"):
            y = m(xx) if fused else m._forward_modules(xx)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
        y.backward(g)
        outs.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    for fused, eager, ref in zip(*outs):
        assert_fused_close(fused, eager, ref, floor=floor)


def op_tensor_factory(dtype, device, requires_grad: bool = False, seed: int = 0):
    """(uniform, gamma) makers for an op test's inputs from one generator: ``uniform(*shape, lo=-1, hi=1)``, and
    ``gamma(n)``, BatchNorm weights away from zero with both signs (about 30% negative)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, lo=-1.0, hi=1.0):
        t = (torch.rand(*shape, generator=g, dtype=dtype) * (hi - lo) + lo).to(device)
        return t.requires_grad_(requires_grad)

    def gamma(n):
        t = torch.rand(n, generator=g, dtype=dtype) + 0.5
        t = t * torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).to(dtype)
        return t.to(device).requires_grad_(requires_grad)

    return uniform, gamma


def record_whole_block(monkeypatch, module: str, name: str) -> list:
    """Wrap the whole-block entry point ``name`` (resfast/ops/bottleneck.py's, as imported by resfast.nn.<module>):
    the returned list gets True each time a block ran the whole op, False when it fell back to the per-op path."""
    import importlib

    mod = importlib.import_module(f"resfast.nn.{module}")
    ran, real = [], getattr(mod, name)

    def counting(*a, **k):
        y = real(*a, **k)
        ran.append(y is not None)
        return y

    monkeypatch.setattr(mod, name, counting)
    return ran
