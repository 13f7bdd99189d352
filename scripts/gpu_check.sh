#!/usr/bin/env bash
# First contact with a lent GPU (one H200, 15 minutes of device time, 10 per command, 8 files back): one command that
# builds resfast._C for sm_90 and checks, in priority order, what nothing but a GPU can check:
#   build        setup.py build_ext (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0), import resfast._C
#   smoke        one launch of every Triton kernel and every resfast._C CUDA op, stage-1 blocks, eval + training
#   correctness  err(fused) <= 2 err(eager same dtype) + floor vs float64, every op forward and training,
#                fp16/bf16, triton and cuda, ResNet-50-family shapes (tests/test_gpu.py's), in priority tiers
#   models       whole converted timm models' logits vs the unconverted model (res2net50_26w_4s, resnext50_32x4d,
#                resnetv2_50; pretrained=False, seed 0)
#   headline     images/s + peak memory: eval bf16 channels_last batch 256, AMP training batch 128,
#                res2net50_26w_4s and resnet50, eager / resfast-triton / resfast-cuda / torch.compile
#   bandwidth    the stage-1 Res2Net chain ops' GB/s vs the measured device copy bandwidth
#   sanitize     compute-sanitizer memcheck of one small block per backend
# Step k runs under `timeout` until its deadline T0 + (budgets of steps 1..k): time a step leaves unused passes to
# the next ones, and the whole run ends by T0 + sum(budgets), which is asserted below 9 minutes (with SLACK_S for
# the last kill grace and packing). Triton autotuning is bounded with RESFAST_TUNE=quick (resfast/backends/triton/kernels/conv.py).
# After every step, $OUT holds exactly two files, re-packed each time so a run cut off anywhere returns what it did:
#   gpu_check.tar.gz   gpu_check/{gpu_check.json, summary.txt, steps/*.json, logs/*.log, results/*}
#   summary.txt        the short summary
# benchmarks/import_gpu_results.py turns the tarball into committed result files and resfast/ops/gpu_verified.json.
#
#   bash scripts/gpu_check.sh                                # on the device tool (OUT is set there; default gpu-out)
#   RESFAST_GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh    # the same steps on the CPU (Triton interpreter)
#   bash scripts/gpu_check.sh --plan                         # print the step budgets and their sum
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=(build:140 smoke:60 correctness:150 models:40 headline:90 bandwidth:15 sanitize:25)
LIMIT_S=540   # 9 minutes: the device tool's 10-minute command limit, less a minute of margin
SLACK_S=15    # the last step's kill grace (timeout -k 5) and the final packing
TOTAL=0
for s in "${STEPS[@]}"; do TOTAL=$((TOTAL + ${s#*:})); done
if [ $((TOTAL + SLACK_S)) -gt "$LIMIT_S" ]; then
  echo "gpu_check: the step budgets sum to ${TOTAL} s (+${SLACK_S} s slack), over ${LIMIT_S} s" >&2
  exit 2
fi
if [ "${1:-}" = "--plan" ]; then
  echo "steps: ${STEPS[*]}"; echo "total: ${TOTAL} s (+${SLACK_S} s slack) of ${LIMIT_S} s"; exit 0
fi

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
rm -f "$OUT/gpu_check.tar.gz" "$OUT/summary.txt"
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RESFAST_TUNE=${RESFAST_TUNE:-quick}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
if [ "${RESFAST_GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  echo "gpu_check: DRY RUN on the CPU (Triton interpreter, tiny shapes): not a GPU result"
fi
$PY scripts/gpu_check.py init --work "$WORK" --budgets "${STEPS[@]}" --limit "$LIMIT_S" || exit 1

T0=$(date +%s)
CUM=0
for s in "${STEPS[@]}"; do
  name=${s%%:*}; budget=${s#*:}
  CUM=$((CUM + budget))
  left=$((T0 + CUM - $(date +%s)))
  start_ms=$(($(date +%s%N) / 1000000))
  reason=""
  if [ "$left" -lt 5 ]; then
    rc=124; reason="not started: no time left before its deadline"
  else
    # the step stops starting new cases 3 s before its hard deadline, so it exits with its records complete
    GPU_CHECK_DEADLINE=$((T0 + CUM - 3)) timeout -k 5 "$left" $PY scripts/gpu_check.py "$name" --work "$WORK" \
      > "$WORK/logs/$name.log" 2>&1
    rc=$?
  fi
  ms=$(($(date +%s%N) / 1000000 - start_ms))
  secs=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  $PY scripts/gpu_check.py finish "$name" --work "$WORK" --out "$OUT" --rc "$rc" --seconds "$secs" \
    --timeout "$left" --budget "$budget" --reason "$reason" | sed "s/^/[$name] /"
done
cat "$OUT/summary.txt"
[ -n "${GPU_CHECK_KEEP_WORK:-}" ] && echo "work dir kept: $WORK" || rm -rf "$WORK"
