"""python -m resfast.bench runs on the CPU, checks resfast against eager, and writes a well-formed result."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("timm")
pytest.importorskip("torchvision")


def test_bench_tiny_run(tmp_path):
    out_file = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "resfast.bench", "--quick", "--batch", "1", "--size", "64", "--iters", "2",
           "--warmup", "1", "--out", str(out_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "images/s" in out.stdout and "res2net50_26w_4s through resfast vs resnet50 eager" in out.stdout
    r = json.loads(out_file.read_text())
    assert {"command", "date", "device", "versions", "config", "rows", "resfast_backend"} <= set(r)
    assert {row["model"] for row in r["rows"]} == {"res2net50_26w_4s", "resnet50"}
    assert {row["impl"] for row in r["rows"]} == {"eager", "resfast"}
    for row in r["rows"]:
        assert row["images_per_s"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["max_abs_diff_vs_eager"] < 1e-4
    eager = [row for row in r["rows"] if row["impl"] == "eager"]
    assert all(row["ratio_vs_eager"] == 1.0 for row in eager)
