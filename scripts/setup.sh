#!/usr/bin/env bash
# Sets up everything resfast needs in a virtual environment (default .venv; RESFAST_VENV to change), then builds
# the C++/CUDA extension in place. Idempotent: a second run only checks, and rebuilds what changed.
#
# torch: the CUDA (cu130) build of torch 2.13.0 from the registry. Machines of this project carry a pip config
# whose find-links holds a CPU-only wheel of the same version, which pip would otherwise prefer; that one
# install bypasses the config (the whole config: its find-links and its local extra indexes, so torch and its
# CUDA wheels come from the registry). With the CUDA build, torchvision/timm import and .cu sources compile
# (no GPU needed to compile).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${RESFAST_VENV:-.venv}
PYTHON=${PYTHON:-python3}
# RESFAST_TORCH / RESFAST_TORCHVISION / RESFAST_TRITON pick other versions: the GPU machine's software is
# torch 2.11.0 (cu130), torchvision 0.26.0, triton 3.6.0 on Python 3.12 (`make setup-gpu-env`).
TORCH_VERSION=${RESFAST_TORCH:-2.13.0}
TORCHVISION_VERSION=${RESFAST_TORCHVISION:-0.28.0}
TRITON_SPEC=${RESFAST_TRITON:+==$RESFAST_TRITON}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== resfast setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The venv's tools first: torch builds with whichever `ninja` is on PATH, and a different ninja (the system's) reading
# the venv ninja's log would rebuild everything.
export PATH="$(cd "$VENV/bin" && pwd):$PATH"

has_cuda_torch() {
  "$PY" - "$TORCH_VERSION" <<'PYEOF' 2>/dev/null
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
PYEOF
}

if ! has_cuda_torch; then
  echo "== resfast setup: installing the CUDA build of torch $TORCH_VERSION (about 5 GB)"
  "$PY" -m pip uninstall -y torch >/dev/null 2>&1 || true
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --progress-bar off -q "torch==$TORCH_VERSION"
  has_cuda_torch || { echo "resfast setup: torch $TORCH_VERSION with CUDA did not install" >&2; exit 1; }
fi

echo "== resfast setup: test and build dependencies"
# (a pip config naming find-links folders this machine lacks makes pip warn once per package: those lines dropped)
"$PY" -m pip install --progress-bar off -q "torchvision==$TORCHVISION_VERSION" timm "triton$TRITON_SPEC" numpy pytest hypothesis \
  ninja pybind11 tqdm ruff matplotlib onnx onnxruntime onnxscript \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
has_cuda_torch || { echo "resfast setup: a dependency replaced the CUDA build of torch" >&2; exit 1; }

# the compiler command lines go to a log, printed (its end) only if the build fails
mkdir -p build
BUILD_LOG="build/setup-$(basename "$VENV" | sed "s/^\.//").log"
echo "== resfast setup: building resfast._C (MAX_JOBS=${MAX_JOBS:-2}; log: $BUILD_LOG)"
if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace > "$BUILD_LOG" 2>&1; then
  tail -n 60 "$BUILD_LOG" >&2
  echo "resfast setup: building resfast._C failed (the whole log: $BUILD_LOG)" >&2
  exit 1
fi
# Make the working tree importable from anywhere in the venv (what an editable install does), without
# a second build in pip's temporary directory.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$(pwd)" > "$SITE/resfast-dev.pth"
"$PY" -c 'import resfast, resfast._ext as e; print("== resfast setup: resfast", resfast.__version__, "| _C:", "loaded" if e.C else e.C_ERROR)'
