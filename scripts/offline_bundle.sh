#!/usr/bin/env bash
# Pack what `scaling` needs on a machine without network (a GPU node with PyTorch already installed):
# wheels of its dependencies for that machine's Python, and a data folder with the encoded-split cache, so the
# node needs neither PyPI, the Hugging Face hub nor `datasets`. Large files are xz-compressed; unpack on the node
# with `source scripts/offline_env.sh BUNDLE`.
#
#   bash scripts/offline_bundle.sh BUNDLE [DATA_DIR ...]
#     BUNDLE     output folder (wheels/, data/, cache/); DATA_DIR: folders to copy into data/ (e.g. ../shared/data/pd-english)
#   env: PY=3.12 (the node's Python), PACKAGES (what to fetch, default below), EXCLUDE (regex of wheels the
#        node has already, default torch/numpy/nvidia/triton), SCALING_CACHE_DIR (where this machine's cache is)
set -euo pipefail
out=${1:?usage: offline_bundle.sh BUNDLE [DATA_DIR ...]}; shift
py=${PY:-3.12}
mlflow_version=$(python3 -c "import importlib.metadata as m; print(m.version('mlflow'))")
packages=${PACKAGES:-"mlflow-skinny==$mlflow_version optuna click tqdm pyyaml sqlalchemy alembic"}
exclude=${EXCLUDE:-'^(torch|numpy|nvidia|triton)'}
mkdir -p "$out/wheels" "$out/data" "$out/cache"
# shellcheck disable=SC2086
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$out/wheels" $packages
for w in "$out"/wheels/*.whl; do
  [[ $(basename "$w") =~ $exclude ]] && rm "$w"
done
for d in "$@"; do
  mkdir -p "$out/data/$(basename "$d")"
  for f in "$d"/*; do
    dest="$out/data/$(basename "$d")/$(basename "$f")"
    if [ "$(stat -c %s "$f")" -gt 4000000 ]; then xz -T0 -6 -c "$f" > "$dest.xz"; else cp "$f" "$dest"; fi
  done
done
cache=${SCALING_CACHE_DIR:-$HOME/.cache/scaling}
for f in "$cache"/*-char128-*.npy "$cache"/baselines-*.json; do
  [ -f "$f" ] || continue
  if [ "$(stat -c %s "$f")" -gt 4000000 ]; then xz -T0 -6 -c "$f" > "$out/cache/$(basename "$f").xz"; else cp "$f" "$out/cache/"; fi
done
du -sh "$out"/*
