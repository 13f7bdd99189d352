"""The regression comparison on fixture result files (tests/fixtures/bench/)."""

import subprocess
import sys
from pathlib import Path

import pytest

from resfast._bench.results import compare, format_compare, load

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "bench"


def test_compare_finds_slower_faster_and_unmatched():
    c = compare(load(FIX / "old.json"), load(FIX / "new.json"), threshold=0.05)
    slower = [(e["key"]["model"], e["key"]["provider"], round(e["ratio"], 2)) for e in c["slower"]]
    assert slower == [("resnet50", "resfast", 1.3)]  # eager resnet50 at +3% is within the threshold
    assert [(e["key"]["model"], round(e["ratio"], 2)) for e in c["faster"]] == [("res2net50_26w_4s", 0.75)]
    assert [k["model"] for k in c["only_old"]] == ["res2next50"]
    assert [k["model"] for k in c["only_new"]] == ["resnext50_32x4d"]  # the skipped row is not compared
    text = format_compare(c)
    assert "1 slower, 1 faster" in text and "SLOWER 1.30x" in text and "model=resnet50" in text


def test_threshold_matters():
    c = compare(load(FIX / "old.json"), load(FIX / "new.json"), threshold=0.02)
    assert {e["key"]["provider"] for e in c["slower"] if e["key"]["model"] == "resnet50"} == {"eager", "resfast"}
    c = compare(load(FIX / "old.json"), load(FIX / "new.json"), threshold=0.5)
    assert c["slower"] == [] and c["faster"] == []


@pytest.mark.slow
def test_cli_exit_codes():
    cmd = [sys.executable, "-m", "resfast.bench", "--compare"]
    r = subprocess.run(cmd + [str(FIX / "old.json"), str(FIX / "new.json")], capture_output=True, text=True)
    assert r.returncode == 1 and "SLOWER" in r.stdout
    r = subprocess.run(cmd + [str(FIX / "old.json"), str(FIX / "old.json")], capture_output=True, text=True)
    assert r.returncode == 0 and "0 slower" in r.stdout


def test_load_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a resfast benchmark result"):
        load(p)


def test_default_results_stay_out_of_the_committed_tables(monkeypatch):
    """`make bench` from a checkout must not write where benchmarks/update_tables.py --check reads (the committed
    results), or a following `make test` fails test_committed_tables_are_current."""
    from pathlib import Path

    from resfast.bench import default_out_dir

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    out = default_out_dir().resolve()
    assert out == root / "resfast-bench-results"
    assert (root / "benchmarks" / "results") not in (out, *out.parents)
