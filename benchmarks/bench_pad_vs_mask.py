"""Mask or pad: the Triton res2net_chain at Res2Net's real split widths (26w: 26/52/104/208 channels, masked in the
kernels) against the same chain with each split padded to a multiple of 16 channels (what a padded layout would
run: zero weights in the pad, the useful output unchanged), per stage, one run.

    python benchmarks/bench_pad_vs_mask.py                    # GPU: batch 256, bfloat16, 224x224 stage sizes
    TRITON_INTERPRET=1 python benchmarks/bench_pad_vs_mask.py --device cpu --batch 1 --size 32 --dtype float32
                                                              # a smoke run of the same code on the CPU

``padded / masked`` below 1 means padding would be faster (the kernels mask today). The padded row is an upper
bound on the gain: a real padded layout also pays for conv1 writing, and conv3 reading, the padded channels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from resfast import ops
from resfast._bench.env import metadata
from resfast._bench.results import write_result
from resfast._bench.timing import time_fn

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# res2net50_26w_4s: (stage, split width, input size / stage size divisor); 'normal' blocks at stride 1
STAGES = [(1, 26, 4), (2, 52, 8), (3, 104, 16), (4, 208, 32)]


def _chain_call(width, scale, batch, hw, device, dtype):
    x = torch.randn(batch, width * scale, hw, hw, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    ws = [torch.randn(width, width, 3, 3, device=device, dtype=dtype) * 0.05 for _ in range(scale - 1)]
    bns = [ops.BatchNormParams(torch.rand(width, device=device, dtype=dtype) + 0.5,
                               torch.randn(width, device=device, dtype=dtype) * 0.1,
                               torch.zeros(width, device=device, dtype=dtype),
                               torch.ones(width, device=device, dtype=dtype)) for _ in range(scale - 1)]

    def call():
        with torch.no_grad(), ops.backend("triton"):
            return ops.res2net_chain(x, ws, bns, scale=scale)
    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    rows = []
    for stage, width, div in STAGES:
        hw = max(1, args.size // div)
        padded = -(-width // 16) * 16
        times = {}
        for kind, wd in (("masked", width), ("padded", padded)):
            call = _chain_call(wd, args.scale, args.batch, hw, device, dtype)
            call()  # warm-up (autotuning)
            times[kind] = time_fn(call, device)["median_ms"]
        rows.append({"kind": "pad_vs_mask", "stage": stage, "width": width, "padded_width": padded, "hw": hw,
                     "batch": args.batch, "dtype": args.dtype, "masked_ms": times["masked"],
                     "padded_ms": times["padded"], "padded_over_masked": times["padded"] / times["masked"]})
        print(f"stage {stage}: width {width:>3} masked {times['masked']:8.3f} ms | padded to {padded:>3} "
              f"{times['padded']:8.3f} ms | padded/masked {times['padded'] / times['masked']:.2f}")
    result = {"kind": "pad_vs_mask",
              **metadata(device, ["python benchmarks/bench_pad_vs_mask.py"] + (sys.argv[1:] if argv is None
                                                                               else list(argv))),
              "config": vars(args) | {"out_dir": str(args.out_dir)}, "rows": rows}
    paths = write_result(result, args.out_dir, args.name, plot=False)
    print("wrote " + ", ".join(str(q) for q in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
