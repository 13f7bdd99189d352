"""The benchmark entry points run on the CPU (tiny sizes) and write well-formed result files."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("torchvision")
ROOT = Path(__file__).resolve().parents[2]
# What torch's profiler (kineto) prints when the CPU peak memory is measured on a machine without a GPU:
# "USDT:<date> ... profiler_start", "ERROR:<date> ... gpuGetDeviceCount failed with code 35", "STAGE:..." and
# c10 warnings ("[W...] ... kineto/profiler ..."). None of it belongs in a benchmark's output.
PROFILER_NOISE = re.compile(r"^(?:USDT|STAGE|INFO|VERBOSE|WARNING):\d{4}-\d\d-\d\d |^ERROR\b"
                            r"|^\[W.*(?i:kineto|profiler|cupti)|gpuGetDeviceCount|profiler_st(?:art|op)")


def _noise(text):
    """The lines of a run's output (tqdm's carriage returns split lines too) that are profiler noise."""
    return [line for line in re.split(r"[\r\n]+", text) if PROFILER_NOISE.search(line)]


def test_kineto_chatter_is_dropped_and_other_stderr_kept(capfd):
    """The CPU peak's profiler start/stop runs with fd 2 captured: kineto's chatter goes, everything else is written
    back to stderr (a real kineto error included)."""
    import os

    import torch

    from resfast._bench.models import _kineto_chatter_dropped

    usdt = "USDT:2026-12-03 02:34:00 5531:5531 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
    no_gpu = "ERROR:2026-12-03 02:34:01 5531:5531 DeviceProperties.cpp:50] gpuGetDeviceCount failed with code 35\n"
    real = "ERROR:2026-12-03 02:34:01 5531:5531 CuptiActivityApi.cpp:99] something else failed\n"
    with _kineto_chatter_dropped():
        os.write(2, (usdt + no_gpu + "a real message\n" + real).encode())
    err = capfd.readouterr().err
    assert "a real message\n" in err and real in err and usdt not in err
    assert (no_gpu in err) == torch.cuda.is_available()


def test_noise_pattern_matches_what_the_profiler_prints():
    text = ("USDT:2026-12-03 02:34:00 5531:5531 SyncActivityProfilerHandler.cpp:52] profiler_start\n"
            "timing infer:   0%|   | 0/28\rERROR:2026-12-03 02:34:01 5531:5531 DeviceProperties.cpp:50] "
            "gpuGetDeviceCount failed with code 35\n"
            "[W1203 02:34:01.000000000 kineto_shim.cpp:400] Warning: something\n"
            "model  mode  provider  median ms  images/s\nresfast ops ran on backend 'cpu'\n")
    assert len(_noise(text)) == 3


def _run(args, tmp_path, env=None):
    out = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path), "--name", "r"], capture_output=True,
                         text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    # every bench run measures CPU peak memory quietly: no profiler chatter on stdout or stderr
    noise = _noise(out.stdout + "\n" + out.stderr)
    assert not noise, noise[:6]
    result = json.loads((tmp_path / "r.json").read_text())
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["rows"]) > 0
    assert {"command", "date", "device", "driver", "versions", "config", "rows", "kind"} <= set(result)
    assert {"torch", "triton", "cuda", "resfast", "git_commit", "python"} <= set(result["versions"])
    return out.stdout, result


@pytest.mark.slow
def test_resfast_bench_quick(tmp_path):
    stdout, r = _run(["-m", "resfast.bench", "--quick", "--batch", "1", "--size", "64", "--iters", "2",
                      "--warmup", "1", "--mode", "infer", "train"], tmp_path)
    assert "images/s" in stdout and "res2net50_26w_4s through resfast vs resnet50 eager (infer)" in stdout
    assert {(x["model"], x["provider"], x["mode"]) for x in r["rows"]} == {
        (m, p, mode) for m in ("res2net50_26w_4s", "resnet50") for p in ("eager", "resfast")
        for mode in ("infer", "train")}
    for row in r["rows"]:
        assert row["images_per_s"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        if row["mode"] == "infer":
            assert row["max_abs_diff_vs_eager"] < 1e-4
        if row["provider"] == "resfast":
            assert row["resfast_blocks"] == "16/16"
        assert row["peak_mem_mb"] > 0  # measured on the CPU too
    assert (tmp_path / "r.png").stat().st_size > 1000 or not _has_matplotlib()


def test_cpu_peak_memory_counts_every_live_allocation():
    """The CPU peak: what the allocator held at most during the step above what it held before, frees included."""
    import torch

    from resfast._bench.models import _peak_mem_mb

    kept = torch.ones(2 << 20, dtype=torch.uint8)  # allocated before the step: not counted

    def step():
        a = torch.ones(8 << 20, dtype=torch.uint8)
        b = torch.ones(4 << 20, dtype=torch.uint8)  # a and b live together: 12 MiB
        del a, b
        c = torch.ones(6 << 20, dtype=torch.uint8)  # after the frees: 6 MiB, below the peak
        return c[0].item()

    assert 12 <= _peak_mem_mb(step, torch.device("cpu")) < 12.5
    assert kept.numel()


@pytest.mark.slow
def test_bench_models_script(tmp_path):
    _, r = _run(["benchmarks/bench_models.py", "--models", "resnetv2_50", "--providers", "eager", "resfast",
                 "--batch", "1", "--size", "32", "--iters", "1", "--warmup", "0", "--mode", "infer"], tmp_path)
    # timm's resnetv2 blocks are converted (TimmPreActBottleneck): the file records it
    assert {row["resfast_blocks"] for row in r["rows"] if row["provider"] == "resfast"} == {"16/16"}


@pytest.mark.slow
def test_bench_ops_script_and_tables(tmp_path):
    # as a user runs it on a CPU: no Triton interpreter (its stage-4 chain takes minutes there), so the Triton rows
    # record why they were skipped; the interpreter runs of the benchmarks are the pad-vs-mask and conv-backward ones
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} if not _cuda() else None
    stdout, r = _run(["benchmarks/bench_ops.py", "--models", "res2net50_26w_4s", "--stages", "4", "--providers",
                      "resfast-triton", "eager-nchw", "eager-cl", "--mode", "forward", "full"], tmp_path, env)
    assert r["kind"] == "ops" and r["copy_bandwidth_gbs"] > 0
    measured = [x for x in r["rows"] if not x.get("skipped")]
    assert {x["op"] for x in measured} == {"conv_bn_relu", "res2net_chain"}
    assert all(x["stage"] == 4 for x in r["rows"])
    assert all(x["median_ms"] > 0 for x in measured)
    assert all(x["speedup_vs_eager"] == 1.0 for x in measured if x["provider"] == "eager-cl")
    assert all(x["pct_of_floor"] > 0 for x in measured if x["mode"] == "forward")
    skipped = [x for x in r["rows"] if x.get("skipped")]
    assert bool(skipped) == (not _cuda())
    if skipped:  # this CPU has no Triton kernels: the reason is recorded instead of a number
        assert all(x["provider"] == "resfast-triton" and "Triton" in x["skipped"] for x in skipped)
    # the README tables are generated from such files
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "benchmarks" / "README.md", readme)
    upd = [sys.executable, "benchmarks/update_tables.py", "--readme", str(readme), "--results", str(tmp_path)]
    assert subprocess.run(upd + ["--check"], cwd=ROOT).returncode == 1
    assert subprocess.run(upd, cwd=ROOT, capture_output=True).returncode == 0
    text = readme.read_text()
    assert "### ops (benchmarks/bench_ops.py): " in text and "s4 chain stage C832" in text and "results/r.json" in text
    assert subprocess.run(upd + ["--check"], cwd=ROOT).returncode == 0


def _cuda():
    import torch

    return torch.cuda.is_available()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def test_committed_tables_are_current():
    out = subprocess.run([sys.executable, "benchmarks/update_tables.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_bench_pad_vs_mask_script(tmp_path):
    """The mask-or-pad benchmark (ready for the GPU) runs end to end on the CPU through the Triton interpreter."""
    pytest.importorskip("triton")
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "benchmarks/bench_pad_vs_mask.py", "--device", "cpu", "--batch", "1",
                          "--size", "32", "--dtype", "float32", "--out-dir", str(tmp_path), "--name", "r"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert [row["width"] for row in r["rows"]] == [26, 52, 104, 208]
    assert [row["padded_width"] for row in r["rows"]] == [32, 64, 112, 208]
    assert all(row["masked_ms"] > 0 and row["padded_ms"] > 0 for row in r["rows"])


@pytest.mark.slow
def test_bench_conv_backward_script(tmp_path):
    """The conv-gradient benchmark (Triton dgrad/wgrad vs ATen, ready for the GPU) runs end to end on the CPU
    through the Triton interpreter, and its accuracy columns hold: the Triton gradients agree with float32 ATen."""
    pytest.importorskip("triton")
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "benchmarks/bench_conv_backward.py", "--device", "cpu", "--batch", "1",
                          "--size", "32", "--dtype", "float32", "--models", "resnext50_32x4d", "--limit", "3",
                          "--out-dir", str(tmp_path), "--name", "r"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert [(row["k"], row["groups"], row["dx"]) for row in r["rows"]] == [(7, 1, False), (1, 1, True), (3, 32, True)]
    for row in r["rows"]:
        assert row["aten_ms"] > 0 and row["triton_ms"] > 0
        assert all(v < 1e-5 for k, v in row.items() if k.startswith("err_"))
    t = r["totals"]["resnext50_32x4d"]
    assert t["convs"] == sum(row["n"] for row in r["rows"]) and t["best_ms"] <= min(t["aten_ms"], t["triton_ms"])
