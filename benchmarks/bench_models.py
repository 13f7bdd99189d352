"""Per-model benchmark: images/s for inference and for a full training step, and peak memory, of resnet50,
res2net50_26w_4s, res2net50_14w_8s, res2next50, resnext50_32x4d and resnetv2_50: resfast vs eager vs
torch.compile (default and max-autotune), in one run.

    python benchmarks/bench_models.py            # every model, infer + train, every provider
    python benchmarks/bench_models.py --quick    # fewer iterations; any option of `python -m resfast.bench`

The same runner as ``python -m resfast.bench`` with this suite's defaults.
"""

import sys
from pathlib import Path

from resfast import bench
from resfast._bench.models import MODELS, PROVIDERS

if __name__ == "__main__":
    argv = sys.argv[1:]
    defaults = []
    if not any(a in ("--mode",) for a in argv):
        defaults += ["--mode", "infer", "train"]
    if not any(a in ("--providers", "--backends") for a in argv):
        defaults += ["--providers", *PROVIDERS]
    if not any(a.startswith("--out-dir") for a in argv):
        defaults += ["--out-dir", str(Path(__file__).resolve().parent / "results")]
    sys.exit(bench.main(defaults + argv, prog="python benchmarks/bench_models.py", models_default=tuple(MODELS)))
