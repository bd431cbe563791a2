"""End to end: KV methods through the CLI (tiny model) and on SmolLM2-135M (slow).

recipe (rotate + kv_smooth + rtn + intactkv, past-only KV) -> ``qtool quantize`` -> checkpoint with
the pivot sidecar -> ``qtool eval --prefix bos`` (uses the pivot, same perplexity as in memory) and
``qtool generate`` (pivot + quantized KV cache, system prompt in 16 bits).
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli import app
from qtool.eval.perplexity import perplexity

SEQ = 64

RECIPE = """
model: {model}
device: cpu
checkpoint_dtype: float32
calibration: {{samples: 4, seq_len: 64}}
scheme:
  weights: {{bits: 4, group_size: 32}}
  activations: {{bits: 8}}
  kv_cache: {{bits: 4, past_only: true}}
steps:
  - rotate
  - kv_smooth: {{learn: {{samples: 2, seq_len: 32, batch_size: 2}}}}
  - rtn
  - intactkv: {{pivot: bos}}
  - export
"""


def test_cli_quantize_eval_generate_with_pivot(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(model=tiny_llama_dir))
    out = tmp_path / "ckpt"
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(recipe), "--output", str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "qtool.json").read_text())
    assert meta["sidecars"] == ["intactkv_pivot.safetensors"] and "kv_smooth" in meta["runtime"]

    from qtool import api

    ctx = api.quantize(recipe, tmp_path / "again")
    want = perplexity(ctx.model, ctx.tokenizer, seq_len=SEQ, limit=2, prefix="bos").ppl
    js = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        [
            "eval",
            str(out),
            "--seq-len",
            str(SEQ),
            "--limit",
            "2",
            "--prefix",
            "bos",
            "--device",
            "cpu",
            "--json",
            str(js),
        ],
    )
    assert res.exit_code == 0, res.output
    got = json.loads(js.read_text())
    assert got["protocol"]["prefix"] == "bos"
    assert abs(got["ppl"] - want) / want < 1e-4

    gj = tmp_path / "gen.json"
    res = runner.invoke(
        app,
        [
            "generate",
            str(out),
            "--prompt",
            "Name a colour.",
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
            "--json",
            str(gj),
        ],
    )
    assert res.exit_code == 0, res.output
    g = json.loads(gj.read_text())
    assert "tokens/s" in res.output and 1 <= len(g["new_token_ids"]) <= 4
    assert g["pivot"] == [ctx.tokenizer.bos_token_id] and g["prefix_tokens"] > 1  # system prompt in 16 bits
    assert g["kv_cache"].startswith("16-bit")  # no CUDA extension here: auto keeps the fake-quant path
    # --kernels on: packed int4 linears + int4 KV cache (op references on CPU), same greedy tokens
    gk = tmp_path / "gen_kernels.json"
    args = ["generate", str(out), "--prompt", "Name a colour.", "--system", "Be brief."]
    args += ["--max-new-tokens", "4", "--device", "cpu", "--kernels", "on", "--json", str(gk)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    k = json.loads(gk.read_text())
    assert k["kv_cache"] == "int4 packed" and "int4 packed" in res.output
    assert k["loaded"]["kernels"]["skipped"] > 0  # A8 linears have no packed kernel: they stay fake-quant
    assert k["new_token_ids"][:2] == g["new_token_ids"][:2]
    res = runner.invoke(
        app,
        [
            "generate",
            str(out),
            "--prompt",
            "Hi",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_smollm2_intactkv_and_smoothing(smollm2_path):
    """SmolLM2-135M, W4KV4 (RTN-g64 weights, past-only KV): kv_smooth keeps the FP function and
    the IntactKV-B pivot lowers the loss of the same tokens (one 512-token window)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.api import run_recipe
    from qtool.eval.perplexity import eval_token_ids, window_nll
    from qtool.recipe import Recipe

    r = Recipe.model_validate(
        {
            "model": str(smollm2_path),
            "device": "cpu",
            "calibration": {"samples": 4, "seq_len": 256},
            "scheme": {"weights": {"bits": 4, "group_size": 64}, "kv_cache": {"bits": 4, "past_only": True}},
            "steps": ["kv_smooth", "rtn", "intactkv"],
        }
    )
    ctx = run_recipe(r, export=False)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    w = eval_token_ids(tok)[:512][None]
    bos = [tok.bos_token_id]
    fp = ctx.fp_reference()
    ref = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(fp(w[:, :128]).logits, ref(w[:, :128]).logits, rtol=1e-3, atol=2e-3)
        with_pivot = float(window_nll(ctx.model, w, bos))
        pivot = ctx.model.qtool_pivot
        ctx.model.qtool_pivot = None
        without = float(window_nll(ctx.model, w, bos))
        ctx.model.qtool_pivot = pivot
    assert with_pivot < without
