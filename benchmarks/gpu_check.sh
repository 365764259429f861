#!/usr/bin/env bash
# Every GPU-only measurement of the project, one command, at most 8 minutes on one H100/H200:
#
#   bash benchmarks/gpu_check.sh [--inception-weights W.pth]   # writes benchmarks/results/gpu_check*.json
#   bash benchmarks/gpu_check.sh --smoke --out DIR             # CPU smoke test (CI): tiny sizes, parts side by side
#   SMOKE=1 bash benchmarks/gpu_check.sh --out DIR             # the same
#
# Parts (each under `timeout` with its own budget; a part that fails or runs out of time is
# recorded as such and the others still run):
#   1. mfu        bench_gpu_mfu.py: DiT-XL/2 training step, bf16 autocast, flash SDPA enforced,
#                 torch.compile; MFU against the card's bf16 matmul peak measured in the same run
#   2. memory     bench_memory.py: peak max_memory_allocated of a DiT-XL/2 bf16 step with and
#                 without activation checkpointing, each in a fresh process
#   3. two_procs  gpu_check_parts.py two_procs: train.py as 1 process vs 2 processes (torchrun)
#                 with both ranks on cuda:0, NCCL; steps/s. NCCL refuses two ranks on one GPU
#                 ("Duplicate GPU detected"): then recorded as not_supported, with the reason
#   4. sampling   gpu_check_parts.py sampling: images/s of DDPM-250 vs DPM-Solver++-10 vs
#                 MeanFlow-1 on DiT-XL/2-sized random weights
#   5. inception  gpu_check_parts.py inception: FID of the same random images with fp32 vs TF32
#                 Inception features; needs torch-fidelity's Inception weights (--inception-weights
#                 or $DIT_INCEPTION_WEIGHTS, else torch hub's cache), else recorded as
#                 "skipped: no weights"
# Output: one JSON per part (gpu_check_<part>.json), the summary gpu_check.json (device, torch,
# each part's figures or its failure) and each part's log under <out>/gpu_check_logs/.
# Exit status: 0 when every part answered (figures, or a recorded reason: no weights, not
# supported); 1 otherwise. In smoke mode, 0 only when every part produced its figures.
#
# Options: --smoke, --out DIR (default benchmarks/results; smoke: a new temporary folder, never
# benchmarks/results), --inception-weights PATH. Environment: PYTHON (default .venv/bin/python if
# present, else python3), SMOKE=1, GPU_CHECK_TOTAL_S (the parts' total budget, default 450 s),
# MFU_BATCH (default 64), MEMORY_BATCH (default 32), SAMPLING_BATCH (default 32).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${SMOKE:-0}" in 1|true|yes) SMOKE=1 ;; *) SMOKE=0 ;; esac
OUT=""
WEIGHTS="${DIT_INCEPTION_WEIGHTS:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --inception-weights) WEIGHTS="${2:?--inception-weights needs a file}"; shift 2 ;;
    --inception-weights=*) WEIGHTS="${1#*=}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
RESULTS="$REPO/benchmarks/results"
if [[ -z "$OUT" ]]; then
  if (( SMOKE )); then OUT="$(mktemp -d -t gpu_check_smoke.XXXXXX)"; else OUT="$RESULTS"; fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if (( SMOKE )) && [[ "$OUT" == "$(cd "$RESULTS" && pwd)" ]]; then
  echo "gpu_check.sh: --smoke never writes to benchmarks/results (its figures are not measurements): give --out DIR" >&2
  exit 2
fi
if (( ! SMOKE )) && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device here; run the CPU smoke test with --smoke --out DIR" >&2
  exit 2
fi

LOGS="$OUT/gpu_check_logs"
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOGS"
TSV="$WORK/parts.tsv"
: >"$TSV"
TOTAL="${GPU_CHECK_TOTAL_S:-450}"
DEADLINE=$(( SECONDS + TOTAL ))
BENCH="$REPO/benchmarks"
cd "$REPO"

