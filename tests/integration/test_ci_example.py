"""The shipped example CI job (examples/ci/) runs end to end on a tiny model: quantize, evaluate
against the baseline with gates, the JSON kept; a failed gate gives exit status 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "ci" / "quantize_and_gate.sh"
WORKFLOW = REPO / "examples" / "ci" / "github-actions-gpu.yml"


def run_job(tmp_path: Path, recipe: Path, baseline: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "RECIPE": str(recipe),
        "BASELINE": str(baseline),
        "OUT": str(tmp_path / "ci"),
        "DEVICE": "cpu",
        "SEQ_LEN": "128",
        "LIMIT": "2",
        "QTOOL": str(Path(sys.executable).parent / "qtool"),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=600
    )


def test_example_ci_job_passes_and_fails_its_gate(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\ndevice: cpu\nscheme: {{preset: W4A16, weights: {{group_size: 32}}}}\n"
        "steps: [rtn, export]\n"
    )
    res = run_job(tmp_path, recipe, tiny_llama_dir, MAX_PPL_RATIO="100")
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "ci" / "eval.json").read_text())
    assert [r["model"] for r in data["rows"]] == [str(tiny_llama_dir), str(tmp_path / "ci" / "checkpoint")]
    assert data["passed"] is True and data["gates"][0]["kind"] == "max_ppl_ratio"
    assert (tmp_path / "ci" / "quantize.json").is_file()
    assert "gates passed" in res.stdout

    # a gate no model can pass: exit status 3, the JSON still written, the checkpoint reused
    res = run_job(tmp_path, recipe, tiny_llama_dir, MAX_PPL_RATIO="100", MAX_PPL="1")
    assert res.returncode == 3, res.stdout + res.stderr
    data = json.loads((tmp_path / "ci" / "eval.json").read_text())
    assert data["passed"] is False
    assert [g["passed"] for g in data["gates"] if g["kind"] == "max_ppl"] == [False, False]
    assert "a gate failed" in res.stderr


def test_example_workflow_runs_the_script_and_uploads_the_json():
    wf = yaml.safe_load(WORKFLOW.read_text())
    job = wf["jobs"]["quantize-and-gate"]
    assert "gpu" in job["runs-on"]
    steps = job["steps"]
    assert any("examples/ci/quantize_and_gate.sh" in s.get("run", "") for s in steps)
    upload = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload and upload[0]["if"] == "always()" and "out/ci/eval.json" in upload[0]["with"]["path"]
    assert job["env"]["DEVICE"] == "cuda"
