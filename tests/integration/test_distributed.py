"""Data-parallel calibration with torchrun (gloo on CPU): N ranks agree with one, rank 0 alone writes,
and a failure on one rank ends every rank with its message and a non-zero status, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RECIPE = """model: {model}
device: cpu
calibration: {{samples: 8, seq_len: 32}}
scheme: {{preset: W4A16, weights: {{group_size: 32}}}}
steps: [{{gptq: {{act_order: true, batch_size: 2}}}}]
"""


def quantize(tmp_path: Path, model: Path, out: str, nproc: int, env: dict | None = None, timeout: int = 240):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=model))
    cmd = [sys.executable, "-m", "qtool", "quantize", str(recipe), "--output", str(tmp_path / out)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--json", str(tmp_path / f"{out}.json")]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "QTOOL_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def single(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    res = quantize(tmp, tiny_llama_dir, "one", 1)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp / "one"


def test_two_ranks_agree_with_one_and_rank_0_alone_writes(tiny_llama_dir, tmp_path, single):
    res = quantize(tmp_path, tiny_llama_dir, "two", 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in single.iterdir())
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".two")
    ] == []  # no second writer's debris
    a, b = (
        load_file(str(single / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    # the same Hessians up to the order of a float64 sum: codes agree but for rare midpoint flips
    packed = [k for k in a if k.endswith("weight_packed")]
    same = sum(int(torch.equal(a[k], b[k])) for k in packed)
    assert same >= 0.9 * len(packed), (same, len(packed))
    for k in a:
        if k.endswith("weight_scale"):
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-2, atol=0)
    # the log comes from rank 0 only; each linear is solved once and its codes reach every rank
    report = json.loads((tmp_path / "two.json").read_text())
    gptq = report["results"]["gptq"]
    assert len(gptq["layer_errors"]) == 2 * 7
    assert gptq["ranks"] == 2 and gptq["windows_this_rank"] == 4  # 8 calibration windows, split


def test_a_failure_on_one_rank_ends_every_rank(tiny_llama_dir, tmp_path):
    res = quantize(tmp_path, tiny_llama_dir, "failed", 2, env={"QTOOL_TEST_FAIL_RANK": "1"}, timeout=180)
    assert res.returncode != 0
    assert "planted failure on rank 1" in res.stdout + res.stderr
    assert not (tmp_path / "failed").exists()
