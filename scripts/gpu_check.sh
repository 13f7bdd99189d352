#!/usr/bin/env bash
# One command for a lent GPU machine (torch, triton, timm, torchvision preinstalled; no network): build the
# extension against the machine's torch, run the whole test suite (Triton tests then run compiled kernels on
# CUDA tensors), and the benchmarks. Full logs and result files go under ${OUT:-gpu-out}/; a short summary last.
#
#   bash scripts/gpu_check.sh            # on the device tool: run(command="bash scripts/gpu_check.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())' \
  | tee "$OUT/versions.txt"
MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?" | tee -a "$OUT/summary.txt"
$PY -m resfast.info > "$OUT/info.txt" 2>&1
$PY -m pytest tests -q -p no:cacheprovider > "$OUT/pytest.log" 2>&1
tail -3 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
# memory errors and shared-memory races in the Triton and CUDA kernels: one block of each kind, eval and a training
# step, under compute-sanitizer (when installed)
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 $PY scripts/sanitize_blocks.py > "$OUT/$tool.log" 2>&1
    echo "$tool rc=$?" | tee -a "$OUT/summary.txt"
  done
fi
$PY -m resfast.bench --out-dir "$OUT/results" --providers eager resfast resfast-triton resfast-cuda compile \
  > "$OUT/bench.txt" 2>&1; echo "bench rc=$?" | tee -a "$OUT/summary.txt"
# training step (AMP bf16, channels_last, batch 128): images/s and peak memory, Triton and CUDA backends vs eager
# and compile
$PY -m resfast.bench --mode train --batch 128 --models res2net50_26w_4s resnext50_32x4d resnetv2_50 \
  --providers eager resfast-triton resfast-cuda compile --out-dir "$OUT/results" > "$OUT/bench_train.txt" 2>&1
echo "bench train rc=$?" | tee -a "$OUT/summary.txt"; tail -12 "$OUT/bench_train.txt"
# the same Res2Net and ResNetV2 training steps without the whole-block ops (the per-op Triton path), for the comparison
RESFAST_WHOLE_BLOCK=0 $PY -m resfast.bench --mode train --batch 128 --models res2net50_26w_4s resnetv2_50 \
  --providers resfast-triton --out-dir "$OUT/results-per-op" > "$OUT/bench_train_per_op.txt" 2>&1
echo "bench train per-op rc=$?" | tee -a "$OUT/summary.txt"; tail -4 "$OUT/bench_train_per_op.txt"
# conv gradients: Triton dgrad/wgrad vs ATen (cuDNN) per conv of the three networks, then the GPU training tests and
# the training steps with every conv gradient from Triton (RESFAST_CONV_BACKWARD=triton), for the comparison above
$PY benchmarks/bench_conv_backward.py --out-dir "$OUT/results" > "$OUT/bench_conv_backward.txt" 2>&1
echo "bench_conv_backward rc=$?" | tee -a "$OUT/summary.txt"; tail -4 "$OUT/bench_conv_backward.txt"
RESFAST_CONV_BACKWARD=triton $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -k training \
  > "$OUT/pytest_triton_conv_grads.log" 2>&1
tail -1 "$OUT/pytest_triton_conv_grads.log" | sed 's/^/triton conv grads: /' | tee -a "$OUT/summary.txt"
RESFAST_CONV_BACKWARD=triton $PY -m resfast.bench --mode train --batch 128 --models res2net50_26w_4s resnext50_32x4d \
  resnetv2_50 --providers resfast-triton --out-dir "$OUT/results-triton-conv-grads" > "$OUT/bench_train_tcg.txt" 2>&1
echo "bench train triton conv grads rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/bench_train_tcg.txt"
$PY benchmarks/bench_ops.py --quick --out-dir "$OUT/results" > "$OUT/bench_ops.txt" 2>&1; echo "bench_ops rc=$?" | tee -a "$OUT/summary.txt"
# mask or pad for Res2Net's 26-channel splits (the issue asks for the measurement)
$PY benchmarks/bench_pad_vs_mask.py --out-dir "$OUT/results" > "$OUT/bench_pad_vs_mask.txt" 2>&1
echo "bench_pad_vs_mask rc=$?" | tee -a "$OUT/summary.txt"; tail -5 "$OUT/bench_pad_vs_mask.txt"
tail -12 "$OUT/bench.txt"
