"""``python -m resfast.info``: versions, the extension's build, and what each backend can run here and why not.

``python -m resfast.info --model res2net50_26w_4s resnet50 --size 224``: parameters, weight MB and GMACs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys

import torch


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    try:
        import triton

        return triton.__version__
    except Exception as e:  # a broken triton install should not break info
        return f"import failed ({type(e).__name__}: {e})"


def report() -> str:
    from . import __version__, _ext
    from .ops import dispatch

    lines = [
        f"resfast      {__version__}",
        f"python       {platform.python_version()} ({sys.executable})",
        f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, cuDNN: "
        f"{torch.backends.cudnn.version() if torch.version.cuda else 'n/a'})",
        f"triton       {_triton_version()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}       {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda device  none visible (torch.cuda.is_available() is False)")
    lines.append("")
    if _ext.C is None:
        lines.append(f"resfast._C   not loaded: {_ext.C_ERROR}")
    else:
        info = _ext.build_info()
        lines.append(f"resfast._C   loaded from {_ext.C.__file__}")
        lines.append(f"  build      {json.dumps(info, sort_keys=True)}")
        lines.append(f"  cpu ISA    {_ext.C.cpu_kernel_isa()} (the CPU training kernels' copy in use; "
                     "RESFAST_CPU_ISA=baseline forces the baseline one)")
        ops = sorted(n for n in dir(torch.ops.resfast) if not n.startswith("_") and n not in ("name", "ops"))
        for op in ops:
            keys = [k for k in ("CPU", "CUDA", "Meta", "Autograd")
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"resfast::{op}", k)]
            lines.append(f"  op         resfast::{op}: kernels for {', '.join(keys)}")
    lines.append("")
    lines.append(f"backend in force: {dispatch.get_backend()} (RESFAST_BACKEND, resfast.set_backend, resfast.backend)")
    availability = dispatch.availability()
    blocks = dispatch.availability(dispatch.BLOCK_OPS)
    for name in availability:  # each backend's ops, then its whole-block ops (without one, blocks run per op)
        per_op = {**availability[name], **blocks[name]}
        runnable = [op for op, reasons in per_op.items() if not reasons]
        explicit = [op for op, reasons in per_op.items() if reasons and all(r.startswith("auto: ") for r in reasons)]
        status = "can run " + ", ".join(runnable) if runnable else "cannot run here"
        if explicit:
            status = ("can run " + ", ".join(explicit) + " when selected explicitly"
                      + ("; " + status if runnable else ""))
        lines.append(f"  {name:<7} {status}")
        for op, reasons in per_op.items():
            for r in reasons:
                lines.append(f"           - {op}: {r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resfast.info", description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", metavar="NAME", help="summarise these models (see resfast.models.BUILDERS)")
    p.add_argument("--size", type=int, default=224, help="input height/width for GMACs (default 224)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the builder's)")
    args = p.parse_args(argv)
    if not args.model:
        print(report())
        return 0
    from .models import get_model
    from .summary import format_summaries, summarize

    rows = []
    for name in args.model:
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        try:
            model = get_model(name, **kwargs)
        except ValueError as e:
            p.error(str(e))
        rows.append(summarize(model, (3, args.size, args.size), name))
    print(format_summaries(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
