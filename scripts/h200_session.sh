#!/usr/bin/env bash
# The GPU experiments behind docs/results/h200/, as three calls of at most 10 minutes each (the
# second reuses the first's trained model while the machine is still warm). Results go into $OUT as
# one tarball per phase plus its log; what is kept is committed under docs/results/h200/ and
# data/traces/h200/.
#
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
PHASE=${1:?usage: bash scripts/h200_session.sh model|extras}
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

case "$PHASE" in
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
