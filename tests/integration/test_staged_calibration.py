"""The staged calibration pass (each part of a decoder layer computed once per group) and the shared
Hessians of linears reading the same input give bit-identical checkpoints to the classic passes
(the layer re-run from its input for every group, one Hessian per linear)."""

from __future__ import annotations

import filecmp

import pytest
import torch

from qtool.api import run_recipe
from qtool.recipe import Recipe
from qtool.steps import layerwise
from qtool.steps.layerwise import LayerwiseRunner

CASES = {
    "gptq": ("W4A16", [{"gptq": {"act_order": True, "batch_size": 2}}]),
    "rotate+gptq": ("W4A4KV4", ["rotate", {"gptq": {"act_order": True, "batch_size": 2}}]),
    "rotate+lowrank": ("W4A4", ["rotate", {"lowrank": {"rank": 4, "batch_size": 2}}]),
}


def run(model, tmp_path, name: str, preset: str, steps: list):
    """Quantize the tiny model (6 x 32 calibration tokens) into ``tmp_path / name``; the step context."""
    recipe = Recipe.model_validate(
        {
            "model": str(model),
            "device": "cpu",
            "calibration": {"samples": 6, "seq_len": 32},
            "scheme": {"preset": preset, "weights": {"group_size": 32}},
            "steps": steps,
        }
    )
    return run_recipe(recipe, tmp_path / name)


def quantize(model, tmp_path, name: str, preset: str, steps: list):
    run(model, tmp_path, name, preset, steps)
    return tmp_path / name


@pytest.mark.parametrize("case", list(CASES))
def test_staged_pass_writes_the_same_bytes_as_the_classic_passes(tiny_llama_dir, tmp_path, monkeypatch, case):
    preset, steps = CASES[case]
    calls = []
    real = LayerwiseRunner.staged

    def spy(self, layer, groups):
        calls.append(real(self, layer, groups))
        return calls[-1]

    monkeypatch.setattr(LayerwiseRunner, "staged", spy)
    staged = quantize(tiny_llama_dir, tmp_path, "staged", preset, steps)
    assert calls and all(c is not None for c in calls)  # the staged path ran for every layer
    monkeypatch.setattr(layerwise, "KEEP_DOWN_INPUTS_SHARE", 0.0)  # down_proj inputs recomputed at the end
    recomputed = quantize(tiny_llama_dir, tmp_path, "recomputed", preset, steps)
    monkeypatch.setattr(LayerwiseRunner, "staged", lambda self, layer, groups: None)
    # and without sharing one Hessian / one set of statistics among q/k/v and gate/up
    monkeypatch.setattr(layerwise, "share_key", lambda name, lin, group, lins: name)
    classic = quantize(tiny_llama_dir, tmp_path, "classic", preset, steps)
    for other in (staged, recomputed):
        names = sorted(p.name for p in classic.iterdir())
        assert names == sorted(p.name for p in other.iterdir())
        assert [n for n in names if not filecmp.cmp(classic / n, other / n, shallow=False)] == []


def test_act_quant_in_calibration_switch(tiny_llama_dir, tmp_path):
    """``gptq: {act_quant_in_calibration: false}`` pushes the windows through quantized weights with
    full-precision activations and KV: the same bytes when nothing but weights is quantized, other
    codes under W4A4KV4, and activation/KV quantization on again in the model afterwards."""
    from qtool.models.adapters import get_adapter
    from qtool.models.prepare import iter_qlinears

    on = {"gptq": {"batch_size": 2}}
    off = {"gptq": {"batch_size": 2, "act_quant_in_calibration": False}}
    run(tiny_llama_dir, tmp_path, "w4a16-on", "W4A16", [on])
    run(tiny_llama_dir, tmp_path, "w4a16-off", "W4A16", [off])
    names = sorted(p.name for p in (tmp_path / "w4a16-on").iterdir() if p.name != "recipe.yaml")
    assert [
        n
        for n in names
        if not filecmp.cmp(tmp_path / "w4a16-on" / n, tmp_path / "w4a16-off" / n, shallow=False)
    ] == []
    ctx_on = run(tiny_llama_dir, tmp_path, "a4-on", "W4A4KV4", ["rotate", on])
    ctx_off = run(tiny_llama_dir, tmp_path, "a4-off", "W4A4KV4", ["rotate", off])
    codes = {
        (i, n): (lin.qweight.codes, other.qweight.codes)
        for (i, n, lin), (_, _, other) in zip(
            iter_qlinears(ctx_on.model), iter_qlinears(ctx_off.model), strict=True
        )
    }
    assert all(torch.equal(*codes[(0, n)]) for n in ("q_proj", "k_proj", "v_proj"))  # same first inputs
    assert not all(torch.equal(a, b) for a, b in codes.values())
    adapter = get_adapter(ctx_off.model.config)
    assert all(lin.act_quant_enabled for _, _, lin in iter_qlinears(ctx_off.model))
    assert all(adapter.attention(layer).qtool.enabled for layer in adapter.layers(ctx_off.model))
