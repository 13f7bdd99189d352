"""The declared floors (pyproject.toml: requires-python, torch, the triton extra) are the versions the GPU machine's
environment installs (the Makefile's GPU_* variables, which `make setup-gpu-env` passes to scripts/setup.sh), so
the two cannot drift apart silently; in that environment (`make test-gpu-env` sets RESFAST_GPU_ENV=1) the installed
versions are exactly those."""

import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _make_vars() -> dict:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^(GPU_[A-Z_]+)\s*:?=\s*(\S+)\s*$", text, re.M))


def _project() -> dict:
    import tomllib  # here: ruff's import sorting targets Python 3.9, which has no tomllib in its standard library

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _release(version: str) -> tuple:
    """(2, 11) of "2.11.0+cu130" / "2.11": the release numbers, trailing zeros dropped."""
    nums = [int(p) for p in re.match(r"\d+(?:\.\d+)*", version).group(0).split(".")]
    while len(nums) > 1 and nums[-1] == 0:
        nums.pop()
    return tuple(nums)


def _floor(specs: list, name: str) -> str:
    found = [m.group(1) for s in specs if (m := re.fullmatch(rf"{name}\s*>=\s*([\d.]+)", s.strip()))]
    assert len(found) == 1, f"one '{name}>=X' floor expected in {specs}"
    return found[0]


def test_make_declares_the_gpu_env():
    v = _make_vars()
    for key in ("GPU_PYTHON_VERSION", "GPU_TORCH", "GPU_TORCHVISION", "GPU_TRITON"):
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", v.get(key, "")), f"Makefile: {key} = {v.get(key)!r}"


def test_floors_equal_the_gpu_env():
    v, project = _make_vars(), _project()
    assert _release(_floor(project["dependencies"], "torch")) == _release(v["GPU_TORCH"])
    assert _release(_floor(project["optional-dependencies"]["triton"], "triton")) == _release(v["GPU_TRITON"])
    # the GPU env's Python is tested, and so is the oldest one the floor admits (3.11: `make test`)
    py_floor = _release(re.fullmatch(r">=\s*([\d.]+)", project["requires-python"]).group(1))
    assert py_floor <= _release(v["GPU_PYTHON_VERSION"])
    assert py_floor <= sys.version_info[:2]


def test_installed_versions_meet_the_floors():
    project = _project()
    assert _release(torch.__version__) >= _release(_floor(project["dependencies"], "torch"))
    triton = pytest.importorskip("triton")
    assert _release(triton.__version__) >= _release(_floor(project["optional-dependencies"]["triton"], "triton"))


@pytest.mark.skipif(os.environ.get("RESFAST_GPU_ENV") != "1", reason="only in the GPU env (make test-gpu-env)")
def test_gpu_env_has_exactly_the_declared_versions():
    import torchvision
    import triton

    v = _make_vars()
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" == v["GPU_PYTHON_VERSION"]
    assert torch.__version__.split("+")[0] == v["GPU_TORCH"] and torch.version.cuda
    assert torchvision.__version__.split("+")[0] == v["GPU_TORCHVISION"]
    assert triton.__version__ == v["GPU_TRITON"]
