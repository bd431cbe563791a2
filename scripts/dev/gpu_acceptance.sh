#!/usr/bin/env bash
# GPU acceptance in one prepared run (issue 18): on a bare GPU machine with no network, install
# qtool from carried wheels, build the CUDA extension, run every GPU test and benchmark, and write
# a summary table. Stages, in order, each with its own timeout and a UTC time stamp:
#
#   env              nvidia-smi (clocks, driver), nvcc, torch / CUDA versions, package versions
#   install          pip install --no-index --no-deps the wheels in .gpu-wheels/ (made on the CPU
#                    machine by scripts/dev/gpu_wheels.sh), then pip install --no-deps -e .
#   kernels          `make kernels` equivalent: pip install --no-build-isolation -e kernels_cuda
#   pytest           pytest -m gpu (junit xml), the kernel-vs-reference cases and the packed ones
#   bench_matmul     qtool bench matmul --json        (W4A16 vs FP16 cuBLAS)
#   bench_w4a4       qtool bench w4a4 --json          (W4A4 incl. activation quantization)
#   bench_attention  qtool bench attention --json     (int4-KV decode vs SDPA, 16-bit cache)
#   bench_generate   qtool bench generate --json      (Llama-2-7B shape, 16-bit vs W4A16 + KV4)
#   quantize         python -m scripts.bench.bench_quantize --shape llama2-7b --device cuda
#
# A failing stage does not stop the later ones. Everything goes under one folder (default $OUT
# when set, else out/gpu_acceptance): summary.md (the table, rewritten after every stage, so a run
# cut short still leaves one), summary.json (every stage and every benchmark JSON), console.log,
# and the stage logs / JSONs / junit xml, in stages/ or, when the folder is $OUT, packed into
# stages.tar.gz (the device tool brings back at most 8 files).
#
# Time: the whole run must fit in 10 minutes of GPU time. A budget (--budget, default 540 s) is
# shared out: each stage gets at most its own timeout and never eats the minimum the later stages
# need; a stage left with less than its minimum is "skipped (time budget)". Trimmed to fit:
#   - the extension is built for the present GPU only (TORCH_CUDA_ARCH_LIST=9.0a on an H200)
#     instead of setup.py's "8.0;9.0a" (the sm_80 build is compile-checked on CPU by
#     scripts/dev/check_cuda_build.sh);
#   - bench matmul and w4a4: --iters 20 (default 50); bench attention: --iters 10 (default 20);
#     every shape, row count, context and batch is kept;
#   - bench generate: --new-tokens 32 (default 64); shape, batches 1 and 16 and context 4096 kept;
#   - bench_quantize: --samples 32 --seq-len 512 (its defaults: 128 x 512); the GPTQ solve per
#     linear does not depend on the sample count, the calibration forwards scale with it;
#   - pytest: nothing trimmed; the packed-checkpoint perplexity test skips itself because the
#     SmolLM2 package (98 MB) does not travel.
# Override with ITERS_MATMUL, ITERS_W4A4, ITERS_ATTENTION, GENERATE_NEW_TOKENS, QUANTIZE_SAMPLES,
# QUANTIZE_SEQ_LEN, TORCH_CUDA_ARCH_LIST.
#
# --dry-run (or no CUDA device): the GPU-only stages are "skipped (no GPU)"; everything else runs:
# the environment report, a check of the wheel folder (nothing is installed), pytest -m gpu (its
# cases skip; --collect-only to only collect them), and each bench command, which must stop with
# its clean "needs a CUDA device" error (a traceback fails the stage); bench_quantize shows --help.
#
#   bash scripts/dev/gpu_acceptance.sh                       # on the GPU machine (writes to $OUT)
#   bash scripts/dev/gpu_acceptance.sh --dry-run --out /tmp/ga --collect-only     # on CPU
#   bash scripts/dev/gpu_acceptance.sh --only install,kernels,pytest          # a subset
#
# Options: --dry-run, --out DIR, --collect-only, --budget SECONDS, --only STAGE[,STAGE...],
#          --wheels DIR (default .gpu-wheels), --pytest-workers N (pytest-xdist on GPU, default
#          4, 0 = serial), --pack / --no-pack (default: pack when the folder is $OUT).
# The GPU session starts with the device tool's run, carry [".gpu-wheels"], timeout_s 600,
# command: bash scripts/dev/gpu_acceptance.sh   (see README, "GPU acceptance").
# shellcheck disable=SC2329  # the stage_* functions are called as "stage_$name"
set -uo pipefail  # no -e: a failing stage must not stop the later ones

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2

