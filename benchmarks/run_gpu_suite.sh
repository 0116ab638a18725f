#!/usr/bin/env bash
# The four speed benchmarks on one GPU (H200: about 4 minutes; at most 280 s by the limits below),
# JSON into OUTDIR:
#   moe_layer.json  forward_chunk.json  fastweight.json  telemetry_overhead.json  (+ suite.log)
# Needs torch (CUDA), transformers, numpy, nvidia-ml-py; run from the repository root:
#   bash benchmarks/run_gpu_suite.sh OUTDIR
# Each benchmark has its own time limit (seconds, env LIMIT_<NAME>) and rewrites its JSON after
# every row, so one that overruns still leaves what it measured and the others still run.
set -u
OUT=${1:?usage: bash benchmarks/run_gpu_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
. benchmarks/suite_steps.sh
run() { step "$1" "$2" "$PY" "${@:3}"; }   # run NAME LIMIT_S ARGS...: a Python step
suite_header

run moe_layer "${LIMIT_MOE_LAYER:-95}" benchmarks/moe_layer.py --device cuda --dtype bfloat16 \
  --tokens 32768 131072 --kinds swiglu gelu --experts 8 --top-k 2 --d-model 768 --hidden 3072 \
  --compile --compile-tokens 32768 --energy-seconds 1.5 --energy-tokens 32768 --json-out "$OUT/moe_layer.json"

run forward_chunk "${LIMIT_FORWARD_CHUNK:-40}" benchmarks/forward_chunk.py --device cuda --batch 64 --seq-len 1024 \
  --rounds 5 --calls 2 --json-out "$OUT/forward_chunk.json"

run fastweight "${LIMIT_FASTWEIGHT:-90}" benchmarks/fastweight.py --device cuda --dtype bf16 --dim 512 --hidden 1024 \
  --heads 16 --chunk-sizes 4096 16384 --compile --compile-kernel-sizes 16384 --json-out "$OUT/fastweight.json"

run telemetry_overhead "${LIMIT_TELEMETRY:-120}" benchmarks/telemetry_overhead.py --device cuda --alternations 10 \
  --seconds 2 --warmup-seconds 3 --batch 32 --seq-len 1024 --json-out "$OUT/telemetry_overhead.json"

date | tee -a "$LOG"
exit $status
