"""Imports a gpu_check.tar.gz returned by a lent GPU (``bash scripts/gpu_check.sh``) into committed files.

    python benchmarks/import_gpu_results.py gpu_check.tar.gz
    python benchmarks/update_tables.py        # then: the README tables from the new result files

Writes
- ``benchmarks/results/models_<device>_<time>.{json,csv,png}`` (headline: images/s, peak memory) and
  ``ops_<device>_<time>.{json,csv,png}`` (stage-1 chain GB/s vs copy bandwidth): the formats update_tables.py reads;
- ``benchmarks/results/gpu_check/gpu_check_<device>_<time>.json``: the whole run record, every step and case;
- ``resfast/ops/gpu_verified.json`` (read by resfast/ops/dispatch.py at import: `auto` picks a GPU backend only for
  the ops listed there): per backend, an op is added when, in this run, its smoke case passed, every whole-model
  case of the backend passed, no whole-block case of the backend failed, and its correctness cases passed in
  fp16 and bf16, eval and training, with none failing; an op with a failing case (or whose backend failed smoke,
  models or a block) is removed; an op this run did not reach keeps its previous state.

A dry run's tarball (``RESFAST_GPU_CHECK_DRY_RUN=1``, the CPU) never changes gpu_verified.json, and its result files
are refused unless --allow-dry-run is given (the tests import one into a temporary directory).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VERIFIED = ROOT / "resfast" / "ops" / "gpu_verified.json"
OPS = {"triton": ("conv_bn_relu", "bn_relu_conv", "res2net_chain", "scale_add_relu"),
       "cuda": ("conv_bn_relu", "bn_relu_conv", "res2net_chain")}
GPU_DTYPES = ("bfloat16", "float16")
MODES = ("eval", "train")


def read_tarball(path: Path) -> tuple[dict, dict]:
    """(the run record gpu_check.json, {name: bytes} of the result files under gpu_check/results/)."""
    with tarfile.open(path, "r:gz") as tar:
        files = {}
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                files[m.name] = f.read() if f else b""
    key = "gpu_check/gpu_check.json"
    if key not in files:
        raise SystemExit(f"{path}: no {key} (not a scripts/gpu_check.sh tarball?)")
    results = {Path(n).name: b for n, b in files.items() if n.startswith("gpu_check/results/")}
    return json.loads(files[key]), results


def is_dry(run: dict) -> bool:
    return bool(run.get("dry_run")) or "dry run" in str(run.get("device", "")).lower() or \
        not str(run.get("device", "")).strip() or run.get("device") in ("?", "cpu")


def verdict(run: dict) -> dict:
    """{backend: {"verified": [...], "failed": [...], "not_run": [...], "why": [...]}} from the run record."""
    steps = {s["step"]: s for s in run.get("steps", [])}

    def cases(step, backend):
        return [c for c in steps.get(step, {}).get("cases", []) if c.get("backend") == backend]

    out = {}
    for backend, ops in OPS.items():
        why = []
        smoke = cases("smoke", backend)
        if not smoke or any(c["status"] != "pass" for c in smoke):
            why.append("smoke: " + (", ".join(f"{c['name']} {c['status']}" for c in smoke) or "not run"))
        models = cases("models", backend)
        if any(c["status"] == "fail" for c in models):
            why.append("models: a whole model failed")
        elif len(models) < 3 or any(c["status"] != "pass" for c in models):
            why.append("models: not every model passed (" + (", ".join(f"{c.get('model')} {c['status']}"
                                                                      for c in models) or "not run") + ")")
        corr = cases("correctness", backend)
        blocks = [c for c in corr if c.get("op") == "block"]
        if any(c["status"] == "fail" for c in blocks):
            why.append("correctness: a whole training block failed")
        hard_fail = any(c["status"] == "fail" for c in smoke + models + blocks)
        verified, failed, not_run = [], [], []
        for op in ops:
            mine = [c for c in corr if c.get("op") == op]
            if hard_fail or any(c["status"] == "fail" for c in mine):
                failed.append(op)
                continue
            covered = all(any(c["status"] == "pass" and c.get("dtype") == dt and c.get("mode") == mode for c in mine)
                          for dt in GPU_DTYPES for mode in MODES)
            (verified if covered and not why else not_run).append(op)
        out[backend] = {"verified": verified, "failed": failed, "not_run": not_run, "why": why}
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40] or "unknown"


def _stamp(run: dict) -> str:
    try:
        t = datetime.datetime.fromisoformat(run.get("started", ""))
    except ValueError:
        t = datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y%m%d-%H%M%S")


def import_results(run: dict, results: dict, results_dir: Path) -> list[Path]:
    """The headline and bandwidth result files, re-written with resfast's result writer (JSON, CSV, PNG)."""
    sys.path.insert(0, str(ROOT))
    from resfast._bench.results import write_result

    written = []
    stem_tail = f"{_slug(run.get('device'))}_{_stamp(run)}"
    for name in ("gpu_check_models.json", "gpu_check_ops.json"):
        if name not in results:
            continue
        result = json.loads(results[name])
        if not result.get("rows"):
            continue
        result["command"] = result.get("command", "")
        written += write_result(result, results_dir, f"{result['kind']}_{stem_tail}")
    record_dir = results_dir / "gpu_check"  # a subfolder: update_tables.py reads only the top level's result files
    record_dir.mkdir(parents=True, exist_ok=True)
    record = record_dir / f"gpu_check_{stem_tail}.json"
    record.write_text(json.dumps(run, indent=1) + "\n")
    written.append(record)
    return written


def update_verified(run: dict, v: dict, path: Path, evidence: str) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {}
    for backend, res in v.items():
        entry = data.get(backend) if isinstance(data.get(backend), dict) else {}
        ops = (set(entry.get("ops", [])) - set(res["failed"])) | set(res["verified"])
        entry = {"ops": sorted(ops), "device": run.get("device"), "date": run.get("started"),
                 "versions": run.get("versions", {}), "tune": run.get("tune"), "evidence": evidence,
                 "failed_in_that_run": res["failed"], "not_reached_in_that_run": res["not_run"]}
        data[backend] = entry
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tarball", type=Path)
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--verified-file", type=Path, default=VERIFIED)
    p.add_argument("--allow-dry-run", action="store_true",
                   help="import a dry run's result files (tests); gpu_verified.json is never changed by one")
    args = p.parse_args(argv)
    run, results = read_tarball(args.tarball)
    dry = is_dry(run)
    v = verdict(run)
    buf = io.StringIO()
    for backend, res in v.items():
        print(f"{backend}: verified {res['verified'] or '-'}; failed {res['failed'] or '-'}; not reached "
              f"{res['not_run'] or '-'}" + ("".join(f"\n    {w}" for w in res["why"])), file=buf)
    print(buf.getvalue(), end="")
    if dry and not args.allow_dry_run:
        print(f"{args.tarball}: a dry run (device {run.get('device')!r}), not a GPU: nothing imported "
              "(--allow-dry-run imports its result files; the verified flags never change from a dry run)")
        return 1
    written = import_results(run, results, args.results_dir)
    print("wrote " + ", ".join(str(w) for w in written))
    if dry:
        print(f"dry run: {args.verified_file} unchanged (a dry run is not a GPU)")
        return 0
    try:
        evidence = str(written[-1].relative_to(ROOT))
    except ValueError:
        evidence = str(written[-1])
    update_verified(run, v, args.verified_file, evidence)
    print(f"updated {args.verified_file}; now run python benchmarks/update_tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
