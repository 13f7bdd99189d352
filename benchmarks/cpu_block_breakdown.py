"""The CPU inference gap, block by block: a timm model's eval forward (batch 8, 224x224, fp32, channels_last, 2
threads) timed per top-level piece (stem, each residual block, head) inside whole forwards, for

* ``eager``: the timm model;
* ``resfast``: ``resfast.convert`` of it on the ``cpu`` backend (what ``python -m resfast.bench`` times);
* ``compile``: the timm model with each piece compiled on its own by ``torch.compile`` (inductor), so its time
  splits the same way; the whole-model compile's forward is timed too, to show the per-piece compile is the same
  program.

Whole forwards of the providers alternate (6 rounds after warm-up), per-piece times come from forward pre/post
hooks (``time.perf_counter``; the CPU runs synchronously) and are medians over the rounds. Prints one row per
piece and writes ``results/cpu_gap/blocks_<model>.json``. Usage: ``python benchmarks/cpu_block_breakdown.py
[model]``.
"""

import copy
import json
import os
import resource
import statistics
import sys
import time

import timm
import torch

import resfast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_gap")


def pieces(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The stem's modules, every residual block, the head's modules, in forward order (timm ResNet layout)."""
    out = []
    for name, child in model.named_children():
        if name.startswith("layer") or name == "stages":
            for i, blk in enumerate(child.children()):
                sub = list(blk.children()) if name == "stages" and hasattr(blk, "blocks") else None
                if sub is not None:  # ResNetV2 stage: (downsample,) blocks
                    out += [(f"{name}.{i}.blocks.{j}", b) for j, b in enumerate(blk.blocks.children())]
                else:
                    out.append((f"{name}.{i}", blk))
        else:
            out.append((name, child))
    return out


class Timer:
    def __init__(self, model):
        self.times: dict[str, list[float]] = {}
        self.start: dict[str, float] = {}
        self.handles = []
        for name, mod in pieces(model):
            self.times[name] = []
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: self.start.__setitem__(
                n, time.perf_counter())))
            self.handles.append(mod.register_forward_hook(lambda m, a, o, n=name: self.times[n].append(
                time.perf_counter() - self.start[n])))


def isolated_conv_ms(model: torch.nn.Module, x: torch.Tensor, name: str) -> dict[str, dict[str, float]]:
    """Per piece, the summed isolated times of its convolutions from cpu_conv_breakdown.py's result (run it first):
    ``aten`` (F.conv2d, what eager and inductor call) and ``pw_packed`` (resfast's prepacked oneDNN calls)."""
    path = os.path.join(OUT, f"convs_{name}.json")
    if not os.path.exists(path):
        return {}
    table = {(tuple(r["x"]), r["co"], tuple(r["k"]), tuple(r["s"]), r["g"]): r for r in json.load(open(path))["rows"]}
    sums: dict[str, dict[str, float]] = {}
    handles = []
    for pname, mod in pieces(model):
        sums[pname] = {"aten": 0.0, "pw_packed": 0.0}
        for conv in (m for m in mod.modules() if isinstance(m, torch.nn.Conv2d)):
            def hook(m, inp, out, pname=pname):
                r = table[(tuple(inp[0].shape), m.out_channels, m.kernel_size, m.stride, m.groups)]
                for k in ("aten", "pw_packed"):
                    sums[pname][k] += r[k]
            handles.append(conv.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sums


def compiled_per_piece(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose every piece's forward is torch.compile'd on its own (the hooks stay on the module)."""
    m = copy.deepcopy(model)
    for _, mod in pieces(m):
        mod.forward = torch.compile(mod.forward)
    return m


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "res2net50_26w_4s"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = timm.create_model(name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    iso = isolated_conv_ms(base, x, name)
    models = {"eager": base, "resfast": resfast.convert(copy.deepcopy(base)), "compile": compiled_per_piece(base)}
    whole = torch.compile(copy.deepcopy(base))
    timers = {k: Timer(m) for k, m in models.items()}
    totals = {k: [] for k in list(models) + ["compile_whole"]}
    faults = {k: [] for k in totals}
    fns = {**models, "compile_whole": whole}
    with torch.no_grad(), resfast.backend("cpu"):
        for f in fns.values():  # compile, pack weights, warm up
            f(x)
            f(x)
        for t in timers.values():
            for v in t.times.values():
                v.clear()
        for r in range(6):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                fns[k](x)
                totals[k].append(time.perf_counter() - t0)
                faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    med = {k: {n: statistics.median(v) * 1e3 for n, v in t.times.items()} for k, t in timers.items()}
    rows = []
    # beyond: a piece's in-model time minus its convolutions' isolated time (resfast: prepacked oneDNN; compile and
    # eager: F.conv2d), i.e. what the piece spends outside its convolutions, or the convolutions lose in the model
    print(f"{'piece':22s} " + " ".join(f"{k:>9s}" for k in med) + f" {'iso pw':>8s} {'iso aten':>8s}"
          + f" {'resfast beyond':>14s} {'compile beyond':>14s}")
    for n in med["eager"]:
        row = {"piece": n, **{k: round(med[k][n], 3) for k in med}}
        if iso:
            row.update(iso_pw_packed=round(iso[n]["pw_packed"], 3), iso_aten=round(iso[n]["aten"], 3))
        rows.append(row)
        extra = (f" {iso[n]['pw_packed']:8.2f} {iso[n]['aten']:8.2f} {med['resfast'][n] - iso[n]['pw_packed']:14.2f}"
                 f" {med['compile'][n] - iso[n]['aten']:14.2f}") if iso else ""
        print(f"{n:22s} " + " ".join(f"{med[k][n]:9.2f}" for k in med) + extra)
    sums = {k: round(sum(v.values()), 1) for k, v in med.items()}
    whole_ms = {k: round(statistics.median(v) * 1e3, 1) for k, v in totals.items()}
    print("sum of pieces ms:", sums)
    if iso:
        iso_tot = {k: round(sum(v[k] for v in iso.values()), 1) for k in ("aten", "pw_packed")}
        print("isolated convs ms:", iso_tot)
    fault_med = {k: statistics.median(v) for k, v in faults.items()}
    print("whole forward ms (median of 6):", whole_ms)
    print("minor page faults per forward (median):", fault_med)
    os.makedirs(OUT, exist_ok=True)
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    with open(os.path.join(OUT, f"blocks_{name}{'_glibc-tunables' if tunables else ''}.json"), "w") as f:
        json.dump(dict(model=name, torch=torch.__version__, threads=2, batch=8, date=time.strftime("%Y-%m-%d %H:%M"),
                       command=" ".join(["python benchmarks/cpu_block_breakdown.py"] + sys.argv[1:]), rows=rows,
                       glibc_tunables=tunables, sum_of_pieces_ms=sums, whole_forward_ms=whole_ms,
                       minor_faults_per_forward=fault_med,
                       isolated_convs_ms=iso_tot if iso else None), f, indent=1)


if __name__ == "__main__":
    main()
