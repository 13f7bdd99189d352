"""Conv gradients: the Triton implicit-GEMM dgrad/wgrad kernels (resfast/backends/triton/kernels/conv_grad.py)
against ATen's convolution_backward (cuDNN), at every distinct convolution of res2net50_26w_4s, resnext50_32x4d and
resnetv2_50 in a training step, one run, interleaved per shape.

    python benchmarks/bench_conv_backward.py          # GPU: batch 128, bfloat16, channels_last, 224x224
    TRITON_INTERPRET=1 python benchmarks/bench_conv_backward.py --device cpu --batch 1 --size 32 --dtype float32 \\
        --models resnext50_32x4d --limit 3            # a smoke run of the same code on the CPU

Per conv: the time of (dx, dweight) both ways, and of each alone; the error of each against a float32 ATen
reference (TF32 off), and how often the step runs the conv. Per model: the conv-gradient time of one step each
way, and with the faster one per shape (what a per-shape choice would give). The first conv (the stem: its input
is the image) needs no dx. This decides RESFAST_CONV_BACKWARD's default (conv_grad.py): ATen until the Triton
kernels measure faster.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

from resfast._bench.env import metadata
from resfast._bench.models import eager_model, progress
from resfast._bench.results import write_result
from resfast._bench.timing import time_fn
from resfast.backends.triton.kernels import conv_grad

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODELS = ("res2net50_26w_4s", "resnext50_32x4d", "resnetv2_50")


def conv_shapes(name: str, batch: int, size: int) -> collections.Counter:
    """(input shape, C_out, kernel, stride, padding, dilation, groups) -> how often one forward runs it."""
    with torch.device("meta"):
        model = eager_model(name).eval()  # the same convs as training (eval: a batch of 1 is fine)
    shapes: collections.Counter = collections.Counter()

    def hook(mod, inp, out):
        shapes[(tuple(inp[0].shape), mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                mod.groups)] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(batch, 3, size, size, device="meta"))
    return shapes


def _inputs(shape, device, dtype):
    xs, co, k, s, p, d, g = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(co, xs[1] // g, *k, generator=gen) * 0.05).to(device, dtype)
    ho = (xs[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (xs[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    dy = torch.randn(xs[0], co, ho, wo, generator=gen).to(device, dtype).contiguous(
        memory_format=torch.channels_last)
    return x, w, dy


def _rel_err(a, ref) -> float:
    return ((a.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure(shape, device, dtype) -> dict:
    xs, co, k, s, p, d, g = shape
    x, w, dy = _inputs(shape, device, dtype)
    need_dx = xs[1] != 3  # the stem's input is the image
    s, p, d = list(s), list(p), list(d)

    def aten(mask):
        return lambda: torch.ops.aten.convolution_backward(dy, x, w, None, s, p, d, False, [0, 0], g, mask)

    fns = {
        "aten": aten([need_dx, True, False]),
        "triton": lambda: (conv_grad.conv_dgrad(dy, x.shape, w, s, p, d, g) if need_dx else None,
                           conv_grad.conv_wgrad(dy, x, w.shape, s, p, d, g)),
        "aten_wgrad": aten([False, True, False]),
        "triton_wgrad": lambda: conv_grad.conv_wgrad(dy, x, w.shape, s, p, d, g),
    }
    if need_dx:
        fns["aten_dgrad"] = aten([True, False, False])
        fns["triton_dgrad"] = lambda: conv_grad.conv_dgrad(dy, x.shape, w, s, p, d, g)
    row = dict(x=list(xs), c_out=co, k=k[0], stride=s[0], padding=p[0], dilation=d[0], groups=g, dx=need_dx)
    for f in fns.values():  # compile and autotune before timing
        f()
    for name in fns:
        row[f"{name}_ms"] = time_fn(fns[name], device)["median_ms"]
    row["triton_over_aten"] = row["aten_ms"] / row["triton_ms"]
    # accuracy against float32 ATen with TF32 off
    allow = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = torch.ops.aten.convolution_backward(dy.float(), x.float(), w.float(), None, s, p, d, False, [0, 0], g,
                                                  [need_dx, True, False])
    finally:
        torch.backends.cudnn.allow_tf32 = allow
    a, t = fns["aten"](), fns["triton"]()
    if need_dx:
        row["err_dx_aten"], row["err_dx_triton"] = _rel_err(a[0], ref[0]), _rel_err(t[0], ref[0])
    row["err_dw_aten"], row["err_dw_triton"] = _rel_err(a[1], ref[1]), _rel_err(t[1], ref[1])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="only the first N distinct convs per model (smoke runs)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    plan = []
    for m in args.models:
        shapes = list(conv_shapes(m, args.batch, args.size).items())[:args.limit]
        plan += [(m, shape, n) for shape, n in shapes]
    bar = progress(len(plan), "convs")
    rows, totals = [], {}
    for m, shape, n in plan:
        row = dict(model=m, n=n, **measure(shape, device, dtype))
        rows.append(row)
        t = totals.setdefault(m, dict(aten_ms=0.0, triton_ms=0.0, best_ms=0.0, convs=0))
        t["aten_ms"] += n * row["aten_ms"]
        t["triton_ms"] += n * row["triton_ms"]
        t["best_ms"] += n * min(row["aten_ms"], row["triton_ms"])
        t["convs"] += n
        bar.update(1)
    bar.close()
    for t in totals.values():
        t["triton_over_aten"] = t["aten_ms"] / t["triton_ms"]
        t["best_over_aten"] = t["aten_ms"] / t["best_ms"]
    result = {"kind": "conv_backward",
              **metadata(device, ["python benchmarks/bench_conv_backward.py"] + (sys.argv[1:] if argv is None
                                                                                 else list(argv))),
              "config": dict(models=args.models, batch=args.batch, size=args.size, dtype=args.dtype,
                             channels_last=True, limit=args.limit),
              "totals": totals, "rows": rows}
    print(format_table(result))
    paths = write_result(result, args.out_dir, args.name, plot=False)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


def format_table(result: dict) -> str:
    lines = [f"{result['device']}, {result['config']['dtype']}, batch {result['config']['batch']}: conv gradients "
             "(dx + dweight) per distinct conv, median ms"]
    lines.append(f"{'model':18s} {'input':22s} {'co':>5s} {'k':>2s} {'s':>2s} {'g':>3s} {'n':>3s} {'aten':>8s} "
                 f"{'triton':>8s} {'a/t':>6s} {'dgrad a/t':>10s} {'wgrad a/t':>10s}")
    for r in result["rows"]:
        dg = f"{r['aten_dgrad_ms'] / r['triton_dgrad_ms']:10.2f}" if r["dx"] else f"{'-':>10s}"
        lines.append(f"{r['model']:18s} {str(tuple(r['x'])):22s} {r['c_out']:5d} {r['k']:2d} {r['stride']:2d} "
                     f"{r['groups']:3d} {r['n']:3d} {r['aten_ms']:8.3f} {r['triton_ms']:8.3f} "
                     f"{r['triton_over_aten']:6.2f} {dg} {r['aten_wgrad_ms'] / r['triton_wgrad_ms']:10.2f}")
    lines.append("per training step (all convs): aten ms, triton ms, aten/triton, aten/(faster per shape)")
    for m, t in result["totals"].items():
        lines.append(f"  {m:18s} {t['aten_ms']:9.2f} {t['triton_ms']:9.2f} {t['triton_over_aten']:6.2f} "
                     f"{t['best_over_aten']:6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
