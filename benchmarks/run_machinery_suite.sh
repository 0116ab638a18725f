#!/usr/bin/env bash
# The machinery measurements of one GPU (issue "NECTAR's machinery at the hardware's speed"), into OUTDIR:
#   (suite.log)           the sync test: every policy's MoE layers under torch.cuda.set_sync_debug_mode("error")
#   policy_speed_chunk.json  the experiment's chunk forward, static-top1 against drop-all (its routing
#                         through NECTAR's drop path); MODEL=DIR: a saved model on its held-out stream
#   policy_speed_chunk_backend.json  the same, each chunk timed inside the telemetry backend's window
#                         (NVML with its sampler thread, as hw-run times a chunk)
#   policy_speed_chunk_mb128.json    the same with 128-row micro-batches (half the forwards a chunk:
#                         whether the cheap routings are host-bound)
#   policy_speed_graphs.json  the bare forward, grouped dispatch, replayed as captured CUDA graphs
#   policy_speed_<d>.json every policy on the same chunk, dispatch d = grouped, loop, compiled
#                         (+ policy_speed_<d>.cost_table.json: the calibration it predicts from)
#   moe_layer.json        the MoE layer against a dense FFN of equal active FLOPs (32 K / 128 K tokens)
#   calibration_noise.json  the cost calibration's spread over identical experts, with and without a settle
#   suite.log             everything printed
# About 14 minutes on an H100/H200 (SKIP_COMPILED=1: about 11, without the compiled row; CHUNK_ONLY=1:
# about 6, the sync test and the four chunk and graph rows alone; MODEL=train trains a distilgpt2-recipe
# model for TRAIN_S seconds first, default 60, on the carried data/corpus/built, and runs the rows on it:
# about 9); each step has its own time limit, so one that overruns leaves the others. Run from the
# repository root on the GPU host (torch with CUDA, nvidia-ml-py):
#   bash benchmarks/run_machinery_suite.sh OUTDIR      (exit status 1 if any step failed)
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/run_machinery_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
# fixed-price:0.005 drops nearly every second slot: against static-top1, what a dropped slot still costs
POLICIES=static-top2,fixed-bias:0,fixed-price:1e9,static-top1,static-cheap,top-p:0.5,fixed-price:1,fixed-price:0.005,nectar
CHUNK_POLICIES=static-top2,static-top1,drop-all,static-cheap,fixed-bias:3,top-p:0.5,nectar
. benchmarks/suite_steps.sh
suite_header
if [ "${MODEL:-}" = train ]; then     # a distilgpt2-recipe model of TRAIN_S seconds (needs data/corpus/built)
  MODEL=/tmp/nectar-machinery-model
  step "train distilgpt2 ${TRAIN_S:-60} s" $(( ${TRAIN_S:-60} + 120 )) "$PY" -m nectar train --recipe distilgpt2 \
    --time-budget-s "${TRAIN_S:-60}" --device cuda --out "$MODEL" --overwrite --no-progress
fi
step sync_test 150 "$PY" -m pytest -q -p no:cacheprovider tests/moe/test_gpu_sync_free.py tests/moe/test_dispatch_compaction.py \
  tests/moe/test_fused_router.py
# the experiment's chunk forward (recorder, NLL) with drop-all = static top-1's routing through NECTAR's drop
# path; MODEL=DIR (`nectar hw-run --save-model DIR`) runs a trained model on its held-out stream
step "policy_speed chunk" 110 "$PY" benchmarks/policy_speed.py --device cuda --dispatch loop --rounds 3 --chunk-forward \
  --policies $CHUNK_POLICIES ${MODEL:+--model "$MODEL"} --json-out "$OUT/policy_speed_chunk.json"
step "policy_speed chunk backend" 100 "$PY" benchmarks/policy_speed.py --device cuda --dispatch loop --rounds 3 \
  --chunk-forward --telemetry backend --policies $CHUNK_POLICIES ${MODEL:+--model "$MODEL"} \
  --json-out "$OUT/policy_speed_chunk_backend.json"
step "policy_speed chunk mb128" 100 "$PY" benchmarks/policy_speed.py --device cuda --dispatch loop --rounds 3 \
  --chunk-forward --micro-batch 128 --policies $CHUNK_POLICIES ${MODEL:+--model "$MODEL"} \
  --json-out "$OUT/policy_speed_chunk_mb128.json"
step "policy_speed graphs" 100 "$PY" benchmarks/policy_speed.py --device cuda --dispatch grouped --graphs --rounds 3 \
  --policies $CHUNK_POLICIES ${MODEL:+--model "$MODEL"} --json-out "$OUT/policy_speed_graphs.json"
if [ "${CHUNK_ONLY:-0}" = 1 ]; then date | tee -a "$LOG"; exit $status; fi
for d in grouped loop; do
  step "policy_speed $d" 110 "$PY" benchmarks/policy_speed.py --device cuda --dispatch "$d" --rounds 4 \
    --policies "$POLICIES" --json-out "$OUT/policy_speed_$d.json"
done
[ "${SKIP_COMPILED:-0}" = 1 ] || step "policy_speed compiled" 150 "$PY" benchmarks/policy_speed.py --device cuda \
  --dispatch compiled --rounds 3 --policies static-top2,fixed-bias:0,fixed-price:1e9,static-top1,nectar \
  --json-out "$OUT/policy_speed_compiled.json"
step moe_layer 100 "$PY" benchmarks/moe_layer.py --device cuda --dtype bfloat16 --tokens 32768 131072 --kinds swiglu gelu \
  --experts 8 --top-k 2 --d-model 768 --hidden 3072 --compile --compile-tokens 32768 131072 --energy-seconds 1.0 \
  --energy-tokens 32768 --json-out "$OUT/moe_layer.json"
step calibration_noise 90 "$PY" benchmarks/calibration_noise.py --device cuda --repeats 2 --settle-fractions 0,0.75 \
  --json-out "$OUT/calibration_noise.json"
date | tee -a "$LOG"
exit $status
