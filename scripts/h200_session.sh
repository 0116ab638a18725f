#!/usr/bin/env bash
# The GPU experiments behind docs/results/h200/, as calls of at most 10 minutes each (a call that
# reuses a trained model comes right after the one that trained it, while the machine is still
# warm). Results go into $OUT as one tarball per phase plus its log; what is kept is committed under
# docs/results/h200/ and data/traces/h200/.
#
# Second session (feed-forward price, drop on by default, fixed-price frontier, limit workloads):
#   bash scripts/h200_session.sh main     # train (≤ 250 s), calibrate, stationary + domain-shift
#                                         # frontiers, 9 policies, ~95 s of GPU time each → main.tar.gz
#   bash scripts/h200_session.sh limits   # (right after) power-schedule (interleaved) and thermal
#                                         # (one policy after another, co-tenant, cap 60 °C) → limits.tar.gz
#                                         # (as run, the thermal part passed the call's limit; its
#                                         # result is the next phase's)
#   bash scripts/h200_session.sh thermal  # (right after) thermal alone, 4 policies, shorter warm-ups
#   bash scripts/h200_session.sh olmoe    # (right after) a small OLMoE (64 experts of width 256, top-8)
#                                         # trained here, then hw-run's stationary frontier with ~0.7 s
#                                         # windows (as run, it passed its 180 s limit: see
#                                         # docs/results.md)                               → olmoe.tar.gz
#
# Third session (a 52x faster adaptive-k price table, deviation growth from the latest check):
#   bash scripts/h200_session.sh moe      # a small OLMoE (64 experts of width 256, top-8) trained here
#                                         # (<= 95 s), then hw-run's stationary and domain-shift
#                                         # frontiers, 9 policies, ~0.7 s chunks    -> moe.tar.gz
#   bash scripts/h200_session.sh moe-wide # how much of the forward the routed experts take (random
#                                         # weights, two shapes), then the same as `moe` on a wider
#                                         # OLMoE (768 wide, 64 experts of width 1024) -> moe-wide.tar.gz
#   bash scripts/h200_session.sh moe-wide-repeats  # the wider OLMoE trained again, then the
#                                         # stationary frontier twice (the margin's interval)
#                                                                                  -> moe-wide-repeats.tar.gz
#
# First session:
#   bash scripts/h200_session.sh model    # train the distilgpt2 recipe (≤ 330 s), calibrate, frontier:
#                                         # stationary, 2 repeats of 45 s               → model.tar.gz
#   bash scripts/h200_session.sh extras   # (same machine, right after) domain-shift frontier of that
#                                         # model; NVML sampler overhead; a small OLMoE (transformers)
#                                         # trained from scratch and its frontier        → extras.tar.gz
#   bash scripts/h200_session.sh long     # train again (≤ 275 s), then a 20-chunk stationary frontier
#                                         # of the main policies                         → long.tar.gz
#
# Needs torch (CUDA), transformers, nvidia-ml-py and the built corpus (data/corpus/built, carried).
set -u
PHASE=${1:?usage: bash scripts/h200_session.sh main|limits|thermal|olmoe|moe|moe-wide|moe-wide-repeats|model|extras|long}
OUT=${OUT:?set OUT to the folder that comes back}
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/$PHASE.log"
R=runs/h200
mkdir -p "$R"
{ date; nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,temperature.gpu --format=csv;
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"

step() {  # step LIMIT_S ARGS...
  local limit=$1 start rc
  shift
  echo "=== $* (limit ${limit}s)" | tee -a "$LOG"
  start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

MOE_POLICIES=static-top8,static-top6,static-top4,static-top2,top-p:0.9,top-p:0.7,threshold:0.05,threshold:0.1,nectar
MAIN_POLICIES=static-top2,static-top1,static-cheap,top-p:0.5,top-p:0.8,fixed-price:1,fixed-price:2,fixed-price:4,nectar
LIMIT_POLICIES=static-top2,static-top1,static-cheap,fixed-price:2,nectar

case "$PHASE" in
main)
  step 590 python -m nectar hw-run --train-budget-s 250 --out "$R/main" --overwrite --save-model "$R/gpu_model" \
    --no-progress --workloads stationary,domain-shift --repeats 1 --workload-seconds 95 --policies "$MAIN_POLICIES" \
    --deadline-s 575
  cp "$R/gpu_model/nectar_model.json" "$R/main/" 2>/dev/null
  tar czf "$OUT/main.tar.gz" -C "$R" main ;;
limits)
  step 590 python -m nectar hw-run --model "$R/gpu_model" --out "$R/limits" --overwrite --no-progress \
    --workloads power-schedule,thermal --temp-cap 60 --cotenant-duty 0.3 --policy-warmup-s 15 --repeats 1 \
    --workload-seconds 150 --policies "$LIMIT_POLICIES" --deadline-s 575
  tar czf "$OUT/limits.tar.gz" -C "$R" limits ;;
thermal)
  step 400 python -m nectar hw-run --model "$R/gpu_model" --out "$R/thermal" --overwrite --no-progress \
    --workloads thermal --temp-cap 60 --cotenant-duty 0.3 --policy-warmup-s 10 --repeats 1 --workload-seconds 80 \
    --warmup-s 4 --calibration-s 3 --policies static-top2,static-cheap,fixed-price:2,nectar --deadline-s 390
  tar czf "$OUT/thermal.tar.gz" -C "$R" thermal ;;
