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

RECIPES = {
    "gptq": ("W4A16", "[{gptq: {act_order: true, batch_size: 2}}]"),
    "rotate+gptq": ("W4A4KV4", "[rotate, {gptq: {act_order: true, batch_size: 2}}]"),
    "lowrank": ("W4A4", "[rotate, {lowrank: {rank: 4, batch_size: 2}}]"),
    # statistics reduced over ranks: kv_smooth's per-channel min / max, clip_search's error tallies
    # (max_tokens 64 of 256: every 4th row of each window)
    "kv_smooth+clip_search": (
        "W4A4KV4",
        "[{kv_smooth: {batch_size: 2}}, {clip_search: {batch_size: 2, max_tokens: 64}}, "
        "{gptq: {batch_size: 2}}]",
    ),
}
RECIPE = """model: {model}
device: cpu
calibration: {{samples: 8, seq_len: 32}}
scheme: {{preset: {preset}, weights: {{group_size: 32}}}}
steps: {steps}
"""


def quantize(
    tmp_path: Path,
    model: Path,
    out: str,
    nproc: int,
    env: dict | None = None,
    timeout: int = 240,
    kind: str = "gptq",
    extra: tuple[str, ...] = (),
):
    recipe = tmp_path / f"{kind}.yaml"
    preset, steps = RECIPES[kind]
    recipe.write_text(RECIPE.format(model=model, preset=preset, steps=steps))
    cmd = [sys.executable, "-m", "qtool", "quantize", str(recipe), "--output", str(tmp_path / out)]
    cmd += ["--json", str(tmp_path / f"{out}.json"), *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "QTOOL_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def codes(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a packed int32 tensor (8 per word), as one flat uint8 tensor."""
    words = packed.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    return torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], dim=1).reshape(-1).to(torch.uint8)


def ppl(folder: Path, text_file: Path) -> float:
    from qtool.eval.perplexity import perplexity
    from qtool.export.loader import load_checkpoint

    model, tok, _ = load_checkpoint(folder, device="cpu")
    return perplexity(model, tok, str(text_file), 64, 4).ppl


@pytest.mark.parametrize("kind", list(RECIPES))
def test_two_ranks_agree_with_one_and_rank_0_alone_writes(tiny_llama_dir, tmp_path, text_file, kind):
    one = quantize(tmp_path, tiny_llama_dir, "one", 1, kind=kind)
    assert one.returncode == 0, one.stderr[-2000:]
    res = quantize(tmp_path, tiny_llama_dir, "two", 2, kind=kind)
    assert res.returncode == 0, res.stderr[-3000:]
    single, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.iterdir())
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".two")
    ] == []  # no second writer's debris
    a, b = load_file(str(single / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    # the same statistics up to the order of a float64 sum: codes agree but for rare midpoint flips
    packed = [k for k in a if k.endswith("weight_packed")]
    ca = torch.cat([codes(a[k]) for k in packed])
    cb = torch.cat([codes(b[k]) for k in packed])
    assert (ca == cb).float().mean() >= 0.999, (ca != cb).sum()
    # scales: equal but for a rare neighbouring choice of the MSE clip search (grid steps of 1%) on a
    # near tie, when the summation order moved the group's weights by a rounding error
    sa = torch.cat([a[k].float().reshape(-1) for k in a if k.endswith("weight_scale")])
    sb = torch.cat([b[k].float().reshape(-1) for k in a if k.endswith("weight_scale")])
    far = ((sa - sb).abs() > 1e-2 * sa.abs()).float().mean()
    assert far <= 0.01 and ((sa - sb).abs() <= 0.02 * sa.abs()).all(), far
    if kind == "lowrank":  # the LoRA factors, solved by their owner rank and broadcast
        la = load_file(str(single / "adapter_model.safetensors"))
        lb = load_file(str(two / "adapter_model.safetensors"))
        assert la.keys() == lb.keys() and len(la) > 0
        for k in la:
            torch.testing.assert_close(la[k].float(), lb[k].float(), rtol=0.05, atol=2e-3)
    if kind == "kv_smooth+clip_search":  # min / max exact; the same ratio wins every argmin
        ra = json.loads((single / "qtool.json").read_text())["runtime"]
        rb = json.loads((two / "qtool.json").read_text())["runtime"]
        assert ra["kv_smooth"] == rb["kv_smooth"]
        assert ra["clip_search"] == rb["clip_search"]
        assert len(ra["clip_search"]["act"]) == 2 * 7 and len(ra["clip_search"]["kv"]) == 2
        assert "step clip_search" in res.stderr and "not data-parallel" not in res.stderr, res.stderr[-2000:]
    p1, p2 = ppl(single, text_file), ppl(two, text_file)
    assert abs(p2 - p1) / p1 <= 1e-3, (p1, p2)
    # the log comes from rank 0 only; each linear is solved once and its codes reach every rank
    step = "lowrank" if kind == "lowrank" else "gptq"
    rec = json.loads((tmp_path / "two.json").read_text())["results"][step]
    assert len(rec["layer_errors" if step == "gptq" else "linears"]) == 2 * 7
    assert rec["ranks"] == 2 and rec["windows_this_rank"] == 4  # 8 calibration windows, split


def test_a_failure_on_one_rank_ends_every_rank(tiny_llama_dir, tmp_path):
    res = quantize(tmp_path, tiny_llama_dir, "failed", 2, env={"QTOOL_TEST_FAIL_RANK": "1"}, timeout=180)
    assert res.returncode != 0
    assert "planted failure on rank 1" in res.stdout + res.stderr
    assert not (tmp_path / "failed").exists()


def test_a_two_rank_streamed_run_killed_on_rank_1_resumes_to_the_same_bytes(tiny_llama_dir, tmp_path):
    """--stream under torchrun: every rank streams the same layer; rank 1 is SIGKILLed after layer 0
    (torchrun then ends rank 0), and the same command resumes to the uninterrupted run's bytes."""
    import filecmp

    whole = quantize(tmp_path, tiny_llama_dir, "whole", 2, kind="rotate+gptq", extra=("--stream",))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = quantize(
        tmp_path,
        tiny_llama_dir,
        "resumed",
        2,
        env={"QTOOL_TEST_KILL_AFTER_LAYER": "0:1"},
        kind="rotate+gptq",
        extra=("--stream",),
    )
    assert killed.returncode != 0
    partial = tmp_path / ".resumed.partial" / ".qtool-state"
    assert not (tmp_path / "resumed").exists()
    assert json.loads((partial / "state.json").read_text())["next_layer"] == 1
    assert sorted(p.name for p in partial.glob("inputs-rank*")) == [
        "inputs-rank000-0.safetensors",
        "inputs-rank001-0.safetensors",
    ]
    resumed = quantize(
        tmp_path, tiny_llama_dir, "resumed", 2, kind="rotate+gptq", extra=("--resume",)
    )  # the CLI flag: implies --stream
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    differ = [
        n for n in names if not filecmp.cmp(tmp_path / "whole" / n, tmp_path / "resumed" / n, shallow=False)
    ]
    assert differ == [], differ
    # a resume with another number of processes is refused, naming it
    again = quantize(
        tmp_path,
        tiny_llama_dir,
        "r3",
        2,
        env={"QTOOL_TEST_KILL_AFTER_LAYER": "0"},
        kind="rotate+gptq",
        extra=("--stream",),
    )
    assert again.returncode != 0
    one = quantize(tmp_path, tiny_llama_dir, "r3", 1, kind="rotate+gptq", extra=("--stream",))
    assert one.returncode == 1 and "number of ranks" in one.stdout + one.stderr
