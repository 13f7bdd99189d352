"""``python -m resfast.bench``: images/s of ResNet-family models through resfast, eager PyTorch and
torch.compile, measured in one run on whatever device is present; results written as JSON + CSV + PNG.

Default: Res2Net-50 and ResNet-50, inference, resfast vs eager (plus torch.compile on a GPU).
``python -m resfast.bench --compare OLD.json NEW.json`` prints what got slower (exit code 1 if anything did).
The per-op and per-model suites are ``benchmarks/bench_ops.py`` and ``benchmarks/bench_models.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ._bench import models as mb
from ._bench.env import metadata
from ._bench.results import compare, format_compare, load, write_result

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_out_dir() -> Path:
    """./resfast-bench-results/ (ignored by git in a checkout): a user's run never touches the committed results in
    benchmarks/results/, which move only when a maintainer passes ``--out-dir benchmarks/results``."""
    return Path.cwd() / "resfast-bench-results"


def parser(prog="python -m resfast.bench", models_default=("res2net50_26w_4s", "resnet50")):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batch/size, few iterations (< 2 min on 2 CPU cores)")
    p.add_argument("--models", "--model", nargs="+", default=list(models_default), choices=sorted(mb.MODELS),
                   metavar="MODEL", help=f"models ({', '.join(mb.MODELS)})")
    p.add_argument("--mode", nargs="+", default=["infer"], choices=mb.MODES, help="infer and/or train (full step)")
    p.add_argument("--providers", "--backends", nargs="+", default=None, choices=mb.PROVIDERS, metavar="PROVIDER",
                   help=f"{', '.join(mb.PROVIDERS)} (default: eager resfast, + compile on a GPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float32 on CPU, bfloat16 (AMP) on GPU")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--nchw", dest="channels_last", action="store_false", help="NCHW instead of channels_last")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out-dir", type=Path, default=None, help="result files folder (default: ./resfast-bench-results)")
    p.add_argument("--name", default=None, help="file name stem of the result files (default: kind_device_time)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two result files")
    p.add_argument("--threshold", type=float, default=0.05, help="relative slow-down reported by --compare")
    return p


def main(argv=None, prog="python -m resfast.bench", models_default=("res2net50_26w_4s", "resnet50")) -> int:
    args = parser(prog, models_default).parse_args(argv)
    if args.compare:
        c = compare(load(args.compare[0]), load(args.compare[1]), args.threshold)
        print(format_compare(c))
        return 1 if c["slower"] else 0
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser(prog, models_default).error(f"--device {args.device}: no CUDA device is visible here")
    gpu = device.type == "cuda"
    defaults = {
        (False, False): dict(batch=8, size=224, iters=10, warmup=2, dtype="float32"),
        (False, True): dict(batch=2, size=160, iters=4, warmup=1, dtype="float32"),
        (True, False): dict(batch=256, size=224, iters=30, warmup=5, dtype="bfloat16"),
        (True, True): dict(batch=64, size=224, iters=10, warmup=3, dtype="bfloat16"),
    }[(gpu, args.quick)]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.providers is None:
        args.providers = ["eager", "resfast"] + (["compile"] if gpu else [])
    if "eager" not in args.providers:
        args.providers = ["eager"] + args.providers  # every ratio is against eager, measured in the same run
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, skipped = mb.run(args.models, args.mode, args.providers, args.batch, args.size, DTYPES[args.dtype], device,
                           args.channels_last, args.warmup, args.iters)
    result = {
        "kind": "models",
        **metadata(device, [prog] + (sys.argv[1:] if argv is None else list(argv))),
        "config": {"models": args.models, "modes": args.mode, "providers": args.providers, "batch": args.batch,
                   "size": args.size, "dtype": args.dtype, "channels_last": args.channels_last,
                   "warmup": args.warmup, "iters": args.iters},
        "resfast_backend": next((r["backend"] for r in rows if r["provider"] == "resfast"), None) or "n/a",
        "backends_not_used": {n: "; ".join(per_op["conv_bn_relu"]) for n, per_op in _unavailable().items()},
        "skipped": skipped,
        "rows": rows,
    }
    print(mb.format_table(result))
    if not args.no_save:
        paths = write_result(result, args.out_dir or default_out_dir(), args.name)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def _unavailable():
    from .ops import dispatch

    return {n: per_op for n, per_op in dispatch.availability().items() if per_op["conv_bn_relu"]}


if __name__ == "__main__":
    sys.exit(main())
