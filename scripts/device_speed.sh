#!/usr/bin/env bash
# The timings of docs/performance.md (issue 5), made on one GPU machine with no network (the `device` tool).
# Needs .whl/ and .data/ in the repository root, as scripts/device_results.sh does (see its header).
#
#   BENCH_VARIANTS="compile:slots:flex:graph:cg,compile:slots:default:graph:nocg" bash scripts/device_speed.sh
#   SWEEP_RUNS="cold warm" bash scripts/device_speed.sh          # the two sweeps only
#
# BENCH_EXTRA adds options to the benchmark (e.g. "--group-steps 400 --record"); SWEEP_RUNS="" runs no sweep.
# 1. (if BENCH_VARIANTS is set) benchmarks/bench_grid.py on those train_group variants, 150 steps each;
# 2. `scaling sweep --phase $PHASE` (default 2_5) on CUDA, twice, each time into a fresh MLflow store:
#    "cold" with empty inductor/Triton caches (a first sweep on a new machine), then "warm" with the
#    caches the first left (any later sweep of the same grid shapes). Wall time of each, logs and the
#    MLflow databases go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/speed.log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export SCALING_DATA_DIR=$PWD/.data/wikitext-2-v1 SCALING_SPLITS=valid:test SCALING_CACHE_DIR=$PWD/.data/cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
if [ -n "${BENCH_VARIANTS:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-bench TRITON_CACHE_DIR=/tmp/triton-bench python3 benchmarks/bench_grid.py \
      --paths c --group-steps 150 --variants "$BENCH_VARIANTS" ${BENCH_EXTRA:-} --out "$OUT/bench.json" 2>&1 \
      | grep -v -i warn | tee -a "$LOG"
fi
for run in ${SWEEP_RUNS-cold warm}; do  # SWEEP_RUNS="" runs no sweep
  rm -rf "sweep-$run"  # a fresh store (ignored folders survive on a machine kept warm between calls)
  [ "$run" = cold ] && rm -rf /tmp/inductor-sweep /tmp/triton-sweep
  t=$(date +%s.%N)
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-sweep TRITON_CACHE_DIR=/tmp/triton-sweep timeout "${SWEEP_TIMEOUT:-300}" \
      python3 -m scaling.cli sweep --phase "${PHASE:-2_5}" --device cuda --tracking-uri "sqlite:///sweep-$run/mlflow.db" \
      --quiet 2>&1 | grep -v -i warn | tee -a "$LOG"
  echo "sweep $run: wall $(python3 -c "print(round($(date +%s.%N) - $t, 1))") s" | tee -a "$LOG"
  gzip -c "sweep-$run/mlflow.db" > "$OUT/sweep-$run-mlflow.db.gz"
done
