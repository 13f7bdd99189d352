"""The CPU inference gap, convolution by convolution: every conv of a timm model's eval forward (batch 8, 224x224,
fp32, channels_last, 2 threads), timed in isolation three ways, interleaved, medians of 9:

* ``aten``: F.conv2d (ATen's mkldnn_convolution: what eager and inductor's default compile run);
* ``pw_plain``: mkldnn::_convolution_pointwise with the plain weight;
* ``pw_packed``: the same with the weight prepacked by mkldnn::_reorder_convolution_weight (resfast's cpu backend).

Prints one row per distinct conv (with how often the forward runs it) and the totals per forward; writes
``results/cpu_gap/convs_<model>.json``. Usage: ``python benchmarks/cpu_conv_breakdown.py [model]``.
"""

import collections
import json
import os
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_gap")


def conv_shapes(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    shapes = collections.Counter()

    def hook(mod, inp, out):
        shapes[(tuple(inp[0].shape), mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                mod.groups)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def time_conv(xs, co, k, s, p, d, g) -> dict:
    x = torch.randn(xs).contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, xs[1] // g, *k) * 0.1
    b = torch.randn(co)
    wp = torch.ops.mkldnn._reorder_convolution_weight(w, list(p), list(s), list(d), g, list(xs))
    pw = torch.ops.mkldnn._convolution_pointwise
    fns = {"aten": lambda: F.conv2d(x, w, b, s, p, d, g),
           "pw_plain": lambda: pw(x, w, b, list(p), list(s), list(d), g, "none", [], ""),
           "pw_packed": lambda: pw(x, wp, b, list(p), list(s), list(d), g, "none", [], "")}
    for f in fns.values():
        f()
        f()
    ts = {name: [] for name in fns}
    for r in range(9):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in ts.items()}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "res2net50_26w_4s"
    torch.set_num_threads(2)
    model = timm.create_model(name).eval().to(memory_format=torch.channels_last)
    shapes = conv_shapes(model, torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    total, rows = collections.Counter(), []
    with torch.no_grad():
        for (xs, co, k, s, p, d, g), n in sorted(shapes.items(), key=lambda t: -t[1]):
            med = time_conv(xs, co, k, s, p, d, g)
            for key, v in med.items():
                total[key] += v * n
            rows.append(dict(x=xs, co=co, k=k, s=s, g=g, n=n, **{key: round(v, 3) for key, v in med.items()}))
            print(f"{str(xs):22s} co={co:5d} k={k[0]} s={s[0]} g={g:3d} n={n:2d}  "
                  + "  ".join(f"{key}={v:7.3f}" for key, v in med.items()), flush=True)
    print("total ms per forward:", {key: round(v, 1) for key, v in total.items()})
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"convs_{name}.json"), "w") as f:
        json.dump(dict(model=name, torch=torch.__version__, threads=2, batch=8, date=time.strftime("%Y-%m-%d %H:%M"),
                       rows=rows, total=dict(total)), f, indent=1)


if __name__ == "__main__":
    main()
