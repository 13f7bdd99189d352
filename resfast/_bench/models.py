"""Per-model benchmark: images/s for inference and for a full training step, and peak memory, for resfast vs
eager vs torch.compile, measured in one run with interleaved iterations.

Eager models are timm's / torchvision's (random weights); ``resfast`` is ``resfast.convert`` of the same object
(same weights; its outputs are checked against eager first); ``compile`` / ``compile-max-autotune`` are
``torch.compile`` of the eager model.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import statistics
import sys
import tempfile
import time

import torch

from .timing import quantile

MODELS = {
    "resnet50": ("torchvision", "resnet50"),
    "res2net50_26w_4s": ("timm", "res2net50_26w_4s"),
    "res2net50_14w_8s": ("timm", "res2net50_14w_8s"),
    "res2next50": ("timm", "res2next50"),
    "resnext50_32x4d": ("torchvision", "resnext50_32x4d"),
    "resnetv2_50": ("timm", "resnetv2_50"),
}
# resfast-triton / resfast-cuda / resfast-cpu: resfast with the Triton / C++-CUDA / C++-CPU backend selected
# explicitly, whatever auto would pick (auto does not pick the GPU backends until they have been verified on a GPU,
# nor the CPU one where it was measured slower than eager), so a run measures them either way
PROVIDERS = ("eager", "resfast", "resfast-triton", "resfast-cuda", "resfast-cpu", "compile", "compile-max-autotune")
EXPLICIT = {"resfast-triton": "triton", "resfast-cuda": "cuda", "resfast-cpu": "cpu"}
MODES = ("infer", "train")
RESFAST_BLOCKS = ("BasicBlock", "Bottleneck", "Bottle2neck", "Res2NetBottleneck", "Res2Block", "ResBlock",
                  "PreActBasicBlock", "PreActBottleneck", "TimmPreActBottleneck", "TimmPreActBasic", "TimmBasicBlock",
                  "TimmBottleneck")


def eager_model(name: str) -> torch.nn.Module:
    lib, fn = MODELS[name]
    if lib == "timm":
        import timm

        return timm.create_model(fn, pretrained=False)
    import torchvision

    return getattr(torchvision.models, fn)(weights=None)


def count_blocks(model) -> tuple[int, int]:
    """(resfast blocks, all residual blocks) in a model."""
    blocks = [m for m in model.modules()
              if any(k in type(m).__name__ for k in ("Block", "neck")) or type(m).__name__.endswith("PreActBasic")]
    ours = [m for m in blocks if type(m).__module__.startswith("resfast.")]
    return len(ours), len(blocks)


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # tqdm is optional: a plain counter instead

        class _Plain:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def close(self):
                print(file=sys.stderr)

        return _Plain()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device, warmup: int, iters: int, desc: str, rounds: int = 2) -> dict:
    """Seconds per call of each fn, measured in interleaved blocks: in each of `rounds` rounds every provider
    runs one warm-up call and then a block of consecutive timed calls, the providers' order alternating between
    rounds (a b c, c b a, ...). Blocks keep providers from disturbing each other's timings (thread pools, caches
    of a different model: measured to spread CPU timings by up to 2x when single calls were interleaved); the
    alternating order spreads machine drift evenly over all providers."""
    per_block = max(1, -(-iters // rounds))
    bar = progress(rounds * (per_block + 1) * len(fns) + warmup * len(fns), desc)
    times = {k: [] for k in fns}
    for fn in fns.values():  # initial warm-up (compilation, allocator) once per provider
        for _ in range(warmup):
            fn()
            bar.update(1)
    _sync(device)
    for rnd in range(rounds):
        order = list(fns.items())
        if rnd % 2:
            order.reverse()
        for k, fn in order:
            fn()
            _sync(device)
            bar.update(1)
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
                bar.update(1)
    bar.close()
    return times


def _make_step(model, x, mode: str, amp_dtype, backend=None):
    """One inference call or one training step (forward, cross-entropy, backward, SGD); under ``backend`` (a resfast
    backend name) when given."""
    step = _plain_step(model, x, mode, amp_dtype)
    if backend is None:
        return step
    import resfast

    def with_backend():
        with resfast.backend(backend):
            return step()
    return with_backend


def _plain_step(model, x, mode: str, amp_dtype):
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast(x.device.type, amp_dtype, enabled=amp_dtype is not None):
                return model(x)
        return step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step():
        with torch.autocast(x.device.type, amp_dtype, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def _peak_mem_mb(step, device):
    """Peak bytes allocated during one step above what was allocated before it, in MiB: CUDA's caching-allocator
    statistics, or on the CPU the running total that c10's CPU allocator reports to the profiler (every allocation,
    those inside C++ ops included). None on other devices."""
    if device.type == "cpu":
        return _cpu_peak_mem_mb(step)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# kineto's C++ logger (torch's profiler backend) writes "<LEVEL>:<date> <pid>:<tid> <file>:<line>] <message>" lines
# straight to file descriptor 2: on every start and stop "USDT:... profiler_start" / "profiler_stop", and on a
# machine without a GPU, once, "ERROR:... gpuGetDeviceCount failed with code 35" (CUDA build, no driver), even with
# CPU activities only. KINETO_LOG_LEVEL would hide them only if set before the process's first profiler use.
_KINETO_LINE = re.compile(r"^(VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ ")


def _is_kineto_chatter(line: str) -> bool:
    """kineto's informational lines, and its error that there is no GPU on a machine that has none; any other
    kineto error is not chatter."""
    m = _KINETO_LINE.match(line)
    if m is None:
        return False
    if m.group(1) != "ERROR":
        return True
    return "gpuGetDeviceCount failed" in line and not torch.cuda.is_available()


@contextlib.contextmanager
def _kineto_chatter_dropped():
    """Runs the block with file descriptor 2 sent to a temporary file, then writes every captured line that is not
    kineto's chatter back to stderr (so real errors still show)."""
    saved = None
    if sys.stderr is not None:  # None under pythonw: nothing shows anyway
        sys.stderr.flush()
        with contextlib.suppress(OSError):  # file descriptor 2 may be closed
            saved = os.dup(2)
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        try:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        tmp.seek(0)
        lines = tmp.read().decode(errors="replace").splitlines(keepends=True)
    kept = "".join(line for line in lines if not _is_kineto_chatter(line))
    if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def _cpu_peak_mem_mb(step):
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _kineto_chatter_dropped():  # kineto logs on start and stop only: the step's own output is left alone
        prof.__enter__()
    try:
        step()
    finally:
        with _kineto_chatter_dropped():
            prof.__exit__(None, None, None)
    allocs, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo += node.children
        f = node.extra_fields
        if type(f).__name__ == "_ExtraFields_Allocation" and f.device.type == "cpu":
            allocs.append((node.start_time_ns, f.alloc_size, f.total_allocated))
    if not allocs:
        return 0.0
    allocs.sort()
    base = allocs[0][2] - allocs[0][1]  # what was allocated before the step's first allocation
    return (max(total for _, _, total in allocs) - base) / 2**20


