"""``qtool quantize --stream``: layer-by-layer over the shards, byte-identical to the in-memory path,
resumable, and refusing what it cannot do before any work."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtool.api import run_recipe
from qtool.errors import QtoolError
from qtool.recipe import Recipe
from qtool.steps.streaming import StreamInterrupted, partial_folder


def make_sharded(
    folder: Path, tokenizer, layers: int = 3, hidden: int = 64, shard: str = "2MB", tie=True
) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, smollm2_tokenizer) -> Path:
    folder = make_sharded(tmp_path_factory.mktemp("sharded"), smollm2_tokenizer)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return folder


def recipe(model: Path, steps: list, preset: str = "W4A16", **kw) -> Recipe:
    return Recipe.model_validate(
        {
            "model": str(model),
            "device": "cpu",
            "calibration": {"samples": 4, "seq_len": 32},
            "scheme": {"preset": preset, "weights": {"group_size": 32}},
            "steps": steps,
            **kw,
        }
    )


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    differ = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert differ == [], differ


GPTQ = {"gptq": {"act_order": True, "mse_clip": True}}


@pytest.mark.parametrize(
    "steps,preset",
    [
        (["rtn"], "W4A16"),
        ([GPTQ], "W4A16"),
        (["rotate", GPTQ], "W4A4KV4"),
        (["rotate", {"rtn": {"mse_clip": True}}], "W4A4"),
        (["rotate", {"lowrank": {"rank": 4, "act_order": True}}], "W4A4"),
        (["rotate", GPTQ, {"intactkv": {"pivot": "bos"}}], "W4A4KV4"),
        ([{"intactkv": {"pivot": "The quick brown fox"}}, "rtn"], "W4A4KV4"),
    ],
    ids=[
        "rtn",
        "gptq",
        "rotate+gptq",
        "rotate+rtn",
        "rotate+lowrank",
        "rotate+gptq+intactkv",
        "intactkv-text+rtn",
    ],
)
def test_streamed_checkpoint_is_byte_identical_and_sharded_like_the_input(sharded, tmp_path, steps, preset):
    r = recipe(sharded, steps, preset)
    mem = tmp_path / "mem"
    run_recipe(r, mem)
    ctx = run_recipe(r, tmp_path / "stream", stream=True)
    same_files(mem, tmp_path / "stream")
    index = json.loads((mem / "model.safetensors.index.json").read_text())
    src = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(set(src["weight_map"].values()))
    # the packed codes of a linear sit in the shard its weight came from
    key = "model.layers.2.mlp.down_proj.weight"
    assert index["weight_map"]["model.layers.2.mlp.down_proj.weight_packed"] == src["weight_map"][key]
    assert ctx.results["export"]["bytes"] > 0
    assert not partial_folder(tmp_path / "stream").exists()


def test_a_stopped_run_resumes_to_the_same_bytes_and_refuses_a_changed_recipe(sharded, tmp_path):
    r = recipe(sharded, ["rotate", GPTQ], "W4A4KV4")
    run_recipe(r, tmp_path / "whole", stream=True)
    out = tmp_path / "resumed"
    with pytest.raises(StreamInterrupted):
        run_recipe(r, out, stream=True, stop_after=0)
    assert not out.exists() and (partial_folder(out) / ".qtool-state" / "layer-00000.safetensors").is_file()
    changed = recipe(sharded, ["rotate", {"gptq": {"act_order": True, "damp": 0.02}}], "W4A4KV4")
    with pytest.raises(QtoolError, match="different recipe"):
        run_recipe(changed, out, stream=True)
    with pytest.raises(QtoolError, match="no interrupted run"):  # --resume with nothing to resume
        run_recipe(r, tmp_path / "never-started", resume=True)
    assert not partial_folder(tmp_path / "never-started").exists()
    with pytest.raises(StreamInterrupted):  # resumes at layer 1, stops again after it
        run_recipe(r, out, stream=True, stop_after=1)
    ctx = run_recipe(r, out, resume=True)  # --resume implies --stream
    same_files(tmp_path / "whole", out)
    assert not partial_folder(out).exists()
    assert len(ctx.results["gptq"]["layer_errors"]) == 3 * 7  # the records of the earlier attempts are kept


def test_a_stopped_lowrank_intactkv_run_resumes_to_the_same_bytes(sharded, tmp_path):
    """The sidecar tensors (LoRA factors, pivot K/V and the pivot's hidden state) survive a resume."""
    r = recipe(sharded, ["rotate", {"lowrank": {"rank": 4}}, "intactkv"], "W4A4KV4")
    mem = tmp_path / "mem"
    run_recipe(r, mem)
    out = tmp_path / "resumed"
    with pytest.raises(StreamInterrupted):
        run_recipe(r, out, stream=True, stop_after=1)
    ctx = run_recipe(r, out, stream=True)
    same_files(mem, out)
    assert {"adapter_model.safetensors", "intactkv_pivot.safetensors"} <= {p.name for p in out.iterdir()}
    assert ctx.results["lowrank"]["extra_parameters"] > 0


def test_keep_outer_loads_embeddings_in_the_checkpoint_dtype(sharded):
    from qtool.models.shards import ShardReader
    from qtool.models.streaming import load_skeleton

    kept, _ = load_skeleton(sharded, ShardReader(sharded), "float32", keep_outer=True)
    math, _ = load_skeleton(sharded, ShardReader(sharded), "float32")
    assert kept.model.embed_tokens.weight.dtype == torch.bfloat16
    assert math.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(kept.model.embed_tokens.weight.float(), math.model.embed_tokens.weight)


def test_steps_that_cannot_stream_are_refused_before_any_work(sharded, tmp_path):
    calibrated = {"intactkv": {"calibrate": {"steps": 1}}}
    for steps, match in (
        ([{"clip_search": {}}, GPTQ], "run without --stream"),
        (["rotate", GPTQ, {"bisup": {}}], "run without --stream"),
        ([GPTQ, calibrated], "cannot stream; run without --stream, or drop `calibrate`"),
    ):
        with pytest.raises(QtoolError, match=match):
            run_recipe(recipe(sharded, steps, "W4A4KV4"), tmp_path / "x", stream=True)
        assert not (tmp_path / "x").exists() and not partial_folder(tmp_path / "x").exists()


def test_pickle_only_folders_are_refused(sharded, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((sharded / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    for stream in (True, False):
        with pytest.raises(QtoolError, match="pickle files .*convert them to safetensors"):
            run_recipe(recipe(folder, ["rtn"]), tmp_path / "out", stream=stream)


PEAK = """
import json, sys
from pathlib import Path
from qtool.api import run_recipe
from qtool.recipe import Recipe
import transformers, safetensors  # everything imported before the baseline

def hwm():  # this address space's peak RSS in bytes (reset at exec, unlike ru_maxrss)
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

def recipe(model):
    scheme = {"preset": "W4A16", "weights": {"group_size": 32}}
    return Recipe.model_validate({"model": model, "device": "cpu", "scheme": scheme, "steps": ["rtn"]})

stream = sys.argv[4] == "stream"
# warm-up on a small model: lazy imports, tokenizer, allocator pools are in the baseline, not the growth
run_recipe(recipe(sys.argv[2]), sys.argv[3] + "-warm", stream=stream)
before = hwm()
run_recipe(recipe(sys.argv[1]), sys.argv[3], stream=stream)
print(json.dumps({"before": before, "peak": hwm()}))
"""


@pytest.mark.slow
def test_streaming_peak_memory_stays_below_half_the_model(tmp_path, smollm2_tokenizer):
    """Peak RSS growth (VmHWM, the address space's high-water mark, which no allocator hides) quantizing a
    ~200 MB model: the in-memory path holds the whole model (the check can fail), the streamed one
    less than half of it."""
    folder = make_sharded(tmp_path / "m", smollm2_tokenizer, layers=140, hidden=256, shard="20MB", tie=True)
    small = make_sharded(tmp_path / "small", smollm2_tokenizer, layers=2, hidden=256, shard="20MB", tie=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size > 180e6
    growth = {}
    for mode in ("memory", "stream"):
        out = (
            subprocess.run(
                [sys.executable, "-c", PEAK, str(folder), str(small), str(tmp_path / mode), mode],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        res = json.loads(out)
        growth[mode] = res["peak"] - res["before"]
    assert growth["memory"] > size, growth
    assert growth["stream"] < 0.5 * size, growth


def test_progress_is_one_log_line_per_layer_when_not_a_terminal(sharded, tmp_path, monkeypatch, caplog):
    """CI logs: each finished decoder layer logs its index, elapsed time, ETA, peak memory and its
    quantization error, instead of silence until the step ends."""
    import logging

    monkeypatch.setenv("QTOOL_NO_PROGRESS", "1")
    monkeypatch.setattr(logging.getLogger("qtool"), "propagate", True)  # the CLI turns it off
    with caplog.at_level(logging.INFO, logger="qtool"):
        run_recipe(recipe(sharded, [GPTQ]), tmp_path / "out", stream=True)
    # distinct messages: once a CLI test has set up logging, pytest may capture a record twice
    lines = list(
        dict.fromkeys(r.getMessage() for r in caplog.records if "layers (streamed)" in r.getMessage())
    )
    assert len(lines) == 3, lines
    for k, line in enumerate(lines, 1):
        assert line.startswith(f"layers (streamed): {k}/3 done, elapsed ") and "ETA" in line
        assert "peak RSS" in line and "mean GPTQ loss" in line


def test_a_sharded_checkpoint_loads_and_a_missing_shard_is_named(sharded, tmp_path):
    from qtool.api import load
    from qtool.export.files import check_checkpoint_files

    out = tmp_path / "ckpt"
    ctx = run_recipe(recipe(sharded, ["rtn"]), out, stream=True)
    model, _, _ = load(str(out), device="cpu", kernels="off")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()
    assert ctx.results["export"]["decoder_linear_bytes"] > 0
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(QtoolError, match=f"missing {shard.name}"):
        check_checkpoint_files(out)
