#!/usr/bin/env bash
# The timings of docs/performance.md (issue 5), made on one GPU machine with no network (the `device` tool).
# Needs .whl/ and .data/ in the repository root, as scripts/device_results.sh does (see its header).
#
#   BENCH_VARIANTS="compile:slots:flex:graph:cg,compile:slots:default:graph:nocg" bash scripts/device_speed.sh
#   SWEEP_RUNS="cold warm" bash scripts/device_speed.sh          # the two sweeps only
#
# FLEX_BENCH=1 first runs benchmarks/bench_flex.py on its candidates (or on the specs FLEX_BENCH lists); "@FLEX"
# in BENCH_VARIANTS then stands for its fastest spec (BENCH_VARIANTS="compile:slots:flex:graph:cg,compile:slots:flex:graph:cg:@FLEX").
# BENCH_EXTRA adds options to the benchmark (e.g. "--group-steps 400 --record"); SWEEP_RUNS="" runs no sweep.
# SWEEP_ARGS adds options to every sweep (e.g. "--compile-mode max-autotune"); a word "KIND@MODE" of SWEEP_RUNS
# runs that sweep with --compile-mode MODE (SWEEP_RUNS="warm@max-autotune cold").
# 1. (if BENCH_VARIANTS is set) benchmarks/bench_grid.py on those train_group variants, 150 steps each;
# 2. `scaling sweep --phase $PHASE` (default 2_5) on CUDA, once per word of SWEEP_RUNS, each time into a
#    fresh MLflow store: "cold" with empty inductor/Triton caches (a first sweep on a new machine),
#    "warm" with the caches an earlier one left (any later sweep of the same grid shapes), "prime" =
#    cold caches, stopped after PRIME_TIMEOUT seconds (default 450: it only fills the caches, and its
#    store times the cold compile; with --compile-mode max-autotune it must get past the first evaluation,
#    step 500, which took more than 400 s), "profile" = warm, under cProfile, stopped after PROFILE_TIMEOUT
#    (default 60) seconds (stats to $OUT/sweep-profile.prof), "probe" = warm, through scripts/lead_probe.py
#    (how far the host runs ahead of the GPU, to $OUT/lead-probe.json), "exit" = warm, through scripts/exit_probe.py
#    (where the end goes, to $OUT/exit-exit.json). Wall time of each, logs and the MLflow
#    databases go to $OUT. (The caches cannot come back through $OUT: packed, they were 18 MB, over its
#    limit; a warm sweep needs a cold one or a prime before it on the same machine.)
#    A word ending in "+old" ("warm+old") runs that sweep with the package in $OLD_CODE (default build/old,
#    made by `mkdir -p build/old && git archive COMMIT scaling | tar -x -C build/old`, carried as "build"):
#    an earlier commit against this one on the same machine.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/speed.log"
source scripts/device_env.sh  # wheels, bytecode (written before anything is timed), data (not in a pipe: it exports)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
if [ -n "${FLEX_BENCH:-}" ]; then  # FLEX_BENCH=1: the built-in candidates; else a comma-separated list of specs
  specs=(); [ "$FLEX_BENCH" != 1 ] && specs=(--specs "$FLEX_BENCH")
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-flex TRITON_CACHE_DIR=/tmp/triton-flex python3 benchmarks/bench_flex.py \
      ${specs[@]+"${specs[@]}"} --out "$OUT/flex.json" 2>&1 | grep -v -i warn | tee -a "$LOG" "$OUT/flex.txt"
  BEST_FLEX=$(tail -1 "$OUT/flex.txt")  # the fastest spec that matched the first
  [[ "$BEST_FLEX" =~ ^[-0-9./]+$ ]] || BEST_FLEX=""  # none: train_group's default options
  echo "fastest flex spec: $BEST_FLEX" | tee -a "$LOG"
fi
if [ -n "${BENCH_VARIANTS:-}" ]; then  # "@FLEX" in a variant: the flex bench's fastest spec
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-bench TRITON_CACHE_DIR=/tmp/triton-bench python3 benchmarks/bench_grid.py \
      --paths c --group-steps 150 --variants "${BENCH_VARIANTS//@FLEX/${BEST_FLEX:-}}" ${BENCH_EXTRA:-} \
      --out "$OUT/bench.json" 2>&1 | grep -v -i warn | tee -a "$LOG"
