"""Backend choice: auto falls back silently, explicit backends explain themselves, env/context/set work."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import resfast
from resfast import ops
from resfast.ops import dispatch


def _call():
    bn = nn.BatchNorm2d(4)
    ops.conv_bn_relu(torch.randn(2, 4, 3, 3), torch.randn(4, 4, 1, 1), bn, training=True)
    return bn


def test_auto_runs_eager_here_when_nothing_else_can():
    assert resfast.get_backend() in dispatch.CHOICES
    with resfast.backend("auto"):
        _call()


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_explicit_backend_that_cannot_run_lists_reasons_and_touches_nothing(name):
    from resfast.ops._args import prepare_conv_bn_relu

    bn = nn.BatchNorm2d(4).half()
    x, w = torch.randn(2, 4, 3, 3).half(), torch.randn(4, 4, 1, 1).half()
    reasons = dispatch.get(name).not_supported_reasons(
        "conv_bn_relu", prepare_conv_bn_relu(x, w, bn, None, 1, 0, 1, 1, True, True, None))
    assert reasons  # a float16 CPU tensor: neither backend runs it (not even the Triton interpreter)
    with resfast.backend(name), pytest.raises(resfast.BackendUnavailableError) as e:
        ops.conv_bn_relu(x, w, bn, training=True)
    msg = str(e.value)
    assert f"'{name}' was requested but cannot run conv_bn_relu" in msg
    for reason in reasons:
        assert reason in msg
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(4).half())


def test_context_manager_restores_and_set_backend():
    resfast.set_backend("eager")
    with resfast.backend("triton"):
        assert resfast.get_backend() == "triton"
    assert resfast.get_backend() == "eager"
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
    b = dispatch.TritonBackend()
    env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        assert any("TRITON_INTERPRET=1" in r for r in b._input_reasons("conv_bn_relu", a))
    finally:
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env


@pytest.mark.parametrize("value,expected", [("eager", "eager"), ("TRITON", "triton"), ("bogus", "auto")])
def test_env_variable(value, expected):
    code = "import warnings; warnings.simplefilter('ignore'); import resfast; print(resfast.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RESFAST_BACKEND": value})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


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
