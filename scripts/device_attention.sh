#!/usr/bin/env bash
# The tenth round's attention measurements (docs/performance.md), on the device machine from the repository
# root, with .whl/ and .data/ carried as for scripts/device_speed.sh. Everything goes to $OUT (log.txt, the
# benchmarks' JSON, smi.csv: the GPU's clock, power and temperature every 2 s during the A/B bench).
#   bash scripts/device_attention.sh               # the attention tests (CUDA), then fused/flex/fused/flex
#   SPECS="64/-/32.64.64.32.1.4,fused:64.4.4.2" STEPS=600 bash scripts/device_attention.sh
#       # first benchmarks/bench_flex.py on those specs (FlexAttention's BLOCK/FWD/BWD or
#       # fused:BLOCK.FWD_WARPS.BWD_WARPS.STAGES); the A/B bench then runs the fastest fused spec
# 1. tests/test_attention.py (its CUDA tests) and tests/test_batched.py's CUDA/FlexAttention tests;
# 2. (SPECS) the attention alone, forward and backward, at the phase 2.5 grid's shape, per spec;
# 3. benchmarks/bench_grid.py: the whole step, fused and FlexAttention alternately, STEPS (default 3000)
#    steps each in one process (compiled cold the first time each), and a 3-step profile of the fused one.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/device_env.sh >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader | tee "$OUT/log.txt"
(timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short -W ignore tests/test_attention.py \
    tests/test_batched.py -k "cuda or flex or fused or supports or parse" 2>&1 | grep -v "^  /" | tail -30) | tee -a "$OUT/log.txt"
V="compile:slots:fused"
if [ -n "${SPECS:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR=/tmp/i1 TRITON_CACHE_DIR=/tmp/t1 timeout 200 python3 benchmarks/bench_flex.py --specs "$SPECS" \
      --out "$OUT/flex.json" 2>&1 | grep -v -i warn | tail -$(( $(tr -cd , <<<"$SPECS" | wc -c) + 4 )) | tee -a "$OUT/log.txt"
  best=$(tail -1 "$OUT/log.txt")
  case $best in fused:*) V="compile:slots:fused:graph:cg:${best#fused:}" ;; esac
fi
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 2000 > "$OUT/smi.csv" &
smi=$!
TORCHINDUCTOR_CACHE_DIR=/tmp/i3 TRITON_CACHE_DIR=/tmp/t3 timeout 330 python3 benchmarks/bench_grid.py --paths c \
    --group-steps "${STEPS:-3000}" --variants "$V,compile:slots:flex,$V,compile:slots:flex" --profile 3 --profile-variant "$V" \
    --data-dir "$PWD/.data/wikitext-2-v1" --splits valid:test --out "$OUT/bench.json" 2>&1 | grep -v -i warn \
    | grep "^\[c\|_fwd\|_bwd\|flex_attention\|total" | cut -c1-200 | tee -a "$OUT/log.txt"
kill $smi