olmoe)
  step 115 python -m nectar.hf.train_small --out "$R/olmoe" --device cuda --budget-s 95 --expert-hidden 256 \
    --no-progress
  mkdir -p "$R/olmoe_runs"
  cp "$R/olmoe/nectar_model.json" "$R/olmoe_runs/olmoe_model.json" 2>/dev/null
  step 180 python -m nectar hw-run --model "$R/olmoe" --out "$R/olmoe_runs/frontier" --overwrite --no-progress \
    --workloads stationary --repeats 1 --workload-seconds 75 --warmup-s 5 --calibration-s 3 --seq-len 256 \
    --micro-batch 256 --chunk-tokens 1048576 --deadline-s 175 \
    --policies static-top8,static-top6,static-top4,static-top2,top-p:0.9,top-p:0.7,threshold:0.05,threshold:0.1,nectar
  tar czf "$OUT/olmoe.tar.gz" -C "$R" olmoe_runs ;;
moe)
  step 115 python -m nectar.hf.train_small --out "$R/olmoe" --device cuda --budget-s 95 --expert-hidden 256 \
    --no-progress
  step 470 python -m nectar hw-run --model "$R/olmoe" --out "$R/moe" --overwrite --no-progress \
    --workloads stationary,domain-shift --repeats 1 --workload-seconds 150 --warmup-s 5 --calibration-s 3 \
    --seq-len 256 --micro-batch 256 --chunk-tokens 1048576 --deadline-s 460 --policies "$MOE_POLICIES"
  cp "$R/olmoe/nectar_model.json" "$R/moe/olmoe_model.json" 2>/dev/null
  tar czf "$OUT/moe.tar.gz" -C "$R" moe ;;
moe-wide)
  mkdir -p "$R/moe-wide"
  step 90 python benchmarks/hf_expert_share.py --shapes 512x256 768x1024 --profile \
    --json-out "$R/moe-wide/expert_share.json"
  step 115 python -m nectar.hf.train_small --out "$R/olmoe-wide" --device cuda --budget-s 95 --hidden 768 \
    --expert-hidden 1024 --no-progress
  step 380 python -m nectar hw-run --model "$R/olmoe-wide" --out "$R/moe-wide/frontier" --overwrite --no-progress \
    --workloads stationary,domain-shift --repeats 1 --workload-seconds 125 --warmup-s 5 --calibration-s 3 \
    --seq-len 256 --micro-batch 256 --chunk-tokens 524288 --deadline-s 372 --policies "$MOE_POLICIES"
  cp "$R/olmoe-wide/nectar_model.json" "$R/moe-wide/olmoe_model.json" 2>/dev/null
  tar czf "$OUT/moe-wide.tar.gz" -C "$R" moe-wide ;;
moe-wide-repeats)
  step 115 python -m nectar.hf.train_small --out "$R/olmoe-wide" --device cuda --budget-s 95 --hidden 768 \
    --expert-hidden 1024 --no-progress
  step 310 python -m nectar hw-run --model "$R/olmoe-wide" --out "$R/moe-wide-repeats" --overwrite --no-progress \
    --workloads stationary --repeats 2 --workload-seconds 100 --warmup-s 5 --calibration-s 3 \
    --seq-len 256 --micro-batch 256 --chunk-tokens 524288 --deadline-s 300 --policies "$MOE_POLICIES"
  cp "$R/olmoe-wide/nectar_model.json" "$R/moe-wide-repeats/olmoe_model.json" 2>/dev/null
  tar czf "$OUT/moe-wide-repeats.tar.gz" -C "$R" moe-wide-repeats ;;
model)
  step 575 python -m nectar hw-run --out "$R/model" --overwrite --save-model "$R/gpu_model" --no-progress \
    --workloads stationary --deadline-s 545
  cp "$R/gpu_model/nectar_model.json" "$R/model/" 2>/dev/null
  tar czf "$OUT/model.tar.gz" -C "$R" model ;;
extras)
  mkdir -p "$R/extras"
  step 230 python -m nectar hw-run --model "$R/gpu_model" --out "$R/extras/domain_shift" --overwrite --no-progress \
    --workloads domain-shift --repeats 2 --deadline-s 215
  step 75 python benchmarks/telemetry_overhead.py --device cuda --alternations 6 --seconds 2 --warmup-seconds 3 \
    --batch 32 --seq-len 1024 --json-out "$R/extras/telemetry_overhead.json"
  step 140 python -m nectar.hf.train_small --out "$R/olmoe" --device cuda --budget-s 110 --no-progress
  cp "$R/olmoe/nectar_model.json" "$R/extras/olmoe_model.json" 2>/dev/null
  step 240 python -m nectar frontier --backend nvml --model "$R/olmoe" --workload stationary --tokens 2097152 \
    --chunk-tokens 262144 --seq-len 256 --micro-batch 256 --repeats 2 --out "$R/extras/olmoe_frontier" --overwrite \
    --no-progress
  tar czf "$OUT/extras.tar.gz" -C "$R" extras ;;
long)
  step 435 python -m nectar hw-run --train-budget-s 275 --out "$R/long" --overwrite --no-progress \
    --workloads stationary --repeats 1 --workload-seconds 70 \
    --policies static-top2,static-top1,static-cheap,top-p:0.5,nectar,nectar:nodrop --deadline-s 432
  tar czf "$OUT/long.tar.gz" -C "$R" long ;;
*) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
