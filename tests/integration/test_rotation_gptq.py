"""Rotation is function-preserving; GPTQ runs sequentially; rotated W4A4KV4 exports round-trip."""

from __future__ import annotations

import math

import pytest
import torch

from qtool import api
from qtool.eval.perplexity import perplexity
from qtool.export.loader import load_checkpoint
from qtool.models.loading import load_hf_model
from qtool.models.prepare import prepare_model
from qtool.recipe import Recipe, parse_recipe
from qtool.steps import parse_step
from qtool.steps.base import Context


def _rotate_in_place(model, kv: bool, kind: str = "hadamard", head_mix: bool = True) -> None:
    scheme = "{preset: FP, kv_cache: {bits: 4}}" if kv else "FP"
    recipe = parse_recipe(f"model: x\nscheme: {scheme}\nsteps: [rotate]")
    prepare_model(model, recipe.scheme)
    from qtool.models.prepare import set_quantization_enabled

    set_quantization_enabled(model, False)  # FP: rotations only, no quantization
    ctx = Context(recipe=recipe, model=model, tokenizer=None, device=torch.device("cpu"))
    parse_step({"rotate": {"kind": kind, "qk": kv, "head_mix": head_mix}}, 0).apply(ctx)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kind", ["hadamard", "random_orthogonal"])
def test_rotation_preserves_logits_tiny(tiny_model_dir, arch, kind):
    model, _ = load_hf_model(str(tiny_model_dir(arch)), "float32", "cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norm gains, as in real models
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    ref = model(ids).logits
    _rotate_in_place(model, kv=True, kind=kind)
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert not model.config.tie_word_embeddings


def test_rotation_without_head_mixing_preserves_logits(tiny_model_dir):
    """``head_mix: false``: V/O rotated per head only, nothing online before o_proj, same function."""
    model, _ = load_hf_model(str(tiny_model_dir("llama")), "float32", "cpu")
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    ref = model(ids).logits
    _rotate_in_place(model, kv=True, head_mix=False)
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.input_transform is None
    assert layer.mlp.down_proj.input_transform is not None


def test_rotation_online_modules_present(tiny_model_dir):
    model, _ = load_hf_model(str(tiny_model_dir("llama")), "float32", "cpu")
    _rotate_in_place(model, kv=True)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.input_transform is not None
    assert layer.self_attn.o_proj.input_transform is not None
    assert layer.self_attn.qtool.qk_rotate is not None


def _recipe(model_dir, steps, scheme, out=None):
    return Recipe.model_validate(
        {
            "model": str(model_dir),
            "calibration": {"samples": 4, "seq_len": 64},
            "scheme": scheme,
            "steps": steps,
            "output": out,
        }
    )


W4A4KV4 = {
    "preset": "W4A4KV4",
    "weights": {"group_size": None},
    "activations": {"bits": 4, "clip_ratio": 0.9},
    "kv_cache": {"bits": 4, "clip_ratio": 0.95},
}


def test_gptq_beats_rtn_and_reports_errors(tiny_model_dir):
    d = tiny_model_dir("llama")
    scheme = {"preset": "W4A16", "weights": {"bits": 3, "group_size": None}}
    fp_model, tok = load_hf_model(str(d), "float32", "cpu")
    fp = perplexity(fp_model, tok, seq_len=128, limit=4).ppl
    rtn = api.run_recipe(_recipe(d, ["rtn"], scheme), export=False)
    gptq = api.run_recipe(_recipe(d, [{"gptq": {"mse_clip": False}}], scheme), export=False)
    p_rtn = perplexity(rtn.model, tok, seq_len=128, limit=4).ppl
    p_gptq = perplexity(gptq.model, tok, seq_len=128, limit=4).ppl
    errors = gptq.results["gptq"]["layer_errors"]
    assert len(errors) == 2 * 7 and all(math.isfinite(e) for e in errors.values())
    # a random tiny model is nearly insensitive; GPTQ must at least not be worse than RTN
    assert abs(p_gptq - fp) <= abs(p_rtn - fp) + 1e-3 * fp


@pytest.mark.parametrize("head_mix", [True, False])
def test_rotated_w4a4kv4_export_reload_same_ppl(tiny_model_dir, tmp_path, head_mix):
    d = tiny_model_dir("qwen2")
    out = tmp_path / "ckpt"
    steps = [{"rotate": {"head_mix": head_mix}}, {"gptq": {"act_order": True}}]
    ctx = api.run_recipe(_recipe(d, steps, W4A4KV4, str(out)))
    mem = perplexity(ctx.model, ctx.tokenizer, seq_len=128, limit=3).ppl
    model, tok, info = api.load(str(out), "float32", "cpu")
    assert info["kind"] == "checkpoint"
    again = perplexity(model, tok, seq_len=128, limit=3).ppl
    assert abs(again - mem) / mem < 1e-4
    # evaluation on the CPU keeps only the dequantized weights, not the codes beside them: same math
    down = model.model.layers[0].mlp.down_proj
    assert down.qweight is None and down.weight_spec.bits == 4 and "W4A4" in down.extra_repr()
    with_codes, _, _ = load_checkpoint(out, "float32", "cpu")
    assert with_codes.model.layers[0].mlp.down_proj.qweight is not None
    assert perplexity(with_codes, tok, seq_len=128, limit=3).ppl == again
    assert model.model.layers[0].mlp.down_proj.input_transform is not None
    assert (model.model.layers[0].self_attn.o_proj.input_transform is not None) == head_mix


@pytest.mark.slow
def test_smollm2_rotation_preserves_ppl(smollm2_path):
    model, tok = load_hf_model("smollm2-135m", "float32", "cpu")
    ref = perplexity(model, tok, seq_len=512, limit=2).ppl
    _rotate_in_place(model, kv=True)
    rot = perplexity(model, tok, seq_len=512, limit=2).ppl
    assert abs(rot - ref) / ref < 1e-3
