"""Small resfast blocks through the Triton and the CUDA backends, small odd shapes, eval and one training step
(forward + backward): the workload `scripts/gpu_check.sh` runs under `compute-sanitizer --tool memcheck`
(out-of-bounds or misaligned accesses show up as sanitizer errors; the exit code is non-zero on any). It also
suits `--tool racecheck` (shared-memory races).

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_blocks.py
    python scripts/sanitize_blocks.py --backends triton --blocks "res2net normal"
    python scripts/sanitize_blocks.py --dry-run     # CPU: interpreter, float32, widths / 4, cuda -> cpu stand-in
"""

import argparse
import copy
import os
import sys

BLOCKS = ("res2net stage", "res2net normal", "res2next", "resnext", "preact")


def make_blocks(div: int = 1):
    """The blocks at stage-1 widths (64 in, 256 out), every width divided by `div` (the dry run's 4)."""
    from timm.models import res2net as timm_res2net
    from torch import nn
    from torchvision.models import resnet as tv_resnet

    from resfast.nn import PreActBottleneck

    c, p = 256 // div, 64 // div
    ds = nn.Sequential(nn.Conv2d(p, c, 1, 2, bias=False), nn.BatchNorm2d(c))
    return {
        "res2net stage": timm_res2net.Bottle2neck(p, p, 2, ds, norm_layer=nn.BatchNorm2d),
        "res2net normal": timm_res2net.Bottle2neck(c, p, norm_layer=nn.BatchNorm2d),
        "res2next": timm_res2net.Bottle2neck(c, p, cardinality=8 // div, base_width=4, norm_layer=nn.BatchNorm2d),
        "resnext": tv_resnet.Bottleneck(c, p, groups=32 // div, base_width=4),
        "preact": PreActBottleneck(c, p),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    p.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=BLOCKS)
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: CPU tensors, float32, Triton interpreter; the cuda backend's blocks run on the cpu "
                        "backend (the same C++ op glue) as a stand-in")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import resfast

    dev, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    hw = (7, 5) if args.dry_run else (15, 13)
    blocks = make_blocks(4 if args.dry_run else 1)
    bad = 0
    for backend in args.backends:
        run_on = "cpu" if args.dry_run and backend == "cuda" else backend
        for name in args.blocks:
            fused = resfast.convert(copy.deepcopy(blocks[name])).to(dev, dtype)
            for cl in (True,) if args.dry_run else (True, False):
                x = torch.randn(2, fused.conv1.in_channels, *hw, device=dev, dtype=dtype)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                with torch.no_grad(), resfast.backend(run_on):
                    y = fused.eval()(x)
                with resfast.backend(run_on):
                    xt = x.clone().requires_grad_()
                    yt = fused.train()(xt)
                    yt.float().square().mean().backward()
                if dev == "cuda":
                    torch.cuda.synchronize()
                ok = all(torch.isfinite(t).all() for t in (y, yt, xt.grad))
                bad += not ok
                print(backend if run_on == backend else f"{backend} (stand-in: {run_on})", name,
                      "channels_last" if cl else "nchw", tuple(y.shape), "finite" if ok else "NOT FINITE",
                      flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
