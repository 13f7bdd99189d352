"""What every result records: device, driver, versions, git commit, the exact command and the date."""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip()
    except Exception:
        return ""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def driver_version() -> str:
    if not torch.cuda.is_available():
        return "n/a (no CUDA device)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def metadata(device: torch.device, argv=None) -> dict:
    import resfast

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "command": " ".join(argv if argv is not None else [Path(sys.argv[0]).name] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "driver": driver_version(),
        "versions": {
            "resfast": resfast.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git_commit": commit + ("-dirty" if dirty else ""),
        },
    }
