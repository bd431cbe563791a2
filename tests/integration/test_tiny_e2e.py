"""End to end on tiny random Llama/Qwen2/Mistral models: recipe -> quantize -> export -> reload.

A random tiny model's perplexity is close to its vocabulary size whatever its weights, so the
quality of the quantized model is judged by the SQNR of its logits against the full-precision
model's; the round trip (export -> reload) by perplexity to 1e-4 and by the integer codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from qtool import api
from qtool.cli import app
from qtool.eval.perplexity import eval_token_ids, perplexity
from qtool.export.loader import load_checkpoint
from qtool.models.prepare import iter_qlinears
from qtool.quant.quantizer import sqnr_db
from qtool.recipe import load_recipe, parse_recipe

SEQ, WINDOWS = 128, 2
LAYERS, LINEARS = 2, 7


@dataclass(frozen=True)
class Case:
    arch: str
    scheme: str  # YAML body of `scheme:`
    fmt: str
    min_sqnr: float  # logits SQNR against the full-precision model, dB (measured + a 2-5 dB margin)
    group: int | None
    symmetric: bool
    bits: int = 4


CASES = {
    "llama-w4a4kv4-channel": Case(
        "llama",
        "{preset: W4A4KV4, weights: {group_size: null}}",
        "compressed-tensors",
        12.0,
        None,
        True,
    ),
    "llama-w4a16-g32-asym": Case(
        "llama",
        "{preset: W4A16, weights: {group_size: 32, symmetric: false}}",
        "compressed-tensors",
        20.0,
        32,
        False,
    ),
    "llama-w4a16-g32-gptq": Case(
        "llama", "{preset: W4A16, weights: {group_size: 32}}", "gptq", 17.0, 32, True
    ),
    "llama-w8a8": Case("llama", "W8A8", "compressed-tensors", 38.0, None, True, bits=8),
    "qwen2-w4a16-g32-asym": Case(
        "qwen2",
        "{preset: W4A16, weights: {group_size: 32, symmetric: false}}",
        "compressed-tensors",
        20.0,
        32,
        False,
    ),
    "mistral-w4a16-channel": Case("mistral", "W4A16", "compressed-tensors", 17.0, None, True),
}


def write_recipe(path: Path, model_dir: Path, scheme: str, fmt: str = "compressed-tensors") -> Path:
    path.write_text(
        f"model: {model_dir}\n"
        "device: cpu\n"
        "calibration: {dataset: wikitext2, split: validation, samples: 4, seq_len: 64}\n"
        f"scheme: {scheme}\n"
        "steps:\n"
        "  - rtn\n"
        f"  - export: {{format: {fmt}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def eval_ids(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return eval_token_ids(tok)[: SEQ * WINDOWS].view(WINDOWS, SEQ)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def fp_logits(tiny_model_dir, eval_ids):
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch):
        if arch not in cache:
            m = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch), dtype=torch.float32).eval()
            cache[arch] = logits(m, eval_ids)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """Quantize each case once: ``(ctx, output folder, recipe path)``."""
    done = {}

    def get(name):
        if name not in done:
            case = CASES[name]
            work = tmp_path_factory.mktemp(name)
            recipe = write_recipe(work / "recipe.yaml", tiny_model_dir(case.arch), case.scheme, case.fmt)
            out = work / "ckpt"
            ctx = api.quantize(recipe, out, overwrite=False)
            done[name] = (ctx, out, recipe)
        return done[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_and_quality(name, exported, eval_ids, fp_logits, text_file):
    case = CASES[name]
    ctx, out, _ = exported(name)
    assert ctx.results["export"]["format"] == case.fmt
    mem_ppl = perplexity(ctx.model, ctx.tokenizer, text_file, SEQ, WINDOWS)
    model, tok, info = api.load(str(out), device="cpu")
    assert info["kind"] == "checkpoint" and info["format"] == case.fmt
    ppl = perplexity(model, tok, text_file, SEQ, WINDOWS)
    assert ppl.total_windows > WINDOWS
    assert ppl.windows == WINDOWS and ppl.tokens_scored == WINDOWS * (SEQ - 1)
    assert ppl.ppl == pytest.approx(mem_ppl.ppl, rel=1e-4)
    mem, re = logits(ctx.model, eval_ids), logits(model, eval_ids)
    assert sqnr_db(mem, re) > 60.0
    # the quantized model is close to the full-precision one, but really quantized
    quality = sqnr_db(fp_logits(case.arch), re)
    assert case.min_sqnr < quality < case.min_sqnr + 15.0, quality


@pytest.mark.parametrize("name", list(CASES))
def test_reloaded_qlinears_hold_the_exported_codes(name, exported):
    case = CASES[name]
    ctx, out, _ = exported(name)
    model, _, _ = load_checkpoint(out, device="cpu")  # with the codes (evaluation drops them)
    mem = {(i, n): lin for i, n, lin in iter_qlinears(ctx.model)}
    seen = 0
    for i, n, lin in iter_qlinears(model):
        qw, ref = lin.qweight, mem[(i, n)].qweight
        assert qw is not None and ref is not None
        spec = qw.spec
        assert (spec.bits, spec.symmetric, spec.group_size) == (case.bits, case.symmetric, case.group)
        assert torch.equal(qw.codes, ref.codes)
        assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
        assert torch.equal(qw.scale, ref.scale.float())
        assert torch.equal(qw.zero, ref.zero)
        # the layer computes with exactly the dequantized codes
        assert torch.equal(lin.weight, qw.dequantize().to(lin.weight.dtype))
        if lin.bias is not None:
            assert torch.equal(lin.bias, mem[(i, n)].bias)
        seen += 1
    assert seen == LAYERS * LINEARS


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_contents(name, exported, tiny_model_dir):
    case = CASES[name]
    ctx, out, recipe_path = exported(name)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "qtool.json", "recipe.yaml", "model.safetensors", "tokenizer.json"} <= files
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == case.arch
    if case.fmt == "gptq":
        assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 32, True)
    else:
        assert qc["quant_method"] == "compressed-tensors"
        assert qc["format"] == ("pack-quantized" if case.bits == 4 else "int-quantized")
        w = qc["config_groups"]["group_0"]["weights"]
        assert (w["num_bits"], w["symmetric"], w["group_size"]) == (case.bits, case.symmetric, case.group)
        assert w["strategy"] == ("group" if case.group else "channel")
        assert qc["ignore"] == ["lm_head"]

    meta = json.loads((out / "qtool.json").read_text())
    assert meta["format"] == case.fmt and meta["checkpoint_dtype"] == "bfloat16"
    assert meta["scheme"] == ctx.recipe.scheme.model_dump(mode="json")
    assert len(meta["quantized_modules"]) == LAYERS * LINEARS
    assert "model.layers.1.mlp.down_proj" in meta["quantized_modules"]

    saved = parse_recipe((out / "recipe.yaml").read_text())
    assert saved.to_dict() == load_recipe(recipe_path).to_dict()

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        p = "model.layers.0.self_attn.q_proj"
        # no float weight for quantized linears (8-bit stores its int8 codes as `weight`)
        assert f"{p}.weight" not in keys or fh.get_tensor(f"{p}.weight").dtype == torch.int8
        groups = 64 // case.group if case.group else 1
        if case.fmt == "gptq":
            assert fh.get_tensor(f"{p}.qweight").shape == (64 // 8, 64)
            assert fh.get_tensor(f"{p}.scales").shape == (groups, 64)
            assert fh.get_tensor(f"{p}.qzeros").shape == (groups, 64 // 8)
            assert fh.get_tensor(f"{p}.g_idx").tolist() == [c // 32 for c in range(64)]
        elif case.bits == 4:
            packed = fh.get_tensor(f"{p}.weight_packed")
            assert packed.dtype == torch.int32 and packed.shape == (64, 8)
            assert fh.get_tensor(f"{p}.weight_shape").tolist() == [64, 64]
        else:
            assert fh.get_tensor(f"{p}.weight").dtype == torch.int8
        if case.fmt != "gptq":
            scale = fh.get_tensor(f"{p}.weight_scale")
            assert scale.dtype == torch.bfloat16 and scale.shape == (64, groups)
            if not case.symmetric:
                assert fh.get_tensor(f"{p}.weight_zero_point").shape == (64 // 8, groups)
            else:
                assert f"{p}.weight_zero_point" not in keys
        # unquantized tensors are stored in the checkpoint dtype
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert fh.get_tensor("model.norm.weight").dtype == torch.bfloat16
        tied = case.arch == "llama"
        assert ("lm_head.weight" in keys) == (not tied)
        if case.arch == "qwen2":
            from safetensors.torch import load_file

            src = load_file(str(tiny_model_dir("qwen2") / "model.safetensors"))
            bias = fh.get_tensor(f"{p}.bias")
            assert torch.equal(bias, src[f"{p}.bias"]) and float(bias.abs().max()) > 0


def test_export_refuses_gptq_for_activation_quantization(tiny_llama_dir, tmp_path):
    from qtool.errors import QtoolError

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, "W4A4", "gptq")
    with pytest.raises(QtoolError, match="format gptq holds symmetric 4-bit weight-only"):
        api.quantize(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_target_is_quantized_in_memory(exported, text_file):
    # `qtool eval recipe.yaml` path: quantize in memory without exporting; same model as the export
    ctx, out, recipe_path = exported("llama-w4a16-g32-asym")
    model, _, info = api.load(str(recipe_path), device="cpu")
    assert info["kind"] == "in-memory" and info["scheme"] == "W4A16"
    mem = perplexity(model, ctx.tokenizer, text_file, SEQ, WINDOWS).ppl
    assert mem == pytest.approx(perplexity(ctx.model, ctx.tokenizer, text_file, SEQ, WINDOWS).ppl, rel=1e-4)


def test_cli_quantize_and_eval_json(tiny_llama_dir, tmp_path, text_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, "{preset: W4A16, weights: {group_size: 32}}")
    out = tmp_path / "ckpt"
    runner = CliRunner()
    res = runner.invoke(
        app, ["quantize", str(recipe), "--output", str(out), "--json", str(tmp_path / "q.json")]
    )
    assert res.exit_code == 0, res.output
    qres = json.loads((tmp_path / "q.json").read_text())
    assert qres["results"]["export"]["path"] == str(out)
    assert qres["results"]["export"]["decoder_linear_bytes"] < qres["results"]["export"]["bytes"]
    assert len(qres["results"]["rtn"]["layer_errors"]) == LAYERS * LINEARS

    js = tmp_path / "eval.json"
    args = [
        "eval",
        str(out),
        "--ppl",
        "wikitext2",
        "--seq-len",
        str(SEQ),
        "--limit",
        str(WINDOWS),
        "--json",
        str(js),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    model, tok, _ = api.load(str(out), device="cpu")
    assert data["ppl"] == pytest.approx(perplexity(model, tok, "wikitext2", SEQ, WINDOWS).ppl, rel=1e-6)
    assert f"ppl={data['ppl']:.6f}" in res.output
    p = data["protocol"]
    assert (p["seq_len"], p["windows"], p["prefix"], p["split"]) == (SEQ, WINDOWS, "none", "test")
    assert p["tokens_scored"] == WINDOWS * (SEQ - 1) and p["total_windows"] > WINDOWS
    assert len(data["nll_per_window"]) == WINDOWS
    assert data["loaded"]["kind"] == "checkpoint"
    assert {"qtool", "torch", "transformers", "python"} <= set(data["versions"])
    # the unquantized source evaluates through the same command
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_llama_dir),
            "--ppl",
            text_file,
            "--seq-len",
            str(SEQ),
            "--limit",
            "1",
            "--json",
            str(js),
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(js.read_text())["loaded"]["kind"] == "unquantized"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["scheme"]["weights"]["group_size"] == 32


def test_cli_eval_bad_dtype_and_missing_model(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path), "--dtype", "int8"])
    assert res.exit_code == 1 and "--dtype must be float32, bfloat16 or float16" in " ".join(
        res.output.split()
    )
    res = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--limit", "1"])
    assert res.exit_code == 1 and "error" in res.output
