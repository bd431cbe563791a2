"""The ``lowrank`` step: options, correction quality, LoRA export and reload."""

from __future__ import annotations

import json

import pytest
import torch

from qtool.quant.quantizer import QSpec, fake_quant, sqnr_db
from qtool.recipe import Recipe
from qtool.steps import StepError, parse_step


def run_steps(model_dir, steps, scheme, out=None, calib=None, **recipe):
    """Run ``steps`` on the tiny model with fixed calibration ids (no dataset tokenization)."""
    from qtool.models.loading import load_hf_model
    from qtool.models.prepare import prepare_model
    from qtool.steps.base import Context

    recipe = Recipe.model_validate(
        {"model": str(model_dir), "device": "cpu", "scheme": scheme, "steps": steps, **recipe}
    )
    model, tok = load_hf_model(str(model_dir), device="cpu")
    prepare_model(model, recipe.scheme)
    ctx = Context(
        recipe=recipe, model=model, tokenizer=tok, device=torch.device("cpu"), output=out, overwrite=True
    )
    ctx._calibration = (
        calib
        if calib is not None
        else torch.randint(0, 2000, (8, 64), generator=torch.Generator().manual_seed(0))
    )
    for step in recipe.steps:
        step.apply(ctx)
    return ctx


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, 2000, (2, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp_logits(tiny_llama_dir, eval_ids):
    from qtool.models.loading import load_hf_model

    model, _ = load_hf_model(str(tiny_llama_dir), device="cpu")
    return model(eval_ids).logits


def test_options_are_validated():
    with pytest.raises(StepError, match="exactly one of `rank`"):
        parse_step({"lowrank": {"rank": 4, "rank_fraction": 0.1}}, 0)
    with pytest.raises(StepError, match="exactly one of `rank`"):
        parse_step({"lowrank": {}}, 0)
    with pytest.raises(StepError, match="iterations"):
        parse_step({"lowrank": {"rank": 4, "iterations": 6}}, 0)
    step = parse_step({"lowrank": {"rank_fraction": 0.1}}, 0)
    assert step.rank_for(576, 576) == round(0.1 * 576 * 576 / 1152)
    assert parse_step({"lowrank": {"rank": 10_000}}, 0).rank_for(64, 32) == 32


def test_correction_improves_on_plain_gptq(tiny_llama_dir, eval_ids, fp_logits):
    scheme = {"preset": "W4A4"}
    base = run_steps(tiny_llama_dir, ["rotate", {"lowrank": {"rank": 0}}], scheme)
    corr = run_steps(tiny_llama_dir, ["rotate", {"lowrank": {"rank_fraction": 0.3, "iterations": 2}}], scheme)
    s_base = sqnr_db(fp_logits, base.model(eval_ids).logits)
    s_corr = sqnr_db(fp_logits, corr.model(eval_ids).logits)
    assert s_corr > s_base + 1.0, (s_base, s_corr)
    res = corr.results["lowrank"]
    assert res["extra_parameters"] > 0 and base.results["lowrank"]["extra_parameters"] == 0
    down = corr.model.model.layers[0].mlp.down_proj
    assert down.lora_U.shape == (64, round(0.3 * 64 * 128 / 192)) and down.input_transform is not None


def test_export_reload_reproduces_corrected_model(tiny_llama_dir, tmp_path, eval_ids):
    from qtool.export.loader import load_checkpoint
    from qtool.models.lora import ADAPTER_FILE, CONFIG_FILE

    out = tmp_path / "ckpt"
    steps = ["rotate", {"lowrank": {"rank": 5, "targets": ["q_proj", "o_proj", "down_proj"]}}, "export"]
    ctx = run_steps(tiny_llama_dir, steps, {"preset": "W4A4KV4"}, out=out)
    expected = ctx.model(eval_ids).logits

    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 5 and config["lora_alpha"] == 5
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"]
    from safetensors.torch import load_file

    tensors = load_file(str(out / ADAPTER_FILE))
    a = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (5, 128) and b.shape == (64, 5) and a.dtype == torch.bfloat16
    assert len(tensors) == 2 * 3 * 2  # A and B, 3 linears, 2 layers
    size = ctx.results["export"]["bytes"]
    assert size >= (out / "model.safetensors").stat().st_size + (out / ADAPTER_FILE).stat().st_size

    model, _, meta = load_checkpoint(out, device="cpu")
    assert ADAPTER_FILE in meta["sidecars"]
    assert model.model.layers[0].self_attn.k_proj.lora_U is None
    got = model(eval_ids).logits
    # every tensor equals the in-memory one and is laid out the same: the logits are bit-identical
    assert torch.equal(expected, got), float((expected - got).abs().max())
    nll = torch.nn.functional.cross_entropy
    ppl = [nll(x[:, :-1].flatten(0, 1), eval_ids[:, 1:].flatten()).exp() for x in (expected, got)]
    assert float(ppl[1]) == pytest.approx(float(ppl[0]), rel=1e-4)


def test_activation_groups_that_do_not_divide_a_width_need_ragged(tiny_llama_dir):
    """Activation group 48 on the tiny model's 64-wide inputs: a clear error, unless ragged."""
    from qtool.errors import QtoolError

    scheme = {"preset": "W4A4", "activations": {"bits": 4, "group_size": 48}}
    with pytest.raises((ValueError, QtoolError), match="group_size 48 does not divide the input width 64"):
        run_steps(tiny_llama_dir, ["rtn"], scheme)
    scheme["activations"]["ragged"] = True
    ctx = run_steps(tiny_llama_dir, ["rtn"], scheme)
    lin = ctx.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(
        lin.quantize_input(x)[..., 48:], fake_quant(x[..., 48:], QSpec(4, True, "token"))
    )


def test_lowrank_factors_compute_the_same_in_any_input_layout():
    """The solver's V is column-major (LAPACK), a reloaded one row-major: the output must not care."""
    from qtool.models.qlinear import QLinear

    g = torch.Generator().manual_seed(0)
    d, k, m = 1536, 42, 64
    lin = QLinear(torch.randn(m, d, generator=g))
    x = torch.randn(1, 512, d, generator=g)  # a 512-token window: here the two layouts sum differently
    U = torch.randn(m, k, generator=g)
    V_col = torch.randn(k, d, generator=g).t()  # [d, k], strides (1, d)
    assert not V_col.is_contiguous()
    lin.set_lowrank(U, V_col)
    y_solver = lin(x)
    lin.set_lowrank(U.clone(), V_col.contiguous())
    assert torch.equal(y_solver, lin(x))


def test_init_and_cross_shrink_options():
    step = parse_step({"lowrank": {"rank": 4}}, 0)
    assert step.init == "closed_form" and step.cross_shrink == "auto"
    step = parse_step({"lowrank": {"rank": 4, "init": "zero", "cross_shrink": 0.5}}, 0)
    assert step.init == "zero" and step.cross_shrink == 0.5
    assert parse_step({"lowrank": {"rank": 4, "cross_shrink": 1}}, 0).cross_shrink == 1.0
    with pytest.raises(StepError, match="init"):
        parse_step({"lowrank": {"rank": 4, "init": "random"}}, 0)
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(StepError, match="cross_shrink"):
            parse_step({"lowrank": {"rank": 4, "cross_shrink": bad}}, 0)
