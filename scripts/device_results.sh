#!/usr/bin/env bash
# The real results of docs/results.md, made on one GPU machine with no network (the `device` tool).
#
# Needs, in the repository root (both git-ignored):
#   .whl/   wheels the GPU machine lacks (mlflow-skinny, optuna, sqlalchemy, alembic, ... for Python 3.12)
#   .data/  wikitext-2-v1/wiki.{valid,test}.tokens (from ../shared/data) and cache/ (their encoded .npy,
#           made here by any `scaling train`), so the machine needs neither `datasets` nor the hub.
# Optional: .devrun/*.db.gz  the MLflow/Optuna/sweep databases of an earlier call, to continue from.
#
#   SWEEP_PHASES="2_5 3a" SEARCH_PHASES="2_5 3a" LATE_SWEEP_PHASES="2_5_tokens" DEADLINE=560 \
#       bash scripts/device_results.sh        (SWEEP_EXTRA="--retry-failed" to rerun failed configs)
#
# Sweeps each phase (all configs in one batched, compiled pass), then runs `scaling search` on the
# batch sizes whose optimum sat on the grid's edge, while time is left; writes the logs, the compare
# JSON and the gzipped databases to $OUT. A step cut short by the deadline loses no finished run.
set -uo pipefail
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" mlruns
LOG="$OUT/results.log"
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}  # e.g. "--steps 3" for a dry run on CPU (DEVICE=cpu SKIP_WHEELS=1)
source scripts/device_env.sh  # wheels, bytecode, PYTHONPATH and the data (SKIP_WHEELS=1: none installed)
for f in .devrun/*.db.gz; do [ -f "$f" ] && gunzip -c "$f" > "mlruns/$(basename "$f" .gz)"; done
S="python3 -m scaling.cli"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
sweep() {  # sweep PHASE...: each phase's grid in one batched, compiled pass
  for phase in "$@"; do
    [ "$(left)" -gt 60 ] || { say "no time left to sweep phase $phase"; continue; }
    say "sweep $phase (time left $(left)s)"
    t=$(date +%s)
    timeout "$(left)" $S sweep --phase "$phase" --device "$DEVICE" $EXTRA ${SWEEP_EXTRA:-} --quiet 2>&1 \
        | grep -v -E "Warning|warn\(" | tee -a "$LOG"
    say "sweep $phase wall $(( $(date +%s) - t ))s"
  done
}
sweep ${SWEEP_PHASES:-}
for phase in ${SEARCH_PHASES:-}; do
  $S compare --phases "$phase" --format json --no-mlflow --bootstrap 0 > "/tmp/cmp_$phase.json" 2>>"$LOG" || continue
  bs=$(python3 -c "import json,sys; d=json.load(open('/tmp/cmp_$phase.json')); print(','.join(sorted({str(x['batch_size']) for p in d['phases'] for x in p['needs_search_past_edge']}, key=int)))")
  [ -n "$bs" ] || { say "phase $phase: no censored optimum, no search needed"; continue; }
  [ "$(left)" -gt 60 ] || { say "no time left to search phase $phase (B=$bs)"; continue; }
  say "search phase $phase B=$bs (time left $(left)s)"
  t=$(date +%s)
  timeout "$(left)" $S search --phase "$phase" --batch-sizes "$bs" --trials "${SEARCH_TRIALS:-8}" --batch 4 --sampler-seed 0 \
      --device "$DEVICE" $EXTRA --quiet 2>&1 | grep -v -E "Warning|warn\(" | tee -a "$LOG"
  say "search $phase wall $(( $(date +%s) - t ))s"
done
sweep ${LATE_SWEEP_PHASES:-}  # after the searches: what only runs if time is left
for db in mlruns/*.db; do gzip -c "$db" > "$OUT/$(basename "$db").gz"; done
say "done"
