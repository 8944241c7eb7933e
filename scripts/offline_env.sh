# Source on a machine without network, from the repository root: `source scripts/offline_env.sh BUNDLE`
# (a folder made by scripts/offline_bundle.sh). Unpacks its xz files, installs its wheels into the current
# Python environment (resolving against what is installed, so PyTorch stays the node's own), writes bytecode for
# them (a machine that runs with PYTHONDONTWRITEBYTECODE would otherwise compile their sources at every start),
# and exports SCALING_DATA_DIR and SCALING_CACHE_DIR pointing into the bundle.
bundle=${1:?usage: source scripts/offline_env.sh BUNDLE}
for f in $(find "$bundle" -name '*.xz'); do
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], 'wb'))" "$f" \
    && rm "$f"
done
if ls "$bundle"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links "$bundle/wheels" --no-cache-dir \
      $(ls "$bundle"/wheels/*.whl | sed -E 's#.*/([^-]+)-.*#\1#' | sort -u) || return 1
  python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
      "$PWD/scaling" >/dev/null 2>&1 || true
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SCALING_DATA_DIR=$bundle/data SCALING_CACHE_DIR=$bundle/cache
export MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
