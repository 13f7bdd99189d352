"""resfast.backends.triton.aot: the occupancy and ptxas-log arithmetic on known numbers, and a reduced ahead-of-time
run (a block recorded under the interpreter, every launch compiled for sm_90 and sm_80 without a GPU) that fails on a
compile error or a shared-memory overflow, with a planted over-large config that must be reported as one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resfast.backends.triton import aot

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("regs, shared, warps, arch, blocks, limiter", [
    (128, 49152, 4, 90, 4, "registers"),   # 128 regs x 32 = 4096 per warp -> 16 warps; smem 233472 // 50176 = 4
    (255, 0, 4, 90, 2, "registers"),       # 255 -> 256 per thread, 8192 per warp -> 8 warps -> 2 blocks of 4
    (90, 0, 4, 90, 5, "registers"),        # 90 -> 96 per thread, 3072 per warp -> 21 warps -> 5 blocks
    (32, 0, 1, 90, 32, "blocks"),          # 64 warps by registers and by the warp limit: 32 blocks cap it
    (32, 0, 8, 80, 8, "registers"),        # 32 x 32 = 1024 per warp: 64 warps = 8 blocks (warps limit too)
    (64, 100 * 1024, 4, 80, 1, "shared"),  # sm_80: 167936 // (102400 + 1024) = 1
    (64, 100 * 1024, 4, 90, 2, "shared"),  # sm_90: 233472 // 103424 = 2
    (16, 227 * 1024 + 1, 4, 90, 0, "shared"),  # over the per-SM capacity: nothing resident
])
def test_occupancy_arithmetic(regs, shared, warps, arch, blocks, limiter):
    occ = aot.occupancy(regs, shared, warps, arch)
    assert occ["blocks"] == blocks
    assert occ["warps"] == blocks * warps
    assert occ["limiter"] == limiter


def test_parse_ptxas():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_conv_bn_act_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _conv_bn_act_fwd_kernel
    712 bytes stack frame, 700 bytes spill stores, 508 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 712 bytes cumulative stack size, 1024 bytes smem
"""
    assert aot.parse_ptxas(log) == {"registers": 255, "spill_stores": 700, "spill_loads": 508, "stack": 712}
    with pytest.raises(ValueError):
        aot.parse_ptxas("ptxas fatal: something")


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "resfast.backends.triton.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _planted(launches: list[dict]) -> dict:
    """A bf16 3x3 conv launch of the recording (a K loop of 9 x C_in, so the tiles are multi-buffered) with one config
    far over any shared-memory limit: 4 stages of a 256 x 128 bf16 input tile and a 128 x 64 weight tile, 320 KiB
    on sm_90 (Triton keeps one stage fewer on sm_80: 240 KiB, still over 163 KiB)."""
    conv = max((e for e in launches if e["kernel"] == "resfast.backends.triton.kernels.conv:_tuned_kernel"
                and e["meta"].get("HAS_CONV") and not e["meta"].get("DIRECT") and e["meta"].get("KH") == 3
                and any(isinstance(a, dict) and a.get("tensor") == "bfloat16" for a in e["args"])),
               key=lambda e: e["meta"]["CIN_G"] * e["meta"]["G_TILE"])
    planted = copy.deepcopy(conv)
    planted["configs"] = [{"BLOCK_M": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}]
    planted["contexts"] = ["planted"]
    return planted