DRY=0 COLLECT_ONLY=0 OUT_DIR="" BUDGET=540 ONLY="" PACK=auto WORKERS=4
WHEELS="$ROOT/.gpu-wheels"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --collect-only) COLLECT_ONLY=1; shift ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    --wheels) WHEELS="$(cd "$2" 2>/dev/null && pwd || echo "$2")"; shift 2 ;;
    --pytest-workers) WORKERS="$2"; shift 2 ;;
    --pack) PACK=1; shift ;;
    --no-pack) PACK=0; shift ;;
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DIR="${OUT_DIR:-${OUT:-$ROOT/out/gpu_acceptance}}"
mkdir -p "$DIR" && DIR="$(cd "$DIR" && pwd)" || exit 2
if [ "$PACK" = auto ]; then
  PACK=0
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" = "$DIR" ]; then PACK=1; fi
fi
if [ "$PACK" = 1 ]; then
  WORK="$(mktemp -d)/stages"
else
  WORK="$DIR/stages"
  rm -rf "$WORK"
fi
mkdir -p "$WORK"
rm -f "$DIR/summary.md" "$DIR/summary.json" "$DIR/stages.tar.gz" "$DIR/console.log"
RECORDS="$WORK/stages.tsv"
: > "$RECORDS"
exec > >(tee -a "$DIR/console.log") 2>&1

export PYTHONUNBUFFERED=1 QTOOL_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there: fail fast
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

utc() { date -u +%Y-%m-%dT%H:%M:%SZ; }
STARTED="$(utc)"
T0=$SECONDS
DEADLINE=$((SECONDS + BUDGET))

if [ "$DRY" = 1 ]; then
  GPU=0 WHY="--dry-run"
