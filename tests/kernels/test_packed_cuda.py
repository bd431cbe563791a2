"""GPU: a real exported SmolLM2 checkpoint served by the packed kernels matches the fake-quant path."""

from __future__ import annotations

import pytest
import torch

import qtool.ops as ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(ops.backend() != "cuda", reason="needs the built qtool_cuda extension (make kernels)"),
]


@pytest.mark.parametrize(
    "scheme", ["{preset: W4A16, weights: {group_size: 64}}", "{preset: W4A16, weights: {group_size: null}}"]
)
def test_packed_checkpoint_ppl_matches_fake_quant(tmp_path, scheme):
    from qtool import api
    from qtool.eval.perplexity import perplexity
    from qtool.recipe import parse_recipe

    recipe = parse_recipe(f"model: smollm2-135m\nscheme: {scheme}\nsteps: [rtn]")
    out = tmp_path / "ckpt"
    api.run_recipe(recipe, output=out)
    results = {}
    for kernels in ("off", "on"):
        model, tok, info = api.load(str(out), "float16", "cuda", kernels)
        assert ("kernels" in info) == (kernels == "on")
        results[kernels] = perplexity(model, tok, seq_len=2048, limit=4).ppl
    assert abs(results["on"] - results["off"]) / results["off"] < 1e-3