@pytest.mark.slow
def test_reduced_aot_run(tmp_path):
    """Three blocks, eval and a training step with the Triton conv gradients under bf16 autocast, 16x16: torchvision's
    ResNet-50 first bottleneck (projection shortcut), timm's SE-ResNeXt-26d first bottleneck (grouped 3x3, SE through
    scale_add_relu, avg-pool shortcut) and a resnetv2 pre-activation block. Recorded (every Triton kernel resfast
    has launches), then compiled for sm_90 and sm_80 with every config autotuning can pick, plus one planted
    over-large config. The full run (``python -m resfast.backends.triton.aot``) covers the six models, every mode and
    precision, at 224x224 batch 256."""
    launches = tmp_path / "launches.json"
    r = _run("--models", "resnet50/layer1.0", "seresnext26d_32x4d/layer1.0", "resnetv2_50/stages.1.blocks.0",
             "--modes", "eval", "train-triton-bwd", "--precisions", "amp-bf16", "--sizes", "16:1", "--record-only",
             "--save-launches", str(launches), "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    recorded = json.loads(launches.read_text())
    kernels = {e["kernel"] for e in recorded["launches"]}
    # every kernel resfast launches (an autotuned kernel by its Autotuner: conv's and scale_add_relu's _tuned_kernel)
    assert kernels == {f"resfast.backends.triton.kernels.{k}" for k in (
        "conv:_tuned_kernel", "conv_grad:_dgrad", "conv_grad:_wgrad", "batchnorm:_stats_partial_kernel",
        "batchnorm:_finalize_kernel", "batchnorm:_running_update_kernel", "batchnorm:_apply_kernel",
        "batchnorm:_bwd_reduce_kernel", "batchnorm:_bwd_apply_kernel", "scale_add_relu:_tuned_kernel",
        "scale_add_relu:_scale_add_relu_bwd_kernel")}, kernels
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps([_planted(recorded["launches"])]))

    out = tmp_path / "report"
    r = _run("--launches", str(launches), "--extra-launches", str(planted), "--out", str(out), "--jobs", "2")
    report = json.loads((out / "aot.json").read_text())
    assert (out / "aot.md").exists()
    # the planted config overflows on both architectures, and the run fails on it
    assert r.returncode == 1, r.stdout + r.stderr
    planted_rows = [c for c in report["overflows"] if c["config"] == "BLOCK_M=256 BLOCK_K=128 w8 s4"]
    assert sorted(c["arch"] for c in planted_rows) == [80, 90], report["overflows"]
    for c in planted_rows:
        assert c["shared"] > aot.SMEM_BLOCK_LIMIT[c["arch"]]
        assert c["occupancy"]["blocks"] <= 1
    assert "SMEM OVERFLOW" in r.stdout
    # ... and nothing else fails: no compile error, no overflow in a config the models' launches can pick
    assert report["errors"] == [], "\n".join(e["error"] for e in report["errors"])
    real = [c for c in report["overflows"] if c not in planted_rows]
    assert real == [], [(c["kernel"], c["arch"], c["config"], c["shared"]) for c in real]

    rows = report["compiles"]
    assert {c["arch"] for c in rows} == {80, 90}
    for c in rows:  # the report's occupancy is the arithmetic above on its own numbers
        assert c["occupancy"] == aot.occupancy(c["registers"], c["shared"], c["num_warps"], c["arch"])
        assert 0 < c["registers"] <= 255
    # bf16 tl.dot kernels use the tensor cores: wgmma on sm_90 (4-warp configs), mma on sm_80
    bf16_dot = [c for c in rows if c["dot"] and "*bf16" in c["specialisation"]]
    assert any(c["wgmma"] > 0 for c in bf16_dot if c["arch"] == 90 and c["num_warps"] % 4 == 0)
    assert all(c["mma"] > 0 for c in bf16_dot if c["arch"] == 80)
    # every conv launch has its best warps/SM per arch, and the targets' misses are listed, not fatal
    conv = [e for e in report["launches"] if e["kernel"] in aot.CONV_KERNELS]
    assert conv and all(e["best_warps_sm90"] is not None and e["best_warps_sm80"] is not None for e in conv)
    assert {m["target"] for m in report["misses"]} <= {
        "no spills in a config autotuning can pick",
        f"elementwise/reduction kernels <= {aot.ELEMENTWISE_MAX_REGS} registers",
        f"conv launch >= {aot.CONV_MIN_WARPS_SM90} warps/SM on sm_90"}


@pytest.mark.slow
def test_skipping_kernels_records_what_running_them_does(tmp_path):
    """The recording mode that skips the kernels (and ATen's conv gradients) sees the same launches, argument for
    argument (dtypes, 16-byte alignment, every int, the meta arguments, how often), as running them under the
    interpreter: a Res2Net 'stage' block (channel slices of the chain) and a pre-activation block with its
    projection, eval and training with ATen's and with the Triton conv gradients."""
    recs = {}
    for how in ("skip", "execute"):
        path = tmp_path / f"{how}.json"
        r = _run("--models", "res2net50_26w_4s/layer1.0", "resnetv2_50/stages.1.blocks.0", "--modes", "eval", "train",
                 "train-triton-bwd", "--precisions", "fp32", "--sizes", "8:2", "--record-only", "--save-launches",
                 str(path), "--jobs", "1", *(["--execute"] if how == "execute" else []))
        assert r.returncode == 0, r.stdout + r.stderr
        recs[how] = {json.dumps({k: e[k] for k in ("kernel", "args", "meta")}, sort_keys=True):
                     (e["count"], e["contexts"]) for e in json.loads(path.read_text())["launches"]}
    assert len(recs["skip"]) > 50
    assert recs["skip"] == recs["execute"]
