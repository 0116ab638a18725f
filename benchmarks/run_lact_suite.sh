#!/usr/bin/env bash
# LaCT in a trained model, measured side by side on one GPU (issue 28, deliverable 2), into OUTDIR:
#   summary.json                 one object per recipe (distilgpt2, distilgpt2-lact-attn, distilgpt2-lact-expert):
#                                heldout_ppl (+ per domain), heldout_ppl_positions_1_512 / _512_1024,
#                                train_seconds, train_tokens_per_s, tokens_per_s and J_per_token of the
#                                model's own static forward, gpu (scripts/lact_summary.py)
#   energy.json                  that measurement per model and window (benchmarks/lact_energy.py, NVML, read-only)
#   nectar_model.<recipe>.json   each model's nectar_model.json (recipe, loss curves, routing, ppl)
#   suite.log                    everything printed
# Each recipe trains with the same budget, TRAIN_S seconds (default 100: three trainings, their
# evaluations and the energy step fit the device's 9-minute call), on cuda in bf16 autocast, into
# $MODELS (default /tmp/nectar-lact-models, outside OUTDIR; deleted at the end unless KEEP_MODELS=1:
# no weights come back). ENERGY_S seconds measured per model (default 5). A step's time limit shrinks
# to what is left of SUITE_S (default 540) after RESERVE_S (default 75) for the energy and summary
# steps, so an overrun costs a training, not the energy. Needs the built corpus (data/corpus/built,
# `python scripts/build_corpus.py --no-publish`, carried to the GPU host). About 470 s on an H100 with
# the defaults. Run from the repository root on the GPU host (torch with CUDA, nvidia-ml-py):
#   TRAIN_S=100 bash benchmarks/run_lact_suite.sh OUTDIR        (exit status 1 if any step failed)
# LACT_COMPILE=on|off overrides the hybrid LaCT recipe's compiled branch (on in the recipe: compiling
# costs ~42 s on an H100 and pays from ~120 s of training; off for shorter budgets).
# DEVICE, TRAIN_ARGS and ENERGY_ARGS (extra options of `nectar train` and lact_energy.py) exist for
# a CPU smoke run: DEVICE=cpu ENERGY_ARGS="--backend sim" TRAIN_ARGS="--batch 1 --eval-tokens 2048" ...
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/run_lact_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
START=$(date +%s)
TRAIN_S=${TRAIN_S:-100}
ENERGY_S=${ENERGY_S:-5}
SUITE_S=${SUITE_S:-540}
RESERVE_S=${RESERVE_S:-75}
DEVICE=${DEVICE:-cuda}
RECIPES=${RECIPES:-distilgpt2 distilgpt2-lact-attn distilgpt2-lact-expert}
MODELS=${MODELS:-/tmp/nectar-lact-models}
. benchmarks/suite_steps.sh
suite_header
if [ ! -f data/corpus/built/manifest.json ]; then
  echo "no built corpus in data/corpus/built (carry it to this host)" | tee -a "$LOG"; exit 1
fi
left() { echo $(( SUITE_S - ($(date +%s) - START) )); }

for recipe in $RECIPES; do
  limit=$(( TRAIN_S + 150 )); room=$(( $(left) - RESERVE_S ))
  [ "$room" -lt "$limit" ] && limit=$room
  if [ "$limit" -lt $(( TRAIN_S + 30 )) ]; then
    echo "=== train $recipe: skipped, ${room} s left before the energy step" | tee -a "$LOG"; status=1; continue
  fi
  lact=()
  case "$recipe" in *lact-attn) [ -n "${LACT_COMPILE:-}" ] && lact=(--lact-compile "$LACT_COMPILE") ;; esac
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of options
  step "train $recipe" "$limit" "$PY" -m nectar train --recipe "$recipe" --device "$DEVICE" --time-budget-s "$TRAIN_S" \
    --out "$MODELS/$recipe" --overwrite --no-progress ${lact[@]+"${lact[@]}"} ${TRAIN_ARGS:-}
  [ -f "$MODELS/$recipe/nectar_model.json" ] && cp "$MODELS/$recipe/nectar_model.json" "$OUT/nectar_model.$recipe.json"
done

dirs=(); infos=()
for recipe in $RECIPES; do
  [ -f "$OUT/nectar_model.$recipe.json" ] && { dirs+=("$MODELS/$recipe"); infos+=("$OUT/nectar_model.$recipe.json"); }
done
if [ ${#dirs[@]} -gt 0 ]; then
  limit=$(( $(left) - 15 )); [ "$limit" -lt 45 ] && limit=45
  # shellcheck disable=SC2086  # ENERGY_ARGS is a list of options
  step energy "$limit" "$PY" benchmarks/lact_energy.py "${dirs[@]}" --device "$DEVICE" --seconds "$ENERGY_S" \
    --json-out "$OUT/energy.json" ${ENERGY_ARGS:-}
  energy=(); [ -f "$OUT/energy.json" ] && energy=(--energy "$OUT/energy.json")
  step summary 30 "$PY" scripts/lact_summary.py "${infos[@]}" "${energy[@]}" --out "$OUT/summary.json"
fi
[ "${KEEP_MODELS:-0}" = 1 ] || rm -rf "$MODELS"
find "$OUT" -name '*.safetensors' -delete      # nothing heavy comes back, whatever was pointed where
echo "suite: $(( $(date +%s) - START )) s" | tee -a "$LOG"
exit $status
