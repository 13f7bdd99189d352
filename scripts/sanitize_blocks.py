"""One block of each kind through the Triton and the CUDA backends, small odd shapes, eval and one training step
(forward + backward): the workload that `scripts/gpu_check.sh` runs under `compute-sanitizer --tool memcheck` and
`--tool racecheck` (out-of-bounds or misaligned accesses and shared-memory races in the kernels show up as
sanitizer errors; the exit code is non-zero on any)."""

import copy

import torch
from timm.models import res2net as timm_res2net
from torch import nn
from torchvision.models import resnet as tv_resnet

import resfast
from resfast.nn import PreActBottleneck


def main() -> None:
    dev = "cuda"
    ds = nn.Sequential(nn.Conv2d(64, 256, 1, 2, bias=False), nn.BatchNorm2d(256))
    blocks = {
        "res2net stage": timm_res2net.Bottle2neck(64, 64, 2, ds, norm_layer=nn.BatchNorm2d),
        "res2net normal": timm_res2net.Bottle2neck(256, 64, norm_layer=nn.BatchNorm2d),
        "res2next": timm_res2net.Bottle2neck(256, 64, cardinality=8, base_width=4, norm_layer=nn.BatchNorm2d),
        "resnext": tv_resnet.Bottleneck(256, 64, groups=32, base_width=4),
        "preact": PreActBottleneck(256, 64),
    }
    for backend in ("triton", "cuda"):
        for name, block in blocks.items():
            fused = resfast.convert(copy.deepcopy(block)).to(dev, torch.bfloat16)
            for cl in (True, False):
                x = torch.randn(2, fused.conv1.in_channels, 15, 13, device=dev, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last) if cl else x
                with torch.no_grad(), resfast.backend(backend):
                    y = fused.eval()(x)
                with resfast.backend(backend):
                    xt = x.clone().requires_grad_()
                    yt = fused.train()(xt)
                    yt.float().square().mean().backward()
                torch.cuda.synchronize()
                ok = all(torch.isfinite(t).all() for t in (y, yt, xt.grad))
                print(backend, name, "channels_last" if cl else "nchw", tuple(y.shape),
                      "finite" if ok else "NOT FINITE")


if __name__ == "__main__":
    main()
