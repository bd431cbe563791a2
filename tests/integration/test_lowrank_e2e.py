"""SmolLM2-135M: rotate + lowrank, export, reload: the reloaded model reproduces the perplexity."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_lowrank_export_reload_reproduces_ppl(tmp_path):
    from qtool.api import run_recipe
    from qtool.eval.perplexity import perplexity
    from qtool.export.loader import load_checkpoint
    from qtool.recipe import Recipe

    recipe = Recipe.model_validate(
        {
            "model": "smollm2-135m",
            "device": "cpu",
            "calibration": {"samples": 4, "seq_len": 128},
            "scheme": {"preset": "W4A4KV4", "activations": {"bits": 4, "clip_ratio": 0.9}},
            # kept small for CI: the reload check does not depend on calibration size or clip search
            "steps": [
                "rotate",
                {
                    "lowrank": {
                        "rank_fraction": 0.1,
                        "mse_clip": False,
                        "true_sequential": False,
                        "targets": ["o_proj", "down_proj"],
                    }
                },
            ],
        }
    )
    out = tmp_path / "lrc"
    ctx = run_recipe(recipe, output=out)
    assert (out / "adapter_model.safetensors").is_file()
    assert ctx.results["export"]["bytes"] > (out / "model.safetensors").stat().st_size
    with torch.no_grad():
        mem = perplexity(ctx.model, ctx.tokenizer, seq_len=512, limit=2).ppl
        model, tok, _ = load_checkpoint(out, device="cpu")
        assert model.model.layers[0].mlp.down_proj.lora_U is not None
        back = perplexity(model, tok, seq_len=512, limit=2).ppl
    assert back == mem  # bit-identical: same tensors, same layouts, same summation order
