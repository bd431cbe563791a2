"""scripts/dev/gpu_acceptance.sh --dry-run on CPU: every stage but the GPU ones works before a GPU
is spent on it (issue 18). About 40 s: it starts Python a few times and collects the GPU tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "dev" / "gpu_acceptance.sh"
STAGES = [
    "env",
    "install",
    "kernels",
    "pytest",
    "bench_matmul",
    "bench_w4a4",
    "bench_attention",
    "bench_generate",
    "quantize",
]
GPU_STAGES = STAGES[2:]  # kernels onwards


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_dry_run_writes_a_summary_with_every_stage(tmp_path):
    out = tmp_path / "ga"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--collect-only", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary_md = (out / "summary.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in summary_md.splitlines() if line.startswith("| ")}
    for name in STAGES:
        assert name in rows, f"stage {name} missing from summary.md"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"].startswith("dry run")
    status = {s["stage"]: s["status"] for s in summary["stages"]}
    assert list(status) == STAGES
    assert not [n for n, s in status.items() if s.startswith(("FAIL", "TIMEOUT", "skipped (time"))], status
    for name in GPU_STAGES:
        assert status[name] == "skipped (no GPU)", (name, status[name])
    assert status["env"] == "ok"
    # the wheel folder is made on demand (scripts/dev/gpu_wheels.sh): present -> ok, absent -> warn
    assert status["install"] in ("ok", "warn")

    notes = {s["stage"]: s["note"] for s in summary["stages"]}
    assert "tests collected" in notes["pytest"] and not notes["pytest"].startswith("0")
    for name in ("bench_matmul", "bench_w4a4", "bench_attention", "bench_generate"):
        assert "needs a CUDA device" in notes[name]
    assert all(t["met"] == "not measured" for t in summary["targets"])
    assert (out / "stages" / "04_pytest.log").is_file()
    assert (out / "console.log").is_file()
