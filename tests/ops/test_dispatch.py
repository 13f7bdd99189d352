"""Backend choice: auto falls back silently, explicit backends explain themselves, env/context/set work."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resfast
from resfast import _ext, ops
from resfast.ops import dispatch
from resfast.ops.reference import conv_bn_relu_ref

HAS_CPU_BACKEND = not dispatch.get("cpu").static_reasons("conv_bn_relu")  # resfast._C loaded with its CPU ops


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test leaves the process-wide backend choice as it found it."""
    before = resfast.get_backend()
    yield
    resfast.set_backend(before)


def _bn(C, dtype=torch.float32):
    bn = nn.BatchNorm2d(C, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def _select(x, bn, training, w=None):
    from resfast.ops._args import prepare_conv_bn_relu

    w = torch.randn(bn.num_features, x.shape[1], 1, 1, dtype=x.dtype) if w is None else w
    return dispatch.select("conv_bn_relu", prepare_conv_bn_relu(x, w, bn, None, 1, 0, 1, 1, training, True, None)).name


# (case, dtype, training, grad, autocast dtype) -> what auto picks for a CPU tensor (no Triton interpreter): the
# cpu backend for inference in float32/float64/bfloat16 when resfast._C is loaded, eager for everything else --
# training BatchNorm, gradients, autocast (the cpu backend can train but auto keeps eager: measured slower) and
# dtypes the cpu backend lacks
AUTO_CASES = [
    ("eval-fp32", torch.float32, False, False, None, "cpu"),
    ("eval-fp64", torch.float64, False, False, None, "cpu"),
    ("eval-bf16", torch.bfloat16, False, False, None, "cpu"),
    ("eval-fp16", torch.float16, False, False, None, "eager"),
    ("eval-fp32-grad", torch.float32, False, True, None, "eager"),
    ("train-fp32", torch.float32, True, False, None, "eager"),
    ("eval-fp32-autocast-bf16", torch.float32, False, False, torch.bfloat16, "eager"),
]


@pytest.mark.parametrize("dtype,training,grad,amp,expected", [c[1:] for c in AUTO_CASES],
                         ids=[c[0] for c in AUTO_CASES])
def test_auto_choice_for_cpu_inputs(monkeypatch, dtype, training, grad, amp, expected):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if expected == "cpu" and not HAS_CPU_BACKEND:
        expected = "eager"  # no resfast._C here: eager is all that is left
    bn = _bn(4, dtype)
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    with resfast.backend("auto"), torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
        with torch.set_grad_enabled(grad):
            assert _select(x, bn, training) == expected


@pytest.mark.skipif(not HAS_CPU_BACKEND, reason=f"resfast._C is not loaded ({_ext.C_ERROR})")
def test_auto_routes_cpu_inference_through_the_cpu_backend_and_training_through_eager(monkeypatch):
    """Not just the choice: the op runs on the chosen backend, and gives eager's result."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ran = []
    for name in ("cpu", "eager"):
        b = dispatch.get(name)
        monkeypatch.setattr(b, "run", lambda op, args, _b=b, _run=b.run: ran.append(_b.name) or _run(op, args))
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3) * 0.2
    bn = _bn(6).eval()
    with resfast.backend("auto"), torch.no_grad():
        out = ops.conv_bn_relu(x, w, bn, padding=1)
        ref = conv_bn_relu_ref(x, w, bn, padding=1)
    assert ran == ["cpu"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.abs().sum() > 0 and (out >= 0).all()

    ran.clear()
    bn_a, bn_b = _bn(6), _bn(6)
    bn_b.load_state_dict(bn_a.state_dict())
    with resfast.backend("auto"):
        out = ops.conv_bn_relu(x, w, bn_a, padding=1, training=True)
    ref = torch.relu(bn_b.train()(torch.nn.functional.conv2d(x, w, padding=1)))
    assert ran == ["eager"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_a.running_mean, bn_b.running_mean)
    torch.testing.assert_close(bn_a.running_var, bn_b.running_var)
    assert int(bn_a.num_batches_tracked) == 1


@pytest.mark.skipif(not HAS_CPU_BACKEND, reason=f"resfast._C is not loaded ({_ext.C_ERROR})")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("op", ["conv_bn_relu", "bn_relu_conv"])
def test_fused_cpu_backend_equals_the_eager_reference(op, training):
    """An explicit `cpu` runs where auto would not (training too) and matches the eager backend (the reference
    semantics): output, gradients, BatchNorm buffers."""
    torch.manual_seed(1)
    dtype, C = torch.float64, 6
    x = torch.randn(2, C, 7, 5, dtype=dtype)
    w = torch.randn(C, C // 2, 3, 3, dtype=dtype) * 0.3
    res = torch.randn(2, C, 7, 5, dtype=dtype)
    bns = [_bn(C, dtype).train(training) for _ in range(2)]
    bns[1].load_state_dict(bns[0].state_dict())
    fn = ops.conv_bn_relu if op == "conv_bn_relu" else ops.bn_relu_conv
    outs, grads = [], []
    for name, bn in zip(("cpu", "eager"), bns):
        xi, wi = x.clone().requires_grad_(training), w.clone().requires_grad_(training)
        args = (xi, wi, bn) if op == "conv_bn_relu" else (xi, bn, wi)
        with resfast.backend(name), torch.set_grad_enabled(training):
            y = fn(*args, padding=1, groups=2, training=training, residual=res)
        outs.append(y)
        if training:
            (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
            grads.append((xi.grad, wi.grad, bn.weight.grad, bn.bias.grad))
    assert outs[0].dtype == outs[1].dtype == dtype and outs[0].shape == outs[1].shape == (2, C, 7, 5)
    assert outs[1].abs().sum() > 0
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    if training:
        for g0, g1 in zip(*grads):
            assert g1 is not None and g1.abs().sum() > 0
            torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-10)
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bns[0], buf), getattr(bns[1], buf), rtol=1e-12, atol=1e-12)
    assert int(bns[0].num_batches_tracked) == int(training)


@pytest.mark.parametrize("name", ["triton", "cuda", "cpu"])
def test_explicit_backend_that_cannot_run_lists_reasons_and_touches_nothing(name):
    from resfast.ops._args import prepare_conv_bn_relu

    bn = nn.BatchNorm2d(4).half()
    x, w = torch.randn(2, 4, 3, 3).half(), torch.randn(4, 4, 1, 1).half()
    reasons = dispatch.get(name).not_supported_reasons(
        "conv_bn_relu", prepare_conv_bn_relu(x, w, bn, None, 1, 0, 1, 1, True, True, None))
    # a float16 CPU tensor in training: no backend but eager runs it (not the Triton interpreter, not the cpu
    # backend's training ops)
    assert reasons
    with resfast.backend(name), pytest.raises(resfast.BackendUnavailableError) as e:
        ops.conv_bn_relu(x, w, bn, training=True)
    msg = str(e.value)
    assert f"'{name}' was requested but cannot run conv_bn_relu" in msg
    for reason in reasons:
        assert reason in msg
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(4).half())


def test_context_manager_restores_and_set_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, bn = torch.randn(2, 4, 3, 3), torch.randn(4, 4, 1, 1), _bn(4).eval()
    resfast.set_backend("eager")
    with resfast.backend("triton"):
        assert resfast.get_backend() == "triton"
        with resfast.backend("auto"):  # nested: restores the enclosing choice, not the outermost
            assert resfast.get_backend() == "auto"
        assert resfast.get_backend() == "triton"
        with torch.no_grad(), pytest.raises(resfast.BackendUnavailableError):
            ops.conv_bn_relu(x, w, bn)  # the choice is in force: triton cannot run a CPU tensor here
    assert resfast.get_backend() == "eager"
    with torch.no_grad():
        assert _select(x, bn, False, w) == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with resfast.backend("cuda"):
            raise RuntimeError("boom")
    assert resfast.get_backend() == "eager"  # restored when the block raises too
    with pytest.raises(ValueError, match="unknown resfast backend 'cudnn'"):
        resfast.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown resfast backend"):
        with resfast.backend("fast"):
            pass
    assert resfast.get_backend() == "eager"


def test_triton_reason_mentions_the_interpreter_for_cpu_inputs():
    from resfast.ops._args import prepare_conv_bn_relu

    a = prepare_conv_bn_relu(torch.randn(2, 4, 3, 3), torch.randn(4, 4, 1, 1), nn.BatchNorm2d(4), None, 1, 0, 1, 1,
                             False, True, None)
    from resfast.backends import TritonBackend

    b = TritonBackend()
    env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        assert any("TRITON_INTERPRET=1" in r for r in b._input_reasons("conv_bn_relu", a))
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env


@pytest.mark.slow
@pytest.mark.parametrize("value,expected", [("eager", "eager"), ("TRITON", "triton"), ("bogus", "auto")])
def test_env_variable(value, expected):
    code = "import warnings; warnings.simplefilter('ignore'); import resfast; print(resfast.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RESFAST_BACKEND": value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@pytest.mark.slow
def test_bad_env_value_warns():
    out = subprocess.run([sys.executable, "-c", "import resfast"], capture_output=True, text=True,
                         env={**os.environ, "RESFAST_BACKEND": "bogus"})
    assert "RESFAST_BACKEND='bogus' is not one of" in out.stderr


def test_availability_lists_every_backend_and_op():
    av = ops.availability()
    assert set(av) == {"cuda", "triton", "cpu", "eager"}
    assert all(set(per) == set(dispatch.OPS) for per in av.values())
    assert all(not r for r in av["eager"].values())


def test_explicit_backend_lists_input_reasons_too():
    with resfast.backend("triton"), pytest.raises(resfast.BackendUnavailableError) as e:
        ops.conv_bn_relu(torch.randn(2, 4, 3, 3).half(), torch.randn(4, 4, 1, 1).half(), nn.BatchNorm2d(4).half())
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert "TRITON_INTERPRET=1" in str(e.value)
    else:
        assert "dtype torch.float16 is not supported under the Triton interpreter" in str(e.value)