# run_part NAME BUDGET_S CMD...: CMD under `timeout`, at most BUDGET_S seconds and never past the
# deadline; its output to $LOGS/NAME.log, its JSON to $OUT/gpu_check_NAME.json, a line in $TSV.
run_part() {
  local name=$1 budget=$2; shift 2
  local json="$OUT/gpu_check_$name.json" log="$LOGS/$name.log" left rc=0 start end
  left=$(( DEADLINE - SECONDS ))
  (( budget > left )) && budget=$left
  rm -f "$json"
  if (( budget < 10 )); then
    echo "not started: the total budget of $TOTAL s is spent" >"$log"
    printf '%s\tnot_started\t0\t%s\t%s\t%s\n' "$name" "$budget" "$json" "$log" >>"$TSV"
    echo "== $name: not started (time spent)"
    return 0
  fi
  echo "== $name (budget ${budget} s) ..."
  start=$(date +%s.%N)
  timeout --kill-after=5 "$budget" "$@" --json "$json" >"$log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')" \
    "$budget" "$json" "$log" >>"$TSV"
  echo "   return code $rc, log $log"
}

if (( SMOKE )); then
  export OMP_NUM_THREADS=1  # the parts run side by side: one thread each
  run_part mfu 150 "$PYTHON" "$BENCH/bench_gpu_mfu.py" --model DiT-S/4 --input-size 8 --batch-size 2 --steps 2 \
    --warmup 1 --device cpu --dtype float32 --no-compile --attention default --variants off --flop-batch 1 \
    --peak-size 256 --peak-iters 2 --peak-repeats 3 --threads 1 &
  run_part memory 150 "$PYTHON" "$BENCH/bench_memory.py" --model DiT-S/4 --input-size 8 --batch-size 2 --warmup 1 \
    --repeats 1 --device cpu --threads 1 &
  run_part two_procs 150 "$PYTHON" "$BENCH/gpu_check_parts.py" two_procs --size tiny --device cpu --precision fp32 \
    --batch-size 8 --steps 6 --log-every 2 --budget 140 --workdir "$WORK/two_procs" &
  run_part sampling 150 "$PYTHON" "$BENCH/gpu_check_parts.py" sampling --model tiny --input-size 8 --batch-size 2 \
    --precision fp32 --repeats 1 --device cpu --threads 1 &
  run_part inception 150 "$PYTHON" "$BENCH/gpu_check_parts.py" inception --random-weights --images 6 --size 32 \
    --batch-size 6 --device cpu --threads 1 &
  wait
else
  run_part mfu 170 "$PYTHON" "$BENCH/bench_gpu_mfu.py" --model DiT-XL/2 --batch-size "${MFU_BATCH:-64}" \
    --steps 10 --warmup 3 --device cuda --dtype bfloat16 --compile --attention flash --variants off
  run_part memory 85 "$PYTHON" "$BENCH/bench_memory.py" --model DiT-XL/2 --batch-size "${MEMORY_BATCH:-32}" \
    --precision bf16 --warmup 1 --repeats 2 --device cuda
  run_part two_procs 70 "$PYTHON" "$BENCH/gpu_check_parts.py" two_procs --device cuda:0 --model DiT-B/2 \
    --image-size 32 --precision bf16 --batch-size 64 --steps 80 --log-every 20 --budget 65 --workdir "$WORK/two_procs"
  run_part sampling 80 "$PYTHON" "$BENCH/gpu_check_parts.py" sampling --model DiT-XL/2 --input-size 32 \
    --batch-size "${SAMPLING_BATCH:-32}" --precision bf16 --repeats 2 --device cuda
  run_part inception 45 "$PYTHON" "$BENCH/gpu_check_parts.py" inception ${WEIGHTS:+--weights "$WEIGHTS"} \
    --images 1000 --size 256 --batch-size 100 --device cuda
fi

rc=0
SMOKE_FLAG=()
(( SMOKE )) && SMOKE_FLAG=(--smoke)
"$PYTHON" "$BENCH/gpu_check_parts.py" summary --out "$OUT" --parts "$TSV" "${SMOKE_FLAG[@]}" \
  --total-wall-s "$SECONDS" --budget-s "$TOTAL" || rc=$?
echo "wall time ${SECONDS} s; results in $OUT"
exit "$rc"
