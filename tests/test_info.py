"""python -m resfast.info tells the truth: versions, build, backends; and the model summary's numbers."""

import json
import subprocess
import sys

import pytest
import torch

import resfast
from resfast import _ext
from resfast.summary import summarize


def _run(*args):
    out = subprocess.run([sys.executable, "-m", "resfast.info", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_report_versions_build_and_backends():
    text = _run()
    assert f"resfast      {resfast.__version__}" in text
    assert f"torch        {torch.__version__}" in text
    for name in ("cuda", "triton", "cpu", "eager"):
        assert f"\n  {name:<7} " in text
    assert "eager   can run res2net_chain, conv_bn_relu, bn_relu_conv" in text
    if _ext.C is not None:
        build = json.loads(text.split("  build      ", 1)[1].splitlines()[0])
        assert build == _ext.build_info()
        assert build["torch_version"] == torch.__version__
        assert "resfast::bn_act: kernels for CPU" in text
        assert ("CUDA" in text.split("resfast::bn_act: kernels for", 1)[1].splitlines()[0]) == build["with_cuda"]
    else:
        assert "resfast._C   not loaded" in text
    if not torch.cuda.is_available():
        assert "no CUDA device is visible" in text


@pytest.mark.slow
def test_model_summary_cli():
    text = _run("--model", "res2net50_26w_4s", "resnet50", "--size", "224")
    assert "res2net50_26w_4s" in text and "resnet50" in text and "GMACs" in text


@pytest.mark.slow
def test_summary_numbers():
    timm = pytest.importorskip("timm")
    tvm = pytest.importorskip("torchvision.models")
    r2 = summarize(resfast.models.res2net50_26w_4s(), (3, 224, 224))
    r50 = summarize(resfast.models.resnet50(), (3, 224, 224))
    assert r2.params == sum(p.numel() for p in timm.create_model("res2net50_26w_4s").parameters())
    assert r50.params == sum(p.numel() for p in tvm.resnet50().parameters())
    assert abs(r2.params_mb - r2.params * 4 / 2**20) < 1e-9  # float32: 4 bytes a parameter (seed 000's formula)
    # published: ResNet-50 4.09 GMACs (4.1 GFLOPs in torchvision's table); Res2Net-50-26w-4s about 4.2-4.3
    assert 4.05 < r50.gmacs < 4.12
    assert 4.15 < r2.gmacs < 4.35
    # MACs scale with the input area
    big = summarize(resfast.models.resnet50(), (3, 448, 448))
    fc_gmacs = 2048 * 1000 / 1e9  # the classifier does not grow with the input
    assert abs((big.gmacs - fc_gmacs) - 4 * (r50.gmacs - fc_gmacs)) < 1e-6
