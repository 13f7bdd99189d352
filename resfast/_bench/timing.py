"""Timing: medians and 20/80 quantiles in milliseconds.

GPU: ``triton.testing.do_bench`` (flushes L2 between runs, CUDA events). CPU: ``torch.utils.benchmark.Timer``
with ``blocked_autorange`` (each measurement is a block of runs; quantiles over the blocks).
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def quantile(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> dict:
    """{'median_ms', 'p20_ms', 'p80_ms'} of one call of `fn` on `device`."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80, "timer": "triton.testing.do_bench"}
        except ImportError:
            pass
        return _cuda_events(fn)
    from torch.utils.benchmark import Timer

    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = [t * 1e3 for t in m.times]
    return {"median_ms": statistics.median(times), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8),
            "timer": "torch.utils.benchmark"}


def _cuda_events(fn, reps: int = 50) -> dict:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return {"median_ms": statistics.median(times), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8),
            "timer": "cuda events"}


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time): the memory-bound ceiling."""
    n = nbytes // 4
    if device.type == "cpu":
        n = min(n, 64 * 2**20 // 4)
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9
