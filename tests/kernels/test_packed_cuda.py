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
    from qtool.errors import QtoolError
    from qtool.models.loading import _embedded_folder

    try:
        _embedded_folder("smollm2-135m")
    except QtoolError as exc:  # the GPU machine may not carry the 98 MB model
        pytest.skip(str(exc))
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


@pytest.mark.parametrize("past_only", [True, False])
def test_packed_kv_generation_matches_fake_quant(past_only):
    """Random Llama-shaped model (head_dim 64), W4A16-g64 + KV4: packed linears + int4 KV cache
    (CUDA kernels) against the fake-quant path, prefill and decode steps, by logits SQNR."""
    from qtool.algorithms.gptq import rtn_quantize
    from qtool.bench.generate import random_model
    from qtool.models.kv4_runtime import PackedKVCache
    from qtool.models.packed import pack_model
    from qtool.models.pivot import cache_kw
    from qtool.models.prepare import iter_qlinears, prepare_model
    from qtool.models.qlinear import QuantizedWeight
    from qtool.quant.quantizer import sqnr_db
    from qtool.recipe import Scheme

    model = random_model("tiny", torch.float16, "cuda")
    scheme = Scheme.model_validate(
        {"weights": {"bits": 4, "group_size": 64}, "kv_cache": {"bits": 4, "past_only": past_only}}
    )
    prepare_model(model, scheme)
    spec = scheme.weights.spec()
    for _, _, lin in iter_qlinears(model):
        res = rtn_quantize(lin.weight.data.float(), spec, scale_dtype=torch.float16)
        lin.set_quantized(QuantizedWeight(res.codes, res.scale, res.zero, spec))
    ids = torch.randint(0, model.config.vocab_size, (2, 80), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        pack_model(model)
        cache = PackedKVCache(2, 80)
        got = [model(input_ids=ids[:, :48], **cache_kw(cache), use_cache=True).logits]
        for t in range(48, 80, 4):  # decode op with 4 new tokens a step
            got.append(model(input_ids=ids[:, t : t + 4], **cache_kw(cache), use_cache=True).logits)
    got = torch.cat(got, dim=1).float()
    assert sqnr_db(want, got) > 25
