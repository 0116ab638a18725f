#!/usr/bin/env bash
# The GPU experiments of one device session, as two calls of at most 10 minutes each (the second
# reuses the first's trained model while the machine is still warm). Results go into $OUT as one
# tarball per phase plus its log; commit what you keep under docs/results/<gpu>/.
#
#   bash scripts/h200_session.sh model    # train the distilgpt2 recipe (≤ 330 s), calibrate, frontier:
#                                         # stationary + domain-shift, 2 repeats  → $OUT/model.tar.gz
#   bash scripts/h200_session.sh extras   # NVML sampler overhead; small OLMoE (transformers) trained
#                                         # from scratch and its frontier      → $OUT/extras.tar.gz
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
    --deadline-s 545
  cp "$R/gpu_model/nectar_model.json" "$R/model/" 2>/dev/null
  tar czf "$OUT/model.tar.gz" -C "$R" model ;;
extras)
  mkdir -p "$R/extras"
  step 110 python benchmarks/telemetry_overhead.py --device cuda --alternations 8 --seconds 2 --warmup-seconds 3 \
    --batch 32 --seq-len 1024 --json-out "$R/extras/telemetry_overhead.json"
  step 200 python -m nectar.hf.train_small --out "$R/olmoe" --device cuda --budget-s 170 --no-progress
  cp "$R/olmoe/nectar_model.json" "$R/extras/olmoe_model.json" 2>/dev/null
  POL=$(python -c "from nectar.hf.policies import frontier_policies; print(','.join(frontier_policies(8) + ['nectar']))")
  step 250 python -m nectar hw-run --model "$R/olmoe" --out "$R/extras/olmoe_frontier" --overwrite --no-progress \
    --workloads stationary --repeats 2 --workload-seconds 45 --policies "$POL" --deadline-s 230
  tar czf "$OUT/extras.tar.gz" -C "$R" extras ;;
*) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
