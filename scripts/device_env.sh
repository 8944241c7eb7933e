# Sourced by scripts/device_speed.sh and scripts/device_results.sh (bash, from the repository root): the
# set-up both need on the device machine, which has PyTorch but no mlflow/optuna/click/datasets and no network.
#   - the wheels in .whl/ installed into /tmp/site (skipped with SKIP_WHEELS=1, e.g. for a dry run on CPU);
#   - bytecode written for torch and the wheels: the device machine sets PYTHONDONTWRITEBYTECODE=1 and its
#     torch has no __pycache__, so every process compiled torch's and mlflow's sources again (imports
#     19-22 s instead of 8.4-8.7 s, measured; docs/performance.md "Bytecode"). A normal install has
#     bytecode (pip writes it), so it is written once here, before anything is timed (~17 s);
#   - the environment: PYTHONPATH, the WikiText-2 copy in .data/ (train on valid, validate on test).
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m compileall -q -j 0 "$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" \
      /tmp/site "$PWD/scaling" >/dev/null 2>&1 || echo "warning: compileall reported errors: some imports may compile their sources"
fi
export PYTHONPATH=/tmp/site:$PWD MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export SCALING_DATA_DIR=$PWD/.data/wikitext-2-v1 SCALING_SPLITS=valid:test SCALING_CACHE_DIR=$PWD/.data/cache
