#!/usr/bin/env bash
# A CI job for qtool: quantize a recipe, evaluate the checkpoint against the unquantized baseline on
# the same WikiText-2 windows (and optionally lm-eval tasks) with pass/fail gates, keep the JSON.
#
#   bash examples/ci/quantize_and_gate.sh                      # the defaults below
#   RECIPE=recipes/smollm2-w4a16-gptq.yaml MAX_PPL_RATIO=1.2 TASKS=arc_easy,piqa \
#     MIN_ACC="arc_easy=0.55 piqa=0.6" bash examples/ci/quantize_and_gate.sh
#
# Settings (environment): RECIPE, BASELINE (the unquantized model the ratio is against), OUT (folder
# for the checkpoint and the JSON), DEVICE, SEQ_LEN, LIMIT (windows, and documents per task),
# MAX_PPL_RATIO, MAX_PPL, TASKS (comma-separated lm-eval tasks; needs qtool[eval]), MIN_ACC
# (space-separated TASK=ACC gates), QTOOL (the qtool command).
# Exit status, as qtool eval's: 0 every gate passed; 3 a gate failed (eval.json says which);
# 1 a user error (bad recipe, model, option: one `error:` line); anything else is a crash.
set -euo pipefail

RECIPE=${RECIPE:-recipes/smollm2-w4a4kv4-quarot.yaml}
BASELINE=${BASELINE:-smollm2-135m}
OUT=${OUT:-out/ci}
DEVICE=${DEVICE:-auto}
SEQ_LEN=${SEQ_LEN:-2048}
LIMIT=${LIMIT:-32}
MAX_PPL_RATIO=${MAX_PPL_RATIO:-2.2}
MAX_PPL=${MAX_PPL:-}
TASKS=${TASKS:-}
MIN_ACC=${MIN_ACC:-}
QTOOL=${QTOOL:-qtool}

mkdir -p "$OUT"
echo "== quantize $RECIPE -> $OUT/checkpoint"
$QTOOL quantize "$RECIPE" --output "$OUT/checkpoint" --overwrite --device "$DEVICE" --json "$OUT/quantize.json"

args=(eval "$BASELINE" "$OUT/checkpoint" --ppl wikitext2 --seq-len "$SEQ_LEN" --limit "$LIMIT"
      --device "$DEVICE" --max-ppl-ratio "$MAX_PPL_RATIO" --json "$OUT/eval.json")
[[ -n "$MAX_PPL" ]] && args+=(--max-ppl "$MAX_PPL")
[[ -n "$TASKS" ]] && args+=(--tasks "$TASKS")
for gate in $MIN_ACC; do args+=(--min-acc "$gate"); done

echo "== $QTOOL ${args[*]}"
status=0
$QTOOL "${args[@]}" || status=$?
case $status in
  0) echo "== gates passed; results in $OUT/eval.json" ;;
  3) echo "== a gate failed; results in $OUT/eval.json" >&2 ;;
  *) echo "== qtool eval failed with status $status" >&2 ;;
esac
exit $status