def run(models, modes, providers, batch, size, dtype, device, channels_last, warmup, iters) -> tuple[list, dict]:
    """Benchmark rows and the reasons providers were skipped."""
    import resfast

    param_dtype = torch.float32 if device.type == "cuda" and dtype != torch.float32 else dtype
    amp = dtype if param_dtype != dtype else None  # GPU half precision: AMP (autocast), as users train
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, dtype=param_dtype).contiguous(memory_format=fmt)
    backend = resfast.ops.dispatch.backend_for_input(x.to(dtype))
    rows, skipped = [], {}
    for mode in modes:
        steps, extra = {}, {}
        for name in models:
            base = eager_model(name).to(device=device, dtype=param_dtype, memory_format=fmt)
            for p in providers:
                if p == "eager":
                    m = base
                elif p == "resfast" or p in EXPLICIT:
                    m = resfast.convert(base)  # a converted copy
                else:
                    kw = {"mode": "max-autotune"} if p == "compile-max-autotune" else {}
                    m = torch.compile(copy.deepcopy(base), **kw)
                steps[(name, p)] = _make_step(m, x, mode, amp, EXPLICIT.get(p))
                ours, total = count_blocks(m) if p.startswith("resfast") else (0, count_blocks(base)[1])
                extra[(name, p)] = {"resfast_blocks": f"{ours}/{total}"}
            if mode == "infer":  # correctness first: every provider against eager
                ref = steps[(name, "eager")]().float() if "eager" in providers else None
                for p in providers:
                    out = steps[(name, p)]().float()
                    extra[(name, p)]["max_abs_diff_vs_eager"] = (out - ref).abs().max().item() if ref is not None \
                        else None
            for p in providers:  # warm-up (compiles) and peak memory, one provider at a time
                steps[(name, p)]()
                extra[(name, p)]["peak_mem_mb"] = _peak_mem_mb(steps[(name, p)], device)
        times = time_interleaved(steps, device, warmup, iters, f"timing {mode}")
        for (name, p), t in times.items():
            med = statistics.median(t)
            rows.append({
                "kind": "models", "model": name, "provider": p, "mode": mode, "batch": batch, "size": size,
                "dtype": str(dtype).replace("torch.", ""),
                "backend": {"resfast": backend, **EXPLICIT}.get(p, "pytorch"),
                "median_ms": med * 1e3, "p20_ms": quantile(t, 0.2) * 1e3, "p80_ms": quantile(t, 0.8) * 1e3,
                "images_per_s": batch / med, **extra[(name, p)],
            })
    by = {(r["model"], r["mode"], r["provider"]): r["images_per_s"] for r in rows}
    for r in rows:
        e = by.get((r["model"], r["mode"], "eager"))
        r["ratio_vs_eager"] = r["images_per_s"] / e if e else None
    if backend == "eager":
        skipped["resfast"] = "no fused backend runs here, so resfast ran its eager reference (see resfast.info)"
    return rows, skipped


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"device: {result['device']} | torch {result['versions']['torch']} | {c['dtype']} | batch {c['batch']} | "
        f"{c['size']}x{c['size']} | {'channels_last' if c['channels_last'] else 'NCHW'}",
        f"resfast ops ran on backend '{result['resfast_backend']}'",
    ]
    for name, reason in result.get("backends_not_used", {}).items():
        lines.append(f"  ({name} not used: {reason})")
    head = (f"{'model':<18} {'mode':<6} {'provider':<21} {'median ms':>10} {'images/s':>9} {'vs eager':>9} "
            f"{'peak MB':>8} {'max |diff|':>10} {'blocks':>7}")
    lines += ["", head, "-" * len(head)]
    for r in result["rows"]:
        diff = r.get("max_abs_diff_vs_eager")
        mem = r.get("peak_mem_mb")
        lines.append(
            f"{r['model']:<18} {r['mode']:<6} {r['provider']:<21} {r['median_ms']:>10.1f} {r['images_per_s']:>9.2f} "
            f"{r['ratio_vs_eager']:>8.2f}x {'' if mem is None else f'{mem:.0f}':>8} "
            f"{'' if diff is None else f'{diff:.1e}':>10} {r.get('resfast_blocks', ''):>7}")
    by = {(r["model"], r["mode"], r["provider"]): r["images_per_s"] for r in result["rows"]}
    for mode in c["modes"]:
        if ("res2net50_26w_4s", mode, "resfast") in by and ("resnet50", mode, "eager") in by:
            lines.append(f"\nres2net50_26w_4s through resfast vs resnet50 eager ({mode}): "
                         f"{by[('res2net50_26w_4s', mode, 'resfast')] / by[('resnet50', mode, 'eager')]:.2f}x")
    if result["resfast_backend"] == "eager":
        lines.append("note: no fused backend runs on this device yet, so resfast ran its eager reference: the same "
                     "PyTorch ops plus about 10 us of Python checks per op call. A ratio away from 1.0x for resfast "
                     "is that overhead or machine noise (p20/p80 are in the result file), not fusion.")
    if any(r["peak_mem_mb"] is None for r in result["rows"]):
        lines.append("peak memory is measured on CUDA (torch.cuda.max_memory_allocated) and CPU devices only.")
    return "\n".join(lines)
