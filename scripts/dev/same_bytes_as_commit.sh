#!/usr/bin/env bash
# Quantize the same recipe with this checkout and with an older commit (a temporary git worktree)
# and compare the checkpoints byte for byte: the "results must not change" check of a speed-up.
#
#   scripts/dev/same_bytes_as_commit.sh COMMIT [RECIPE ...]
#
# Default recipes: SmolLM2 W4A16 g64 GPTQ (act-order) and W4A4 rotate + GPTQ, calibration 8 x 256
# (small, so both run in a few minutes on a CPU). Prints one line per recipe: SAME or DIFFERENT.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
commit=${1:?usage: $0 COMMIT [RECIPE ...]}
shift
work=$(mktemp -d)
wt="$work/worktree"
git -C "$repo" worktree add --detach "$wt" "$commit" >/dev/null
trap 'git -C "$repo" worktree remove --force "$wt"; rm -rf "$work"' EXIT
export QTOOL_DATA_DIR=${QTOOL_DATA_DIR:-$repo/../shared/data} QTOOL_NO_PROGRESS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
recipes=("$@")
if [ ${#recipes[@]} -eq 0 ]; then
  cat > "$work/w4a16.yaml" <<'YAML'
model: smollm2-135m
device: cpu
calibration: {samples: 8, seq_len: 256}
scheme: {preset: W4A16, weights: {bits: 4, group_size: 64}}
steps: [{gptq: {act_order: true, mse_clip: false}}]
YAML
  cat > "$work/w4a4.yaml" <<'YAML'
model: smollm2-135m
device: cpu
calibration: {samples: 8, seq_len: 256}
scheme: {preset: W4A4, weights: {bits: 4, group_size: null}, activations: {bits: 4, clip_ratio: 0.9}}
steps: [rotate, {gptq: {act_order: true, mse_clip: true}}]
YAML
  recipes=("$work/w4a16.yaml" "$work/w4a4.yaml")
fi
status=0
for r in "${recipes[@]}"; do
  name=$(basename "$r" .yaml)
  (cd "$wt" && PYTHONPATH="$wt" "$repo/.venv/bin/python" -m qtool quantize "$(realpath "$r")" --output "$work/old-$name" >/dev/null)
  (cd "$repo" && "$repo/.venv/bin/python" -m qtool quantize "$(realpath "$r")" --output "$work/new-$name" >/dev/null)
  if diff -rq "$work/old-$name" "$work/new-$name" >/dev/null; then
    echo "SAME       $name ($commit vs working tree)"
  else
    echo "DIFFERENT  $name ($commit vs working tree)"; diff -rq "$work/old-$name" "$work/new-$name" || true; status=1
  fi
done
exit $status
