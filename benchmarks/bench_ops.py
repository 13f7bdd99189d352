"""Per-op benchmark: every fused op at every layer shape of res2net50_26w_4s, res2net50_14w_8s,
res2net50_48w_2s, resnext50_32x4d and resnetv2_50, per provider, mode, batch and dtype, in one run.

    python benchmarks/bench_ops.py                       # device defaults (see --help)
    python benchmarks/bench_ops.py --quick               # stage 1 and 4 of two models, batch 1, forward
    python benchmarks/bench_ops.py --models res2net50_26w_4s --batch 256 --dtype bfloat16 --mode forward

GPU timing: triton.testing.do_bench (median, 20/80 quantiles); CPU: torch.utils.benchmark. Results: JSON, CSV
and a PNG of the speedup per layer under benchmarks/results/ (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from resfast._bench import ops as ob
from resfast._bench.env import metadata
from resfast._bench.models import progress
from resfast._bench.results import write_result

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", nargs="+", default=None, choices=sorted(ob.MODELS))
    p.add_argument("--providers", nargs="+", default=None, choices=ob.PROVIDERS)
    p.add_argument("--mode", nargs="+", default=None, choices=ob.MODES)
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES))
    p.add_argument("--stages", nargs="+", type=int, default=None, choices=[1, 2, 3, 4])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    # Defaults: the whole matrix on a GPU; on the CPU what finishes in minutes (CPU half-precision convs are not
    # what anyone deploys, and torch.compile per shape costs tens of seconds on 2 cores: ask for them explicitly).
    d = dict(models=list(ob.MODELS), providers=list(ob.PROVIDERS), mode=list(ob.MODES), batch=[1, 32, 256],
             dtype=["float32", "float16", "bfloat16"], stages=None) if gpu else \
        dict(models=list(ob.MODELS), providers=["resfast-triton", "resfast-cuda", "eager-nchw", "eager-cl"],
             mode=["forward"], batch=[1], dtype=["float32"], stages=None)
    if args.quick:
        d.update(models=["res2net50_26w_4s", "resnext50_32x4d"], mode=["forward"], batch=[1], stages=[1, 4])
        if gpu:
            d.update(dtype=["bfloat16"], batch=[32], providers=["resfast-triton", "resfast-cuda", "eager-cl",
                                                                "compile"])
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    dtypes = [DTYPES[n] for n in args.dtype]
    total = sum(1 for m in args.models for layer in ob.capture_layers(m)
                if not args.stages or layer.stage in args.stages) * len(args.providers) * len(args.mode) * \
        len(args.batch) * len(dtypes)
    bar = progress(total, "ops")
    rows, bw = ob.run(args.models, args.providers, args.mode, args.batch, dtypes, device, args.stages, bar)
    bar.close()
    result = {"kind": "ops", **metadata(device, ["python benchmarks/bench_ops.py"] + (sys.argv[1:] if argv is None
                                                                                      else list(argv))),
              "config": {k: getattr(args, k) for k in ("models", "providers", "mode", "batch", "dtype", "stages")},
              "copy_bandwidth_gbs": bw, "rows": rows}
    print(format_table(result))
    paths = write_result(result, args.out_dir, args.name)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _fmt(v, spec: str) -> str:
    return "" if v is None else spec.format(v)


def format_table(result: dict) -> str:
    lines = [f"device: {result['device']} | torch {result['versions']['torch']} | copy bandwidth "
             f"{result['copy_bandwidth_gbs']:.1f} GB/s (the memory floor)"]
    skipped = {(r["provider"], r["skipped"]) for r in result["rows"] if r.get("skipped")}
    for prov, why in sorted(skipped):
        lines.append(f"  {prov} skipped: {why}")
    head = (f"{'layer':<46} {'mode':<8} {'b':>4} {'dtype':<8} {'provider':<20} {'median ms':>10} {'vs eager':>8} "
            f"{'GB/s':>7} {'% floor':>7}")
    lines += ["", head, "-" * len(head)]
    for r in result["rows"]:
        if r.get("skipped"):
            continue
        lines.append(f"{r['layer']:<46} {r['mode']:<8} {r['batch']:>4} {r['dtype']:<8} {r['provider']:<20} "
                     f"{r['median_ms']:>10.3f} {_fmt(r.get('speedup_vs_eager'), '{:.2f}x'):>8} "
                     f"{_fmt(r.get('gbs'), '{:.1f}'):>7} {_fmt(r.get('pct_of_floor'), '{:.0f}%'):>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
