#!/usr/bin/env bash
# Download, on this (CPU, networked) machine, the wheels of every qtool dependency that the GPU
# machine lacks, so that scripts/dev/gpu_acceptance.sh can install qtool there without network.
#
# The GPU machine (see /work/.library/device/KINDS.md) has Python 3.12 with torch, transformers,
# typer, rich, safetensors, pyyaml, numpy, pyarrow, pandas, fsspec, xxhash and huggingface-hub,
# but not pydantic, datasets or compressed-tensors. What qtool needs from the missing ones:
#   pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions >= 4.16):
#       imported by qtool.recipe / qtool.cli at import time: required;
#   datasets (+ dill, multiprocess; its other needs are on the image): imported lazily, only when
#       a text dataset is read from the hub (qtool/data/datasets.py) or by the `offline` test
#       fixture; carried so that `pip install` metadata is complete, not needed by the GPU stages;
#   compressed-tensors (+ loguru): optional (tests importorskip it); only with --with-compressed.
# Versions come from constraints.txt (the tested versions). Each wheel is fetched with --no-deps,
# so torch and its CUDA packages are never pulled. cp312 manylinux x86_64 or pure-Python wheels.
#
#   bash scripts/dev/gpu_wheels.sh                      # -> .gpu-wheels/ (ignored by git)
#   bash scripts/dev/gpu_wheels.sh --dest DIR --with-compressed
#
# Then carry the folder in the device call: carry: [".gpu-wheels"] (see README, "GPU acceptance").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/.gpu-wheels"
WITH_COMPRESSED=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --with-compressed) WITH_COMPRESSED=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown option $1" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
CONSTRAINTS="$ROOT/constraints.txt"

PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess)
[ "$WITH_COMPRESSED" = 1 ] && PACKAGES+=(compressed-tensors loguru)

# name==version from constraints.txt, names compared as PEP 503 normalizes them
pin() {
  local want line name
  want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
  while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    name="$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')"
    if [ "$name" = "$want" ]; then echo "$1==${line#*==}"; return 0; fi
  done < "$CONSTRAINTS"
  echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2
  return 1
}

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform any)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two would stop the install there
for pkg in "${PACKAGES[@]}"; do
  spec="$(pin "$pkg")"
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>&1 \
    | grep -v "^WARNING: Location .* is ignored" || true
  # pip download fails loudly on a missing distribution; make sure the wheel is really there
  stem="$(echo "$pkg" | tr 'A-Z-' 'a-z_')"
  compgen -G "$DEST/${stem}-*.whl" >/dev/null || { echo "gpu_wheels: no wheel for $spec" >&2; exit 1; }
  echo "gpu_wheels: $spec"
done

bytes="$(cat "$DEST"/*.whl | wc -c)"
tree="$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c)"
total=$((bytes + tree))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "gpu_wheels: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(mib "$bytes") in ${DEST#"$ROOT"/}/;" \
  "with the working tree that travels ($(mib "$tree")): $(mib "$total") of the 64 MiB a device call carries"
if [ "$total" -gt $((48 * 1048576)) ]; then
  echo "gpu_wheels: over 48 MiB together: too close to the 64 MiB limit" >&2
  exit 1
fi
