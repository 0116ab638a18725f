#!/usr/bin/env bash
# The serving measurements of one GPU (issue "Serving: generated tokens, continuous batching and a
# changing load"), into OUTDIR:
#   olmoe-small/            the OLMoE-style model trained here (64 experts of 128, top-8, hidden 512,
#                           4 layers; `python -m nectar.hf.train_small`, TRAIN_S seconds on the corpus)
#   serving-<trace>/        `nectar serve --backend nvml` on that model: frontier.json, steps.csv,
#                           requests.csv and plots, for the bursty and steady traces
#   suite.log               everything printed
# DRIVE=olmoe-1b-7b: serve with `--drive-shape olmoe-1b-7b` (energy of a random-weight OLMoE-1B-7B
# shape driven by the trained model's routing; DRIVE_LAYERS=N for fewer blocks; SERVE_LIMIT_S
# defaults to 1800 s a trace then: captures and steps cost the big model's time; docs/serving.md).
# Needs the built corpus (data/corpus/built: `python scripts/build_corpus.py --no-publish`). About
# TRAIN_S + 4 minutes on an H100/H200. Run from the repository root on the GPU host:
#   TRAIN_S=150 bash benchmarks/run_serving_suite.sh OUTDIR        (exit status 1 if any step failed)
set -u -o pipefail
OUT=${1:?usage: bash benchmarks/run_serving_suite.sh OUTDIR}
cd "$(dirname "$0")/.."
TRAIN_S=${TRAIN_S:-150}
REQUESTS=${REQUESTS:-48}
DRIVE_ARGS=()
[ -n "${DRIVE:-}" ] && DRIVE_ARGS=(--drive-shape "$DRIVE")
[ -n "${DRIVE:-}" ] && [ -n "${DRIVE_LAYERS:-}" ] && DRIVE_ARGS+=(--drive-layers "$DRIVE_LAYERS")
SERVE_LIMIT_S=${SERVE_LIMIT_S:-${DRIVE:+1800}}   # driven: every graph is captured for both models
. benchmarks/suite_steps.sh
suite_header
MODEL=${MODEL:-$OUT/olmoe-small}
TRAINED=0
[ -f "$MODEL/config.json" ] || TRAINED=1
[ "$TRAINED" = 0 ] || step train_olmoe $((TRAIN_S + 120)) "$PY" -m nectar.hf.train_small --out "$MODEL" \
  --device cuda --budget-s "$TRAIN_S" --no-progress
for trace in ${TRACES:-bursty steady}; do
  step "serve $trace" ${SERVE_LIMIT_S:-200} "$PY" -m nectar serve --backend nvml --model "$MODEL" --trace "$trace" \
    --requests "$REQUESTS" --rate "${RATE:-24}" --batch-max 16 --prompt-median 128 --output-median 64 \
    --prefill-chunk 256 --out "$OUT/serving-$trace${DRIVE:+-driven-$DRIVE}" --overwrite --no-progress ${DRIVE_ARGS[@]+"${DRIVE_ARGS[@]}"} ${SERVE_ARGS:-} \
    --policies "${POLICIES:-static-top8,static-top6,static-top4,static-top2,static-top1,batch-aware:8,batch-price:0.1,batch-price:0.3,top-p:0.5,nectar}"
done
# a model this suite trained keeps its 20+ MB of weights on the GPU host (config, info and logs come back);
# a MODEL you passed is left as it was
[ "$TRAINED" = 0 ] || rm -f "$MODEL/model.safetensors"
exit $status
