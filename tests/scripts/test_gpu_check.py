"""scripts/gpu_check.sh, the lent GPU's one command: its CPU dry run (Triton interpreter, tiny shapes) passes every
step and returns what the GPU run would (two files, every step in the JSON and the tarball), its step budgets fit
the 9 minutes, and benchmarks/import_gpu_results.py imports a tarball without ever flipping a verified flag from a
dry run."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["build", "smoke", "correctness", "models", "headline", "bandwidth", "sanitize"]
sys.path.insert(0, str(ROOT / "benchmarks"))

import import_gpu_results as igr  # noqa: E402
import update_tables  # noqa: E402


def test_step_budgets_sum_below_nine_minutes():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--plan"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    budgets = dict((k, int(v)) for k, v in re.findall(r"(\w+):(\d+)", out.stdout.splitlines()[0]))
    assert list(budgets) == STEPS
    total = int(re.search(r"total: (\d+) s \(\+(\d+) s slack\)", out.stdout).group(1))
    slack = int(re.search(r"\+(\d+) s slack", out.stdout).group(1))
    assert total == sum(budgets.values()) and total + slack <= 540


def test_budgets_over_nine_minutes_are_refused(tmp_path):
    script = (ROOT / "scripts" / "gpu_check.sh").read_text().replace("sanitize:25)", "sanitize:125)")
    bad = tmp_path / "scripts" / "gpu_check.sh"
    bad.parent.mkdir()
    bad.write_text(script)
    out = subprocess.run(["bash", str(bad), "--plan"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "over 540 s" in out.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gpu-out")
    env = {**os.environ, "RESFAST_GPU_CHECK_DRY_RUN": "1", "OUT": str(out_dir), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1500)
    return r, out_dir


def _tar(out_dir):
    with tarfile.open(out_dir / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
        run = json.loads(tar.extractfile("gpu_check/gpu_check.json").read())
    return names, run


@pytest.mark.slow
def test_dry_run_passes_and_returns_two_files(dry_run):
    r, out_dir = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["gpu_check.tar.gz", "summary.txt"]  # the device tool returns at most 8 files
    names, run = _tar(out_dir)
    assert run["dry_run"] is True and run["tune"] == "quick"
    assert [s["step"] for s in run["steps"]] == STEPS
    assert sum(run["budget_s"].values()) == run["budget_total_s"] < 540
    for s in run["steps"]:
        assert s["status"] in ("pass", "skipped"), (s["step"], s["status"], [c for c in s["cases"]
                                                                          if c["status"] not in ("pass", "skipped")])
        assert f"gpu_check/logs/{s['step']}.log" in names and f"gpu_check/steps/{s['step']}.json" in names
        assert s["timeout_s"] <= sum(run["budget_s"].values()) and s["seconds"] >= 0
    summary = (out_dir / "summary.txt").read_text()
    assert "DRY RUN" in summary and all(f"{s} " in summary for s in STEPS)


@pytest.mark.slow
def test_dry_run_cases(dry_run):
    _, out_dir = dry_run
    _, run = _tar(out_dir)
    steps = {s["step"]: s for s in run["steps"]}
    # every Triton kernel launched once by the smoke workload
    smoke = {c["backend"]: c for c in steps["smoke"]["cases"]}
    assert smoke["triton"]["status"] == "pass"
    assert set(smoke["triton"]["numbers"]["kernels"]) == set(smoke["triton"]["numbers"]["launched"])
    for step in ("smoke", "correctness", "models", "headline", "bandwidth", "sanitize"):
        for c in steps[step]["cases"]:
            if c["backend"] == "cuda":  # no GPU: skipped with the reason (its code ran on the cpu stand-in)
                assert c["status"] == "skipped" and "dry run" in c["reason"], c
    corr = steps["correctness"]["cases"]
    triton = [c for c in corr if c["backend"] == "triton" and c["tier"] < 3]  # tier 3: more shapes, GPU only
    assert triton and all(c["status"] == "pass" for c in triton)
    assert all(c["status"] == "skipped" for c in corr if c["tier"] == 3)
    assert {c["op"] for c in triton} >= set(igr.OPS["triton"]) | {"block", "conv_grad"}
    assert {c["mode"] for c in triton} == {"eval", "train"}
    assert [c["status"] for c in steps["models"]["cases"] if c["backend"] == "triton"] == ["pass"] * 3


@pytest.mark.slow
def test_import_of_a_dry_run_never_flips_verified(dry_run, tmp_path):
    _, out_dir = dry_run
    verified = tmp_path / "gpu_verified.json"
    verified.write_text(json.dumps({"triton": {"ops": []}, "cuda": {"ops": []}}))
    before = verified.read_text()
    results = tmp_path / "results"
    tarball = str(out_dir / "gpu_check.tar.gz")
    assert igr.main([tarball, "--results-dir", str(results), "--verified-file", str(verified)]) == 1
    assert not results.exists()  # refused without --allow-dry-run
    assert igr.main([tarball, "--results-dir", str(results), "--verified-file", str(verified), "--allow-dry-run"]) == 0
    assert verified.read_text() == before
    top = sorted(p.name for p in results.glob("*.json"))
    assert [n.split("_")[0] for n in top] == ["models", "ops"]
    assert len(list((results / "gpu_check").glob("gpu_check_*.json"))) == 1
    section = update_tables.section(results)  # the tables regenerate from the imported files
    assert "res2net50_26w_4s" in section and "chain" in section


def _case(step, backend, status, **kw):
    return {"name": f"{step} {backend}", "backend": backend, "status": status, **kw}


def _gpu_run(fail_op=None, skip_models=False):
    corr = [_case("correctness", b, "fail" if op == fail_op and b == "triton" else "pass", op=op, mode=m, dtype=d)
            for b, ops in igr.OPS.items() for op in ops for m in igr.MODES for d in igr.GPU_DTYPES]
    corr += [_case("correctness", b, "pass", op="block", mode="train", dtype="bfloat16") for b in igr.OPS]
    models = [] if skip_models else [_case("models", b, "pass", model=m) for b in igr.OPS for m in "abc"]
    return {"dry_run": False, "device": "NVIDIA H200", "started": "2026-12-02T15:00:00+00:00",
            "steps": [{"step": "smoke", "cases": [_case("smoke", b, "pass") for b in igr.OPS]},
                      {"step": "correctness", "cases": corr}, {"step": "models", "cases": models}]}


def test_verdict_flips_only_what_passed(tmp_path):
    v = igr.verdict(_gpu_run())
    assert v["triton"]["verified"] == list(igr.OPS["triton"]) and v["cuda"]["verified"] == list(igr.OPS["cuda"])
    v = igr.verdict(_gpu_run(fail_op="res2net_chain"))
    assert "res2net_chain" in v["triton"]["failed"] and "res2net_chain" not in v["triton"]["verified"]
    assert v["cuda"]["verified"] == list(igr.OPS["cuda"])
    v = igr.verdict(_gpu_run(skip_models=True))  # models not reached: nothing verified, nothing failed
    assert not v["triton"]["verified"] and not v["triton"]["failed"]
    assert igr.is_dry({"dry_run": True, "device": "NVIDIA H200"}) and igr.is_dry({"device": "cpu (dry run)"})
    path = tmp_path / "gpu_verified.json"
    path.write_text(json.dumps({"triton": {"ops": ["res2net_chain", "bn_relu_conv"]}}))
    igr.update_verified({}, igr.verdict(_gpu_run(fail_op="res2net_chain", skip_models=True)), path, "x")
    assert json.loads(path.read_text())["triton"]["ops"] == ["bn_relu_conv"]  # failed: removed; not reached: kept


def test_dispatch_reads_the_verified_file(tmp_path):
    from resfast.ops import dispatch

    path = tmp_path / "v.json"
    path.write_text(json.dumps({"triton": {"ops": ["res2net_chain", "nonsense"]}}))
    assert dispatch.read_verified_ops("triton", str(path)) == ("res2net_chain",)
    assert dispatch.read_verified_ops("cuda", str(path)) == ()
    assert dispatch.read_verified_ops("cuda", str(tmp_path / "missing.json")) == ()
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="cannot read"):
        assert dispatch.read_verified_ops("triton", str(path)) == ()
    # the committed file verifies nothing until a GPU run is imported
    committed = json.loads(Path(dispatch.VERIFIED_FILE).read_text())
    assert {b: committed[b]["ops"] for b in ("triton", "cuda")} == {
        b: list(dispatch.get(b).verified_ops) for b in ("triton", "cuda")}


def test_resfast_tune_quick_bounds_the_config_lists(monkeypatch):
    pytest.importorskip("triton")
    from resfast.backends.triton.kernels import conv

    monkeypatch.setattr(conv, "interpreting", lambda: False)  # as on a GPU
    monkeypatch.setenv("RESFAST_TUNE", "quick")
    assert conv.tuning_configs() == conv.CONFIGS[:conv.QUICK_CONFIGS] and conv.QUICK_CONFIGS < len(conv.CONFIGS)
    assert conv.tuning_configs([1, 2, 3]) == [1, 2]
    monkeypatch.setenv("RESFAST_TUNE", "full")
    assert conv.tuning_configs() == conv.CONFIGS
    monkeypatch.setenv("RESFAST_TUNE", "fast")
    with pytest.warns(RuntimeWarning, match="RESFAST_TUNE"):
        assert conv.tuning_configs() == conv.CONFIGS
    monkeypatch.setattr(conv, "interpreting", lambda: True)
    assert conv.tuning_configs([1, 2, 3]) == [1]


def test_resfast_tune_quick_caps_what_the_prune_keeps(monkeypatch):
    """With a prune function, quick tuning takes the first QUICK_CONFIGS of the configs the prune keeps (never a
    config it rejected because the first ones of the list did not fit), full tuning all of them."""
    pytest.importorskip("triton")
    from resfast.backends.triton.kernels import conv

    def prune(configs, named_args, **kwargs):
        return [c for c in configs if c % 2 == 1]

    monkeypatch.setattr(conv, "interpreting", lambda: False)
    monkeypatch.setenv("RESFAST_TUNE", "quick")
    assert conv.tuning_configs([0, 1, 2, 3, 5, 7], pruned=True) == [0, 1, 2, 3, 5, 7]
    assert conv.capped(prune)([0, 2, 4, 1, 3, 5, 7], {}) == [1, 3][:conv.QUICK_CONFIGS]
    monkeypatch.setenv("RESFAST_TUNE", "full")
    assert conv.capped(prune) is prune
