#!/usr/bin/env bash
# Compile-check the qtool CUDA extension without a GPU and without linking: every .cu under
# kernels_cuda/csrc is compiled by nvcc for sm_80 and sm_90a, and bindings.cpp by the host
# compiler against the torch headers, each to its own object in a temporary folder.
# Then (unless SKIP_SCHEMA_CHECK=1) the C++ signatures that bindings.cpp registers are checked
# against the Python torch.library schemas: CPU stubs with the same signatures are built with
# torch.utils.cpp_extension.load_inline and registered under qtool::*, and the dispatcher refuses
# any argument or return type that disagrees with the schema.
# Works with a CPU build of torch: the CPU wheel ships the c10/cuda headers but not the
# generated c10/cuda/impl/cuda_cmake_macros.h, so a one-line stand-in is written to the
# temporary folder (it only defines C10_CUDA_BUILD_SHARED_LIBS, as the CUDA wheels do).
#
#   bash scripts/dev/check_cuda_build.sh            # uses .venv/bin/python when present
#   PYTHON=python3 NVCC=/usr/local/cuda/bin/nvcc CXX_STD=c++20 bash scripts/dev/check_cuda_build.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CSRC="$ROOT/kernels_cuda/csrc"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
NVCC="${NVCC:-nvcc}"
CXX_STD="${CXX_STD:-c++17}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 4)}"

command -v "$NVCC" >/dev/null || { echo "check_cuda_build: nvcc not found (set NVCC=...)" >&2; exit 2; }
CUDA_INC="$(cd "$(dirname "$(command -v "$NVCC")")/.." && pwd)/include"
[ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"

TORCH_INC="$("$PYTHON" -c 'import sysconfig, torch.utils.cpp_extension as c
print(" ".join("-I" + p for p in c.include_paths() + [sysconfig.get_paths()["include"]]))')"
TORCH_INC="$TORCH_INC -I$TMP/stub"

# the flags torch.utils.cpp_extension passes to nvcc, plus ours from kernels_cuda/setup.py
NVCC_FLAGS=(-std="$CXX_STD" -O3 --expt-relaxed-constexpr -lineinfo
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
  -Xcompiler -fPIC -Werror all-warnings -I"$CSRC")
CXX_FLAGS=(-std="$CXX_STD" -O2 -fPIC -Wall -Wno-unused-function -DTORCH_EXTENSION_NAME=qtool_cuda
  -DTORCH_API_INCLUDE_EXTENSION_H -I"$CSRC" -I"$CUDA_INC")

compile_one() {
  local src="$1" obj="$TMP/$(echo "${1#"$CSRC"/}" | tr '/' '_').o" log
  log="$obj.log"
  local start=$SECONDS
  if [[ "$src" == *.cu ]]; then
    "$NVCC" "${NVCC_FLAGS[@]}" $TORCH_INC -c "$src" -o "$obj" >"$log" 2>&1
  else
    "${CXX:-g++}" "${CXX_FLAGS[@]}" $TORCH_INC -c "$src" -o "$obj" >"$log" 2>&1
  fi
  local rc=$?
  if [ $rc -eq 0 ]; then
    echo "ok    ${src#"$ROOT"/} ($((SECONDS - start)) s)"
  else
    echo "FAIL  ${src#"$ROOT"/}"; cat "$log"
  fi
  return $rc
}
mapfile -t SOURCES < <(find "$CSRC" \( -name '*.cu' -o -name '*.cpp' \) | sort)
[ ${#SOURCES[@]} -gt 0 ] || { echo "check_cuda_build: no sources under $CSRC" >&2; exit 2; }
echo "check_cuda_build: $("$NVCC" --version | tail -1), $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'), -std=$CXX_STD, sm_80 + sm_90a"

fail=0
pids=()
for src in "${SOURCES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
  compile_one "$src" > "$TMP/$(echo "${src#"$CSRC"/}" | tr '/' '_').out" 2>&1 &
  pids+=("$!:$src")
done
for entry in "${pids[@]}"; do
  pid="${entry%%:*}" src="${entry#*:}"
  if ! wait "$pid"; then fail=1; fi
  cat "$TMP/$(echo "${src#"$CSRC"/}" | tr '/' '_').out"
done
if [ $fail -ne 0 ]; then
  echo "check_cuda_build: FAILED" >&2
  exit 1
fi
echo "check_cuda_build: all ${#SOURCES[@]} sources compiled (no link)"

[ "${SKIP_SCHEMA_CHECK:-0}" = "1" ] && exit 0
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - "$CSRC/bindings.cpp" "$TMP/schema" <<'PY'
import re, sys
import torch
import torch.utils.cpp_extension as ce
import qtool.ops  # noqa: F401  (defines the Python schemas)

src, build = open(sys.argv[1]).read(), sys.argv[2]
if not ce.is_ninja_available():
    print("check_cuda_build: schema check skipped (ninja is not installed)")
    sys.exit(0)
pairs = re.findall(r'm\.impl\("(\w+)",\s*&(\w+)\)', src)
stubs = []
for op, fn in pairs:
    m = re.search(r"\n([\w:<>, ]+?)\s+" + fn + r"\(([^{;]*?)\)\s*\{", src)
    if m is None:
        sys.exit(f"check_cuda_build: cannot find the definition of {fn} in bindings.cpp")
    stubs.append(f"{m.group(1)} {fn}({m.group(2)}) {{ throw std::logic_error(\"schema stub\"); }}")
impls = "\n".join(f'  m.impl("{op}", &{fn});' for op, fn in pairs)
cpp = ("#include <optional>\n#include <stdexcept>\n#include <tuple>\n#include <torch/extension.h>\n"
       + "\n".join(stubs) + "\nTORCH_LIBRARY_IMPL(qtool, CPU, m) {\n" + impls + "\n}\n")
import os
os.makedirs(build, exist_ok=True)
ce.load_inline("qtool_schema_check", cpp_sources=[cpp], build_directory=build, is_python_module=False)
for op, _ in pairs:
    dump = torch._C._dispatch_dump(f"qtool::{op}")
    if "\nCPU:" not in "\n" + dump:
        sys.exit(f"check_cuda_build: qtool::{op} has no CPU stub after registration:\n{dump}")
print(f"check_cuda_build: the {len(pairs)} C++ signatures in bindings.cpp match the Python schemas: "
      + ", ".join(op for op, _ in pairs))
PY
