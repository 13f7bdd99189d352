"""benchmarks/update_tables.py's choice of runs: per device, only runs of the newest commit measured there are
tabulated (the newest of each kind and entry point); a run of older code, of any entry point, is listed as older."""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import update_tables  # noqa: E402


def _run(tmp_path, name, kind, command, commit, date, device="cpu box", **extra):
    rows = ([{"model": "m", "mode": "infer", "provider": p, "median_ms": 10.0, "images_per_s": 100.0,
              "ratio_vs_eager": 1.0, "resfast_blocks": b} for p, b in (("eager", "0/16"), ("resfast", "16/16"))]
            if kind == "models" else
            [{"layer": "s1 chain", "mode": "forward", "batch": 1, "dtype": "float32", "provider": "eager-cl",
              "median_ms": 1.0, "speedup_vs_eager": 1.0, "pct_of_floor": 5.0},
             {"layer": "s1 chain", "mode": "forward", "batch": 1, "dtype": "float32", "provider": "resfast-triton",
              "skipped": f"reason at {commit}"}])
    r = {"kind": kind, "command": command, "date": date, "device": device,
         "versions": {"torch": "t", "resfast": "0.1.0", "git_commit": commit},
         "config": {"batch": 8, "size": 224, "dtype": "float32", "channels_last": True, "warmup": 1, "iters": 3},
         "rows": rows, **extra}
    (tmp_path / f"{name}.json").write_text(json.dumps(r))


def test_runs_of_an_older_commit_are_not_tabulated(tmp_path):
    _run(tmp_path, "suite_old", "models", "python benchmarks/bench_models.py", "aaa", "2026-01-01T00:00:00",
         resfast_backend="eager", skipped={"resfast": "ran its eager reference"})
    _run(tmp_path, "ops_old", "ops", "python benchmarks/bench_ops.py", "aaa", "2026-01-01T00:01:00")
    _run(tmp_path, "front_new", "models", "python -m resfast.bench", "bbb", "2026-01-02T00:00:00",
         resfast_backend="cpu")
    shown, older = update_tables.select(tmp_path)
    assert [p.name for p, _ in shown] == ["front_new.json"]
    assert sorted(p.name for p, _ in older) == ["ops_old.json", "suite_old.json"]
    text = update_tables.section(tmp_path)
    assert "reason at aaa" not in text and "ran its eager reference" not in text  # nothing of the old code's runs
    assert "[`results/ops_old.json`](results/ops_old.json)" in text  # listed, not tabulated
    assert "the `resfast` provider ran the `cpu` backend" in text and "batch 8, 224x224" in text


def test_same_commit_keeps_every_entry_point_and_devices_are_independent(tmp_path):
    _run(tmp_path, "suite", "models", "python benchmarks/bench_models.py", "bbb", "2026-01-02T00:00:00")
    _run(tmp_path, "ops", "ops", "python benchmarks/bench_ops.py", "bbb", "2026-01-02T00:01:00")
    _run(tmp_path, "front", "models", "python -m resfast.bench", "bbb", "2026-01-02T00:02:00")
    gpu_ops = "bash scripts/gpu_check.sh (step bandwidth: python scripts/gpu_check.py bandwidth)"
    _run(tmp_path, "gpu_ops", "ops", gpu_ops, "aaa", "2026-01-01T00:00:00", device="gpu box")
    _run(tmp_path, "gpu_models", "models", "python scripts/gpu_check.py headline", "aaa", "2026-01-01T00:00:01",
         device="gpu box", resfast_backend="explicit (resfast-triton, resfast-cuda)")
    shown, older = update_tables.select(tmp_path)
    assert sorted(p.name for p, _ in shown) == ["front.json", "gpu_models.json", "gpu_ops.json", "ops.json",
                                                "suite.json"]
    assert not older
    text = update_tables.section(tmp_path)
    assert "reason at bbb" in text and "reason at aaa" in text
    assert "### ops (scripts/gpu_check.sh): gpu box" in text and "### models (scripts/gpu_check.py): gpu box" in text
    assert "resfast backends: explicit (resfast-triton, resfast-cuda)" in text


def test_generated_tables_are_valid_markdown(tmp_path):
    """Every table row of the generated section has as many cells as its header; resfast-only columns stay blank
    for the other providers."""
    _run(tmp_path, "front", "models", "python -m resfast.bench", "bbb", "2026-01-02T00:02:00")
    (tmp_path / "front.png").write_bytes(b"")
    text = update_tables.section(tmp_path)
    assert "![models (resfast.bench): cpu box](results/front.png)" in text
    assert "| m | infer | eager | 10.0 | 100.00 | 1.00x |  |  |" in text
    _assert_tables_valid(text)


def test_committed_benchmarks_readme_tables_are_valid():
    _assert_tables_valid((ROOT / "benchmarks" / "README.md").read_text())


def _assert_tables_valid(text):
    """Each table: a header, a delimiter row, then rows with the header's number of cells."""
    header, row = None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            header, row = None, 0
            continue
        cells = [c.strip() for c in line.strip().strip("|").replace("\\|", "").split("|")]
        row += 1
        if header is None:
            header = len(cells)
        assert len(cells) == header, f"line {n}: {len(cells)} cells, the header has {header}: {line}"
        if row == 2:
            assert all(re.fullmatch(r":?-{3,}:?", c) for c in cells), f"line {n}: no delimiter row under the header"
