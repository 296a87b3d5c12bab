#!/usr/bin/env bash
# Everything a first CUDA GPU should check, in one command of under 8 minutes:
#   1. the gpu tests (pytest -m gpu);
#   2. every shipped config fitted on the GPU for a few epochs, resumed from its last.ckpt for one
#      more, then validate, test and predict from the resumed run's last.ckpt;
#   3. host synchronisations per training step (benchmarks/count_syncs.py);
#   4. explicit against implicit (cold, warm-started) epochs (benchmarks/bench_device.py).
# summary.md and four logs go to the folder given as argument, else $OUT, else a new folder under
# /tmp; the runs, checkpoints and TMPDIR to a work folder under /tmp.
#
#   benchmarks/gpu_check.sh [DIR]         # on the GPU
#   benchmarks/gpu_check.sh --cpu [DIR]   # the same commands on the CPU, tiny (checks them
#                                         # without a GPU)
#
# PYTHON names the interpreter (default .venv/bin/python, else python3). Where irnet is not
# installed, `pip install --no-deps -e .` installs it, after any wheels lying in .whl/ (this
# workplace's GPU image lacks jsonargparse and its helpers: docs/benchmarks.md §5).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
if [[ ${1:-} == --cpu ]]; then MODE=cpu; shift; fi
DIR=$(realpath -m "${1:-${OUT:-/tmp/gpu_check.$(date +%Y%m%d-%H%M%S)}}")
WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
mkdir -p "$DIR" "$WORK/tmp"
export TMPDIR=$WORK/tmp PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3); fi
CONFIGS=(ex1_sine ex1_sine_100 ex2_spirals digits)

if [[ $MODE == gpu ]]; then
  DEVICE=cuda EPOCHS=2
  TRAINER=(--trainer.accelerator gpu --trainer.devices 1)
  BENCH=(--warmup 2 --epochs 5)
else  # a dry run: one epoch of two batches per fit, one config timed
  DEVICE=cpu EPOCHS=1
  TRAINER=(--trainer.accelerator cpu --trainer.devices 1 --trainer.limit_train_batches 2
           --trainer.limit_val_batches 2 --trainer.limit_test_batches 2 --trainer.limit_predict_batches 2)
  BENCH=(--configs ex1_sine --warmup 1 --epochs 1)
fi

if ! "$PY" -c "import irnet.datamodules, jsonargparse" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then "$PY" -m pip install -q --no-index --no-deps .whl/*.whl; fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')")
if [[ $MODE == gpu && $CARD == "no CUDA device" ]]; then echo "no CUDA device here: use --cpu" >&2; exit 2; fi
TORCH=$("$PY" -c "import torch; print(torch.__version__)")
echo "gpu_check ($MODE): $CARD, torch $TORCH; results in $DIR, runs in $WORK"

FAILED=0
# run LABEL LOG LIMIT CMD...: CMD's output goes to LOG; sets RESULT to "ok N s" or "FAILED (status)".
run() {
  local label=$1 log=$2 limit=$3 start=$SECONDS; shift 3
  echo "### $label: $*" >>"$log"
  if timeout "$limit" "$@" >>"$log" 2>&1; then RESULT="ok $((SECONDS - start)) s"
  else RESULT="FAILED ($?)"; FAILED=1; tail -n 20 "$log" >&2; fi
  echo "  $label: $RESULT"
}
# irnet VERSION SUB ARGS...: `python -m irnet SUB` on config $c with the mode's trainer, logging to
# runs/$c/VERSION/; its result joins $row.
irnet() {
  local version=$1 sub=$2; shift 2
  run "$c $version" "$DIR/cli.log" 300 "$PY" -m irnet "$sub" --config "$ROOT/configs/$c.yaml" "${TRAINER[@]}" \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$WORK/lightning" \
    --trainer.logger.init_args.version "$version" "$@"
  row+=" | $RESULT"
}

echo "1. gpu tests"
run "pytest -m gpu" "$DIR/tests.log" 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
TESTS="$RESULT: $(tail -n 1 "$DIR/tests.log")"

echo "2. fit, resume, validate, test, predict"
ROWS=""
cd "$WORK"  # runs/<config>/<version>/ land here
for c in "${CONFIGS[@]}"; do
  row="| $c"
  irnet fit fit --trainer.max_epochs "$EPOCHS"
  irnet resume fit --trainer.max_epochs $((EPOCHS + 1)) --ckpt_path "runs/$c/fit/checkpoints/last.ckpt"
  for sub in validate test predict; do
    irnet "$sub" "$sub" --ckpt_path "runs/$c/resume/checkpoints/last.ckpt"
  done
  [[ -f runs/$c/predict/predictions.pt ]] || { row+=" (no predictions.pt)"; FAILED=1; }
  ROWS+="$row |"$'\n'
done
cd "$ROOT"

echo "3. host syncs per training step"
run "count_syncs.py" "$DIR/syncs.log" 300 "$PY" benchmarks/count_syncs.py --device "$DEVICE"
echo "4. epochs: explicit, implicit cold, implicit warm"
run "bench_device.py" "$DIR/bench.log" 300 "$PY" benchmarks/bench_device.py --device "$DEVICE" "${BENCH[@]}"

{
  echo "# gpu_check ($MODE): $CARD, torch $TORCH, $(date -u +%Y-%m-%dT%H:%MZ), $SECONDS s"
  echo
  echo "1. gpu tests: $TESTS"
  echo
  echo "2. fit $EPOCHS epoch(s), resume for 1 more, then validate, test, predict from the resumed last.ckpt:"
  echo
  echo "| config | fit | resume | validate | test | predict |"
  echo "|---|---|---|---|---|---|"
  printf "%s" "$ROWS"
  echo
  echo "3. host syncs per training step (syncs.log):"
  echo
  grep -E '^(\||tests/)' "$DIR/syncs.log" || echo "(no table: see syncs.log)"
  echo
  echo "4. epochs (bench.log):"
  echo
  grep -E '^(\||# [^ ])' "$DIR/bench.log" || echo "(no table: see bench.log)"
} >"$DIR/summary.md"
cat "$DIR/summary.md"
echo "results in $DIR (summary.md, tests.log, cli.log, syncs.log, bench.log); runs in $WORK"
exit "$FAILED"
