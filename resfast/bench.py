"""``python -m resfast.bench``: images/s of Res2Net-50 and ResNet-50, through resfast and through plain eager
PyTorch, on whatever device is present, measured in one run.

The eager models are timm's res2net50_26w_4s and torchvision's resnet50 (random weights); the resfast models
are the same objects after ``resfast.convert`` (same weights), whose outputs are checked against eager first.
Inference, eval mode, channels_last by default. Medians over timed iterations after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    "res2net50_26w_4s": ("timm", "res2net50_26w_4s"),
    "res2net50_14w_8s": ("timm", "res2net50_14w_8s"),
    "res2next50": ("timm", "res2next50"),
    "resnet50": ("torchvision", "resnet50"),
    "resnext50_32x4d": ("torchvision", "resnext50_32x4d"),
}


def _eager_model(name: str) -> torch.nn.Module:
    lib, fn = MODELS[name]
    if lib == "timm":
        import timm

        return timm.create_model(fn, pretrained=False)
    import torchvision

    return getattr(torchvision.models, fn)(weights=None)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # tqdm is optional: print a plain counter instead

        class _Plain:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def close(self):
                print(file=sys.stderr)

        return _Plain()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_models(models: dict, x, warmup: int, iters: int, desc: str) -> dict:
    """Seconds per forward pass of each model. Iterations are interleaved (a, b, b, a, ...) so that drift of the
    machine (clocks, other load) affects every model alike and the ratios stay fair."""
    bar = _progress((warmup + iters) * len(models), desc)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for i in range(warmup + iters):
            order = list(models.items())
            if i % 2:  # alternate who goes first: a model run right after another can find warm caches
                order.reverse()
            for k, model in order:
                _sync(x.device)
                t0 = time.perf_counter()
                model(x)
                _sync(x.device)
                if i >= warmup:
                    times[k].append(time.perf_counter() - t0)
                bar.update(1)
    bar.close()
    return times


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run(args) -> dict:
    import resfast
    from resfast.ops import dispatch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    # which backend resfast's ops take for these inputs (auto falls back silently; say where and why)
    probe = dispatch.get(dispatch.backend_for_input(x))
    skipped = {n: r for n, per_op in dispatch.availability().items() for r in per_op["conv_bn_relu"][:1]}
    timed, diffs = {}, {}
    for name in args.models:
        eager = _eager_model(name).to(device=device, dtype=dtype, memory_format=fmt).eval()
        fused = resfast.convert(eager).eval()
        with torch.inference_mode():
            ref, out = eager(x), fused(x)
        diffs[name] = (ref.float() - out.float()).abs().max().item()
        timed[(name, "eager")], timed[(name, "resfast")] = eager, fused
    # one interleaved loop over every model, so that machine drift cannot bias any ratio, across models included
    times = time_models(timed, x, args.warmup, args.iters, "timing")
    rows = []
    for (name, impl), t in times.items():
        med = statistics.median(t)
        rows.append({
            "model": name, "impl": impl, "backend": probe.name if impl == "resfast" else "pytorch",
            "median_ms": med * 1e3, "p20_ms": _q(t, 0.2) * 1e3, "p80_ms": _q(t, 0.8) * 1e3,
            "images_per_s": args.batch / med, "max_abs_diff_vs_eager": diffs[name] if impl == "resfast" else 0.0,
        })
    base = {r["model"]: r["images_per_s"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        r["ratio_vs_eager"] = r["images_per_s"] / base[r["model"]]
    return {
        "command": " ".join(["python -m resfast.bench"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "versions": {"resfast": resfast.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version(), "git_commit": _git_commit()},
        "config": {"batch": args.batch, "size": args.size, "dtype": args.dtype, "channels_last": args.channels_last,
                   "warmup": args.warmup, "iters": args.iters, "mode": "inference (eval)"},
        "resfast_backend": probe.name,
        "backends_not_used": skipped,
        "rows": rows,
    }


def _q(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"device: {result['device']} | torch {result['versions']['torch']} | {c['dtype']} | batch {c['batch']} | "
        f"{c['size']}x{c['size']} | {'channels_last' if c['channels_last'] else 'NCHW'} | {c['mode']}",
        f"resfast ops ran on backend '{result['resfast_backend']}'",
    ]
    for name, reason in result["backends_not_used"].items():
        lines.append(f"  ({name}: {reason})")
    head = f"{'model':<18} {'impl':<8} {'median ms':>10} {'images/s':>9} {'vs eager':>9} {'max |diff|':>11}"
    lines += ["", head, "-" * len(head)]
    for r in result["rows"]:
        diff = f"{r['max_abs_diff_vs_eager']:.1e}" if r["impl"] == "resfast" else ""
        lines.append(f"{r['model']:<18} {r['impl']:<8} {r['median_ms']:>10.1f} {r['images_per_s']:>9.2f} "
                     f"{r['ratio_vs_eager']:>8.2f}x {diff:>11}")
    by = {(r["model"], r["impl"]): r["images_per_s"] for r in result["rows"]}
    if ("res2net50_26w_4s", "resfast") in by and ("resnet50", "eager") in by:
        lines.append("")
        lines.append(f"res2net50_26w_4s through resfast vs resnet50 eager: "
                     f"{by[('res2net50_26w_4s', 'resfast')] / by[('resnet50', 'eager')]:.2f}x")
    if result["resfast_backend"] == "eager":
        lines.append("note: no fused backend runs on this device yet, so resfast ran its eager reference: the same "
                     "PyTorch ops plus about 10 us of Python checks per op call. A ratio away from 1.0x here is that "
                     "overhead or machine noise (see p20/p80 in --out), not fusion.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfast.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batch and size, few iterations (< 2 min on 2 CPU cores)")
    p.add_argument("--models", nargs="+", default=["res2net50_26w_4s", "resnet50"], choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--nchw", dest="channels_last", action="store_false",
                   help="contiguous NCHW instead of channels_last")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    defaults = {
        (False, False): dict(batch=8, size=224, iters=10, warmup=2, dtype="float32"),
        (False, True): dict(batch=2, size=160, iters=4, warmup=1, dtype="float32"),
        (True, False): dict(batch=256, size=224, iters=30, warmup=5, dtype="bfloat16"),
        (True, True): dict(batch=64, size=224, iters=10, warmup=3, dtype="bfloat16"),
    }[(gpu, args.quick)]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    result = run(args)
    print(format_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
