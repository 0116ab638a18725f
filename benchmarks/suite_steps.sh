# Sourced by the GPU benchmark suites (run_gpu_suite.sh, run_machinery_suite.sh, run_serving_suite.sh)
# from the repository root, after they set OUT (the output folder); it creates OUT and sets LOG (the
# suite's log file, OUT/suite.log), PY (the Python to run: $PYTHON or python) and PYTHONPATH:
#   suite_header                  date, the GPU and the torch/transformers versions, into $LOG
#   step NAME LIMIT_S CMD [ARG…]  CMD under a time limit (SIGINT, then KILL 10 s later), its output
#                                 teed into $LOG with its exit status and seconds; status=1 on failure
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
PY=${PYTHON:-python}
status=0

suite_header() {
  { date; nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,temperature.gpu --format=csv 2>&1;
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; } 2>&1 | tee -a "$LOG"
}

step() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}