fi
for word in ${SWEEP_RUNS-cold warm}; do  # SWEEP_RUNS="" runs no sweep
  code=$PWD
  case $word in *+old) word=${word%+old}; code=$PWD/${OLD_CODE:-build/old} ;; esac
  [ -d "$code/scaling" ] || { echo "no package in $code"; continue; }
  [ "$code" != "$PWD" ] && python3 -m compileall -q "$code/scaling" >/dev/null 2>&1  # as device_env.sh does ours
  run=${word%@*} mode_args=()  # "warm@max-autotune": this sweep with --compile-mode max-autotune
  [ "$word" != "$run" ] && mode_args=(--compile-mode "${word#*@}")
  name=${word//@/-}$([ "$code" != "$PWD" ] && echo -old)
  rm -rf "sweep-$name"  # a fresh store (ignored folders survive on a machine kept warm between calls)
  # KEEP_CACHES=1: a prime keeps what an earlier one of another code filled (two codes primed on one machine)
  case $run in cold|prime) [ -n "${KEEP_CACHES:-}" ] || rm -rf /tmp/inductor-sweep /tmp/triton-sweep ;; esac
  limit=${SWEEP_TIMEOUT:-300}
  # -P: the package comes from PYTHONPATH alone. Without it `python3 -m` puts the working directory first
  # on sys.path, and "+old" sweeps ran this checkout's package, not $OLD_CODE's (rounds 7-9; found in the tenth)
  cli=(python3 -P -m scaling.cli)
  case $run in
    prime) limit=${PRIME_TIMEOUT:-450} ;;
    profile) limit=${PROFILE_TIMEOUT:-60}; cli=(python3 -P -m cProfile -o "$OUT/sweep-profile.prof" -m scaling.cli) ;;
    probe) cli=(python3 scripts/lead_probe.py --out "$OUT/lead-$name.json" --) ;;  # warm, the host's lead noted
    exit) cli=(python3 scripts/exit_probe.py --out "$OUT/exit-$name.json" --) ;;  # warm, where its end goes
  esac
  t=$(date +%s.%N)
  # SIGINT (not SIGTERM) at the limit: cProfile writes its stats on KeyboardInterrupt. The output goes to a
  # file, not a pipe: the wall time ends when the command's process does, as a user's `time scaling sweep`
  # does (until the ninth round a pipe, which also waited for inductor's compile-worker sidecar to close it)
  PYTHONPATH=/tmp/site:$code TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-sweep TRITON_CACHE_DIR=/tmp/triton-sweep \
      timeout -s INT -k 30 "$limit" \
      "${cli[@]}" sweep --phase "${PHASE:-2_5}" --device cuda --tracking-uri "sqlite:///sweep-$name/mlflow.db" \
      --quiet ${SWEEP_ARGS:-} ${mode_args[@]+"${mode_args[@]}"} > "$OUT/sweep-$name.txt" 2>&1
  e=$(date +%s.%N)  # start and end (epoch s): against the parent run's in the store (scripts/sweep_stats.py)
  for _ in $(seq 600); do pgrep -f torch._inductor.compile_worker >/dev/null || break; sleep 0.05; done
  w=$(date +%s.%N)  # when the compile workers (the sidecar and its pool) had gone too
  grep -v -i warn "$OUT/sweep-$name.txt" | tail -40 | tee -a "$LOG"
  echo "sweep $name: wall $(python3 -c "print(round($e - $t, 1))") s (start $t end $e; compile workers gone" \
       "$(python3 -c "print(round($w - $e, 2))") s later)" | tee -a "$LOG"
  # the stores come back (a prime's only without KEEP_STORES=warm: at most 8 files return from the device)
  [ "$run" = prime ] && [ "${KEEP_STORES:-all}" = warm ] && continue
  [ -f "sweep-$name/mlflow.db" ] && gzip -c "sweep-$name/mlflow.db" > "$OUT/sweep-$name-mlflow.db.gz"
done
