"""`qtool eval` checks its inputs before any model work: sequence length against the model's
positions, --limit against the windows, a checkpoint folder's files (issue 16, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool import api
from qtool.cli import app
from qtool.errors import QtoolError
from qtool.eval.perplexity import eval_token_ids

SEQ = 64


def flat(text: str) -> str:
    return " ".join(text.split())


def write_recipe(path: Path, model: str | Path, scheme: str = "{preset: W4A16, weights: {group_size: 32}}"):
    path.write_text(f"model: {model}\ndevice: cpu\nscheme: {scheme}\nsteps: [rtn, export]\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    out = folder / "w4a16"
    api.quantize(write_recipe(folder / "r.yaml", tiny_llama_dir), out)
    return out


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if a model is loaded or a recipe is run: the check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(api, "load", refuse)
    monkeypatch.setattr(api, "run_recipe", refuse)


def run(args: list[str]):
    return CliRunner().invoke(app, ["eval", *args])


@pytest.mark.parametrize("kind", ["unquantized", "checkpoint", "recipe"])
def test_seq_len_above_max_positions_refused_before_loading(
    kind, tiny_llama_dir, checkpoint, tmp_path, text_file, no_model_work
):
    target = {
        "unquantized": str(tiny_llama_dir),
        "checkpoint": str(checkpoint),
        "recipe": str(write_recipe(tmp_path / "r.yaml", tiny_llama_dir)),
    }[kind]
    res = run([target, "--ppl", text_file, "--seq-len", "100000"])
    assert res.exit_code == 1, res.output
    out = flat(res.output)
    assert "error:" in out
    assert "--seq-len 100000 is longer than the model's max_position_embeddings (512)" in out
    assert "use --seq-len 512 or less" in out
    # the prefix counts too
    res = run([target, "--ppl", text_file, "--seq-len", "512", "--prefix", "bos"])
    assert res.exit_code == 1 and "plus the 1-token prefix" in flat(res.output)


def test_limit_above_windows_says_how_many(tiny_llama_dir, smollm2_tokenizer, text_file, no_model_work):
    total = eval_token_ids(smollm2_tokenizer, text_file).numel() // SEQ
    assert total >= 3
    res = run([str(tiny_llama_dir), "--ppl", text_file, "--seq-len", str(SEQ), "--limit", str(total + 1)])
    assert res.exit_code == 1, res.output
    out = flat(res.output)
    assert f"--limit {total + 1} is more than the {total} windows of {SEQ} tokens" in out
    assert f"use --limit {total} or less" in out


def test_limit_equal_to_windows_runs(tiny_llama_dir, smollm2_tokenizer, text_file, tmp_path):
    total = eval_token_ids(smollm2_tokenizer, text_file).numel() // SEQ
    js = tmp_path / "e.json"
    args = [str(tiny_llama_dir), "--ppl", text_file, "--seq-len", str(SEQ), "--limit", str(total)]
    res = run([*args, "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert json.loads(js.read_text())["protocol"]["windows"] == total


@pytest.mark.parametrize(
    "remove, named",
    [
        ("model.safetensors", "model.safetensors"),
        ("config.json", "config.json"),
        ("tokenizer.json", "tokenizer.json or tokenizer.model or vocab.json"),
        ("tokenizer_config.json", "tokenizer_config.json"),
        ("qtool.json", "qtool.json"),
    ],
)
def test_checkpoint_missing_a_file_names_it(checkpoint, tmp_path, text_file, remove, named, no_model_work):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / remove).unlink()
    res = run([str(broken), "--ppl", text_file, "--seq-len", str(SEQ), "--limit", "1"])
    assert res.exit_code == 1, res.output
    out = flat(res.output)
    assert f"checkpoint {broken} is incomplete: missing {named}" in out
    assert "--overwrite" in out


def test_checkpoint_missing_a_sidecar_names_it(checkpoint, tmp_path, text_file):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    meta = json.loads((broken / "qtool.json").read_text())
    meta["sidecars"] = ["intactkv_pivot.safetensors"]  # as an IntactKV export lists its pivot
    (broken / "qtool.json").write_text(json.dumps(meta))
    with pytest.raises(QtoolError, match="incomplete: missing intactkv_pivot.safetensors"):
        api.inspect_target(str(broken))
    with pytest.raises(QtoolError, match="incomplete: missing intactkv_pivot.safetensors"):
        api.load(str(broken), device="cpu")  # the loader path checks too (qtool generate)


def test_complete_checkpoint_passes_the_check(checkpoint):
    from qtool.export.files import missing_checkpoint_files

    assert missing_checkpoint_files(checkpoint) == []
    info = api.inspect_target(str(checkpoint))
    assert info["kind"] == "checkpoint" and info["config"].max_position_embeddings == 512