elif [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" = 1 ]; then
  GPU=1 WHY=""
else
  GPU=0 WHY="no CUDA device"
fi
MODE=$([ "$GPU" = 1 ] && echo gpu || echo "dry run ($WHY)")
echo "gpu_acceptance: $(utc) mode: $MODE; python $PY; output $DIR; budget ${BUDGET}s"

STAGES=(env install kernels pytest bench_matmul bench_w4a4 bench_attention bench_generate quantize)
declare -A MAXT=([env]=60 [install]=120 [kernels]=300 [pytest]=240 [bench_matmul]=90 [bench_w4a4]=90
  [bench_attention]=90 [bench_generate]=180 [quantize]=300)
declare -A MINT=([env]=10 [install]=20 [kernels]=60 [pytest]=30 [bench_matmul]=20 [bench_w4a4]=20
  [bench_attention]=20 [bench_generate]=40 [quantize]=60)
NO_GPU="skipped (no GPU)"

selected() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

# run a command under a timeout, appending its output to the stage log; returns its exit status
run_t() {
  local t="$1" log="$2"
  shift 2
  echo "\$ $*" >>"$log"
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
}

# --- stages: each sets ST (status) and NOTE; arguments: timeout, log -------------------------
stage_env() {
  local t="$1" log="$2"
  {
    echo "date (UTC): $(utc)"
    uname -a
    echo "cpus: $(nproc)"
    free -g 2>/dev/null | head -2
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git')"
    echo "python: $PY"
    if command -v nvidia-smi >/dev/null; then
      timeout 30 nvidia-smi
      timeout 30 nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,persistence_mode
      timeout 30 nvidia-smi -q -d CLOCK
    else
      echo "nvidia-smi: not found"
    fi
    if command -v nvcc >/dev/null; then nvcc --version; else echo "nvcc: not found"; fi
  } >>"$log" 2>&1
  run_t "$t" "$log" "$PY" - "$WORK/env.json" <<'PY'
import json, platform, shutil, subprocess, sys
from importlib import metadata

import torch

info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "packages": {}}
for name in ("transformers", "typer", "rich", "safetensors", "PyYAML", "numpy", "pydantic",
             "pydantic_core", "datasets", "compressed-tensors", "pytest", "pytest-xdist", "qtool"):
    try:
        info["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info["packages"][name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
if shutil.which("nvidia-smi"):
    fields = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        info["nvidia_smi"] = dict(zip(fields.split(","), (v.strip() for v in out.split(","))))
    except (OSError, subprocess.SubprocessError, IndexError):
        info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
PY
  local rc=$?
  if [ "$rc" -ne 0 ]; then ST="FAIL" NOTE="torch report failed (rc $rc)"; return; fi
  ST=ok
  NOTE="$("$PY" -c 'import json,sys; i=json.load(open(sys.argv[1])); s=i.get("nvidia_smi") or {}
print(", ".join(x for x in [i.get("device") or "no CUDA device", s.get("driver_version") and "driver " + s["driver_version"],
  s.get("clocks.sm") and "SM clock " + s["clocks.sm"] + " (max " + s.get("clocks.max.sm", "?") + ")",
  "torch " + i["torch"], "CUDA " + str(i["cuda"]), "Python " + i["python"]] if x))' "$WORK/env.json")"
}

CORE_WHEELS=(pydantic pydantic_core annotated_types typing_inspection typing_extensions)

stage_install() {
  local t="$1" log="$2" n missing=() w
  n=$(find "$WHEELS" -maxdepth 1 -name '*.whl' 2>/dev/null | wc -l)
  for w in "${CORE_WHEELS[@]}"; do
    [ "$(find "$WHEELS" -maxdepth 1 -name "${w}-*.whl" 2>/dev/null | wc -l)" = 1 ] || missing+=("$w")
  done
  find "$WHEELS" -maxdepth 1 -name '*.whl' -printf '%f %s bytes\n' >>"$log" 2>/dev/null
  local wheels_note="$n wheels in ${WHEELS#"$ROOT"/}"
  [ "$n" -gt 0 ] || wheels_note="wheel folder ${WHEELS#"$ROOT"/} missing or empty (run scripts/dev/gpu_wheels.sh)"
  [ ${#missing[@]} -eq 0 ] || wheels_note="$wheels_note; not exactly one wheel of: ${missing[*]}"
  if [ "$GPU" = 0 ]; then
    if ! run_t "$t" "$log" "$PY" -c 'import qtool.cli, qtool.recipe; print("qtool imports here")'; then ST=FAIL NOTE="qtool does not import here; $wheels_note"; return; fi
    if [ "$n" -gt 0 ] && [ ${#missing[@]} -eq 0 ]; then
      ST=ok NOTE="dry run: $wheels_note checked, nothing installed"
    else
      ST=warn NOTE="dry run: $wheels_note"
    fi
    return
  fi
  local rc_w=0 rc_e rc_i
  if [ "$n" -gt 0 ]; then
    run_t "$t" "$log" "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" "$WHEELS"/*.whl
    rc_w=$?
  fi
  run_t "$t" "$log" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  rc_e=$?
  run_t 120 "$log" "$PY" -c 'import pydantic, qtool.cli, qtool.recipe; print("qtool imports, pydantic", pydantic.VERSION)'
  rc_i=$?
  run_t 60 "$log" "$PY" -c 'import datasets; print("datasets", datasets.__version__)'
  local ds=$?
  run_t 60 "$log" "$PY" -m pip check
  NOTE="$wheels_note; wheels rc $rc_w, editable qtool rc $rc_e; import datasets $([ "$ds" = 0 ] && echo ok || echo 'fails (only needed to read hub datasets)')"
  if [ "$rc_i" -ne 0 ]; then ST=FAIL NOTE="qtool does not import; $NOTE"; else ST=ok; fi
}

stage_kernels() {
  local t="$1" log="$2"
  if [ "$GPU" = 0 ]; then
    ST="$NO_GPU" NOTE="nvcc here: $(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo 'not found')"
    return
  fi
  local arch
  arch="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}" + ("a" if m == 9 else ""))')}"
  (
    cd kernels_cuda || exit 2
    export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    run_t "$t" "$log" "$PY" -m pip install -v --no-index --no-deps --no-build-isolation -e .
  )
  local rc=$?
  run_t 120 "$log" "$PY" -c 'import qtool.ops as o; print("backend:", o.backend(), "|", o.backend_reason())'
  local backend
  backend="$(grep '^backend:' "$log" | tail -1)"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then ST=TIMEOUT NOTE="build ran past ${t}s (arch $arch)"; return; fi
  if [ "$rc" -ne 0 ]; then ST=FAIL NOTE="build failed (rc $rc, arch $arch): $(grep -m1 -E 'error' "$log" | cut -c1-200)"; return; fi
  if [[ "$backend" != "backend: cuda "* ]]; then ST=FAIL NOTE="built (arch $arch) but ${backend:-no backend line}"; return; fi
  ST=ok NOTE="built for TORCH_CUDA_ARCH_LIST=$arch; ops backend cuda"
}

stage_pytest() {
  local t="$1" log="$2" args=(-m gpu -q -p no:cacheprovider -rfE) xml="$WORK/pytest_gpu.xml"
  if [ "$COLLECT_ONLY" = 1 ]; then
    args+=(--collect-only)
  else
    args+=(--junitxml="$xml")
  fi
  if [ "$GPU" = 1 ]; then
    if [ "$WORKERS" != 0 ] && "$PY" -c 'import xdist' 2>/dev/null; then args+=(-n "$WORKERS"); fi
    if "$PY" -c 'import pytest_timeout' 2>/dev/null; then args+=(--timeout=120); fi
  fi
  run_t "$t" "$log" "$PY" -m pytest "${args[@]}" tests
  local rc=$?
  local counts
  if [ "$COLLECT_ONLY" = 1 ]; then
    counts="$(grep -E -o '[0-9]+(/[0-9]+)? tests? collected' "$log" | tail -1)"
    counts="${counts:-nothing collected}"
  else
    counts="$("$PY" - "$xml" <<'PY'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no junit xml")
    raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
PY
)"
  fi
  if grep -q -E 'illegal memory access|unspecified launch failure|misaligned address' "$log"; then
    counts="$counts; a sticky CUDA error was raised: later failures in that process may follow from it"
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then ST=TIMEOUT NOTE="ran past ${t}s; $counts"; return; fi
  if [ "$GPU" = 0 ]; then
    if [ "$rc" -eq 0 ]; then ST="$NO_GPU" NOTE="$counts"; else ST=FAIL NOTE="rc $rc without GPU: $counts"; fi
    return
  fi
  if [ "$rc" -eq 0 ] && [ "$COLLECT_ONLY" = 1 ]; then ST=ok NOTE="collect only: $counts"; return; fi
  if [ "$rc" -eq 0 ] && [[ "$counts" != "0 passed"* ]]; then ST=ok NOTE="$counts"; return; fi
  ST=FAIL NOTE="rc $rc: $counts"
}

# a bench command: on GPU it must succeed and write its JSON; without, stop with the clean error
bench_stage() {
  local t="$1" log="$2" json="$3"
  shift 3
  rm -f "$json"
  run_t "$t" "$log" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then ST=TIMEOUT NOTE="ran past ${t}s"; return; fi
  if [ "$GPU" = 0 ]; then
    if [ "$rc" -ne 0 ] && grep -q 'needs a CUDA device' "$log" && ! grep -q 'Traceback' "$log"; then
      ST="$NO_GPU" NOTE="clean 'needs a CUDA device' error checked"
    elif [ "$rc" -eq 0 ]; then
      ST=FAIL NOTE="succeeded without a GPU (unexpected)"
    else
      ST=FAIL NOTE="rc $rc without a GPU, not the clean 'needs a CUDA device' error: $(grep -m1 -E 'Error|error' "$log" | cut -c1-200)"
    fi
    return
  fi
  if [ "$rc" -eq 0 ] && [ -s "$json" ]; then ST=ok NOTE=""; else ST=FAIL NOTE="rc $rc: $(grep -E 'Error|error' "$log" | tail -1 | cut -c1-200)"; fi
}

stage_bench_matmul() { bench_stage "$1" "$2" "$WORK/bench_matmul.json" "$PY" -m qtool bench matmul --iters "${ITERS_MATMUL:-20}" --json "$WORK/bench_matmul.json"; }
stage_bench_w4a4() { bench_stage "$1" "$2" "$WORK/bench_w4a4.json" "$PY" -m qtool bench w4a4 --iters "${ITERS_W4A4:-20}" --json "$WORK/bench_w4a4.json"; }
stage_bench_attention() { bench_stage "$1" "$2" "$WORK/bench_attention.json" "$PY" -m qtool bench attention --iters "${ITERS_ATTENTION:-10}" --json "$WORK/bench_attention.json"; }
stage_bench_generate() {
  bench_stage "$1" "$2" "$WORK/bench_generate.json" "$PY" -m qtool bench generate --shape llama-2-7b \
    --batch 1 --batch 16 --context 4096 --new-tokens "${GENERATE_NEW_TOKENS:-32}" --json "$WORK/bench_generate.json"
}

stage_quantize() {
  local t="$1" log="$2"
  if [ "$GPU" = 0 ]; then
    if run_t "$t" "$log" "$PY" -m scripts.bench.bench_quantize --help && grep -q 'llama2-7b' "$log"; then
      ST="$NO_GPU" NOTE="bench_quantize --help lists --shape llama2-7b"
    else
      ST=FAIL NOTE="bench_quantize --help failed"
    fi
    return
  fi
  local res="$ROOT/results/bench_quantize_llama2-7b_cuda.json"
  rm -f "$res"
  run_t "$t" "$log" "$PY" -m scripts.bench.bench_quantize --shape llama2-7b --device cuda \
    --samples "${QUANTIZE_SAMPLES:-32}" --seq-len "${QUANTIZE_SEQ_LEN:-512}"
  local rc=$?
  [ -s "$res" ] && cp "$res" "$WORK/bench_quantize.json"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then ST=TIMEOUT NOTE="ran past ${t}s"; return; fi
  if [ "$rc" -eq 0 ] && [ -s "$res" ]; then ST=ok NOTE=""; else ST=FAIL NOTE="rc $rc: $(grep -E 'Error|error' "$log" | tail -1 | cut -c1-200)"; fi
}

# --- summary: summary.md + summary.json from the stage records and the JSONs ---------------------
summarize() {
  "$PY" - "$RECORDS" "$WORK" "$DIR" "$MODE" "$STARTED" "$(utc)" "$((SECONDS - T0))" "$BUDGET" <<'PY'
import json, sys
from pathlib import Path

records, work, out, mode, started, now, elapsed, budget = sys.argv[1:9]
work, out = Path(work), Path(out)
ORDER = ["env", "install", "kernels", "pytest", "bench_matmul", "bench_w4a4", "bench_attention",
         "bench_generate", "quantize"]
WHAT = {
    "env": "environment report", "install": "install from carried wheels",
    "kernels": "build kernels_cuda", "pytest": "pytest -m gpu",
    "bench_matmul": "qtool bench matmul", "bench_w4a4": "qtool bench w4a4",
    "bench_attention": "qtool bench attention", "bench_generate": "qtool bench generate (7B shape)",
    "quantize": "bench_quantize llama2-7b (GPTQ)",
}


def load(name):
    p = work / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def span(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return "n/a", None
    lo, hi = min(vals), max(vals)
    return (f"{lo:g}x" if lo == hi else f"{lo:g}-{hi:g}x"), lo


bench = {k: load(f"bench_{k}.json") for k in ("matmul", "w4a4", "attention", "generate", "quantize")}


def by(rows, key):
    groups = {}
    for r in rows or []:
        if "speedup" in r:
            groups.setdefault(r[key], []).append(r["speedup"])
    return groups


def numbers(stage):
    if stage in ("bench_matmul", "bench_w4a4") and bench[stage[6:]]:
        g = by(bench[stage[6:]]["rows"], "rows")
        return "speedup vs FP16 by rows: " + "; ".join(f"{m}: {span(v)[0]}" for m, v in g.items())
    if stage == "bench_attention" and bench["attention"]:
        rows = bench["attention"]["rows"]
        g = by(rows, "context")
        kv = [r["kv_memory_ratio"] for r in rows if "kv_memory_ratio" in r]
        skipped = sum(1 for r in rows if "skipped" in r)
        s = "speedup vs SDPA by context: " + "; ".join(f"{c}: {span(v)[0]}" for c, v in g.items())
        if kv:
            lo, hi = f"{100 / max(kv):.0f}", f"{100 / min(kv):.0f}"
            s += f"; KV memory {lo if lo == hi else lo + '-' + hi}% of the 16-bit cache"
        return s + (f"; {skipped} points skipped (memory)" if skipped else "")
    if stage == "bench_generate" and bench["generate"]:
        rows = bench["generate"]["rows"]
        fp = {r["batch"]: r["tokens_per_s"] for r in rows if r["model"] == "16-bit"}
        return "; ".join(f"batch {r['batch']}: {fp.get(r['batch'])} -> {r['tokens_per_s']} tok/s "
                         f"({r['speedup']}x)" for r in rows if r["model"] != "16-bit")
    if stage == "quantize" and bench["quantize"]:
        q = bench["quantize"]
        s = q.get("seconds", {})
        mem = q.get("peak_gpu_memory_gb")
        parts = ", ".join(f"{k} {v:.0f}s" for k, v in s.items() if k != "total")
        text = f"rotate + GPTQ {s.get('total', 0):.0f}s ({parts}); {q.get('calibration')}"
        return text + (f"; peak GPU memory {mem:.1f} GiB" if mem else "")
    return ""


stages = {}
for line in Path(records).read_text().splitlines():
    name, status, secs, t_start, t_end, note, log = (line.split("\t") + [""] * 7)[:7]
    stages[name] = {"stage": name, "what": WHAT.get(name, name), "status": status, "seconds": int(secs),
                    "started_utc": t_start, "ended_utc": t_end, "note": note, "log": log}
for name in ORDER:
    if name in stages:
        stages[name]["numbers"] = numbers(name)
    else:
        stages[name] = {"stage": name, "what": WHAT[name], "status": "not run yet", "seconds": None,
                        "started_utc": "", "ended_utc": "", "note": "", "log": "", "numbers": ""}

# the issue's targets, measured or not
targets = []


def target(text, measured, lo, goal, higher=True):
    met = None if lo is None else (lo >= goal if higher else lo <= goal)
    targets.append({"target": text, "measured": measured,
                    "met": {None: "not measured", True: "yes", False: "NO"}[met]})


mm = by((bench["matmul"] or {}).get("rows"), "rows")
for m, goal in ((1, 3.0), (16, 2.5)):
    text, lo = span(mm.get(m, []))
    target(f"W4A16 int4_matmul at {m} row(s) >= {goal}x FP16 cuBLAS (all 5 shapes)", text, lo, goal)
wa = by((bench["w4a4"] or {}).get("rows"), "rows")
text, lo = span(wa.get(2048, []) + wa.get(8192, []))
target("W4A4 at 2048 and 8192 rows >= 1.4x FP16 (incl. activation quantization)", text, lo, 1.4)
att = (bench["attention"] or {}).get("rows") or []
text, lo = span([r["speedup"] for r in att if "speedup" in r])
missed = sum(1 for r in att if "speedup" not in r)
text += f" ({missed} of {len(att)} points not measured)" if missed else ""
target("int4-KV decode >= 3.0x SDPA (4k/16k/64k context, batch 1/8/32)", text, lo, 3.0)
kv = [100 / r["kv_memory_ratio"] for r in att if r.get("kv_memory_ratio")]
target("KV memory <= 30% of the 16-bit cache", f"{max(kv):.0f}%" if kv else "n/a",
       max(kv) if kv else None, 30.0, higher=False)
gen = [r["speedup"] for r in ((bench["generate"] or {}).get("rows") or []) if r.get("model") != "16-bit"]
text, lo = span(gen)
target("bench generate W4A16 + KV4 >= 2.5x FP16 tokens/s (7B shape)", text, lo, 2.5)
pt = stages["pytest"]
ran = pt["status"] in ("ok", "FAIL", "TIMEOUT") and mode == "gpu"
targets.append({"target": "kernel error within 2x PyTorch's own error vs fp32 (pytest -m gpu)",
                "measured": pt["note"] if ran else "n/a",
                "met": ("yes" if pt["status"] == "ok" else "NO") if ran else "not measured"})

env = load("env.json") or {}
smi = env.get("nvidia_smi") or {}
device = ", ".join(str(x) for x in [
    env.get("device") or "no CUDA device", smi.get("driver_version") and f"driver {smi['driver_version']}",
    smi.get("clocks.sm") and f"SM clock {smi['clocks.sm']} (max {smi.get('clocks.max.sm')})",
    smi.get("clocks.mem") and f"memory clock {smi['clocks.mem']}",
    env.get("torch") and f"torch {env['torch']}", f"CUDA {env.get('cuda')}"] if x)

lines = [
    "# GPU acceptance (issue 18)", "",
    f"- mode: {mode}",
    f"- started {started}, summary written {now}, {elapsed} s of a {budget} s budget",
    f"- device: {device}",
    "", "| # | stage | what | status | seconds | started (UTC) | key numbers / note |",
    "| --- | --- | --- | --- | --- | --- | --- |",
]
for i, name in enumerate(ORDER, 1):
    s = stages[name]
    info = "; ".join(x for x in (s["numbers"], s["note"]) if x).replace("|", "/")
    secs = "" if s["seconds"] is None else s["seconds"]
    lines.append(f"| {i} | {name} | {s['what']} | {s['status']} | {secs} | {s['started_utc']} | {info} |")
lines += ["", "## Targets (issue 18)", "", "| target | measured (worst case) | met |", "| --- | --- | --- |"]
lines += [f"| {t['target']} | {t['measured']} | {t['met']} |".replace("\n", " ") for t in targets]
lines += ["", "Stage logs, benchmark JSONs and the junit xml: "
          + ("stages.tar.gz" if not (out / "stages").is_dir() else "stages/") + "."]
(out / "summary.md").write_text("\n".join(lines) + "\n")
summary = {"mode": mode, "started_utc": started, "written_utc": now, "elapsed_s": int(elapsed),
           "budget_s": int(budget), "env": env, "stages": [stages[n] for n in ORDER],
           "targets": targets, "bench": bench}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
  if [ "$PACK" = 1 ]; then
    tar czf "$DIR/.stages.tar.gz.tmp" -C "$(dirname "$WORK")" stages && mv "$DIR/.stages.tar.gz.tmp" "$DIR/stages.tar.gz"
  fi
}

# --- run ---------------------------------------------------------------------------------------
for i in "${!STAGES[@]}"; do
  name="${STAGES[$i]}"
  log="$WORK/$(printf '%02d' $((i + 1)))_$name.log"
  start="$(utc)" t_stage=$SECONDS ST="" NOTE=""
  if ! selected "$name"; then
    ST="not selected (--only)"
  else
    reserve=0
    for later in "${STAGES[@]:$((i + 1))}"; do
      if selected "$later"; then reserve=$((reserve + MINT[$later])); fi
    done
    # at most its own timeout, leaving the later stages their minimum; but an earlier stage
    # (install, kernels: the later ones need them) gets its minimum first while time is left
    left=$((DEADLINE - SECONDS))
    t=$((left - reserve))
    [ "$t" -gt "${MAXT[$name]}" ] && t="${MAXT[$name]}"
    [ "$t" -lt "${MINT[$name]}" ] && t=$((left < MINT[$name] ? left : MINT[$name]))
    if [ "$t" -lt "${MINT[$name]}" ]; then
      ST="skipped (time budget)" NOTE="${left}s of the budget left, needs ${MINT[$name]}s"
    else
      echo "== $start stage $name (timeout ${t}s)"
      : >"$log"
      "stage_$name" "$t" "$log"
    fi
  fi
  secs=$((SECONDS - t_stage))
  NOTE="${NOTE//[$'\t\n\r']/ }"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$ST" "$secs" "$start" "$(utc)" "$NOTE" "$(basename "$log")" \
    >>"$RECORDS"
  echo "   $name: $ST (${secs}s)${NOTE:+: $NOTE}"
  if [[ "$ST" == FAIL* || "$ST" == TIMEOUT* ]] && [ -f "$log" ]; then
    echo "   --- last lines of $(basename "$log") ---"
    tail -n 15 "$log" | sed 's/^/   | /'
  fi
  summarize
done

echo
cat "$DIR/summary.md"
echo "gpu_acceptance: $(utc) done in $((SECONDS - T0))s; output in $DIR"
if grep -q -E '\| (FAIL|TIMEOUT)' "$DIR/summary.md"; then exit 1; fi
exit 0
