"""``clip_search``: per-linear activation and per-layer KV clip ratios, exported and reloaded."""

from __future__ import annotations

import json

import pytest

from qtool.api import load, quantize
from qtool.errors import QtoolError
from qtool.eval.perplexity import perplexity
from qtool.models.adapters import get_adapter
from qtool.models.prepare import iter_qlinears
from qtool.recipe import parse_recipe

RECIPE = """
model: {model}
device: cpu
checkpoint_dtype: float32
calibration: {{samples: 4, seq_len: 64}}
scheme:
  preset: W4A4KV4
  weights: {{bits: 4, group_size: null}}
  activations: {{bits: 4, clip_ratio: 0.9}}
  kv_cache: {{bits: 4, symmetric: false, clip_ratio: 0.95}}
steps:
  - rotate
  - clip_search: {{grid: [0.6, 0.7, 0.8, 0.9, 0.95, 1.0]}}
  - rtn
"""


def test_clip_search_export_reload(tiny_llama_dir, tmp_path):
    ctx = quantize(parse_recipe(RECIPE.format(model=tiny_llama_dir)), tmp_path / "ckpt")
    res = ctx.results["clip_search"]
    grid = {0.6, 0.7, 0.8, 0.9, 0.95, 1.0}
    assert set(res["act"].values()) <= grid and set(res["kv"].values()) <= grid
    assert len(res["kv"]) == ctx.model.config.num_hidden_layers
    # the chosen ratios are not worse than the scheme's on the calibration objective
    assert res["mean_error_vs_scheme_clip"] <= res["max_error_vs_scheme_clip"] <= 1.0
    ratios = {f"layers.{i}.{n}": lin.act_spec.clip_ratio for i, n, lin in iter_qlinears(ctx.model)}
    assert ratios == res["act"] and len(set(ratios.values())) >= 1
    meta = json.loads((tmp_path / "ckpt" / "qtool.json").read_text())
    assert meta["runtime"]["clip_search"]["act"] == res["act"]
    model, tok, _ = load(str(tmp_path / "ckpt"), device="cpu", kernels="off")
    assert {f"layers.{i}.{n}": lin.act_spec.clip_ratio for i, n, lin in iter_qlinears(model)} == ratios
    adapter = get_adapter(model.config)
    kv = {
        f"layers.{i}": adapter.attention(layer).qtool.k_spec.clip_ratio
        for i, layer in enumerate(adapter.layers(model))
    }
    assert kv == res["kv"]
    want = perplexity(ctx.model, ctx.tokenizer, seq_len=64, limit=2).ppl
    got = perplexity(model, tok, seq_len=64, limit=2).ppl
    assert abs(got - want) / want < 1e-4


def test_clip_search_bad_input(tiny_llama_dir):
    with pytest.raises(QtoolError, match="grid"):
        parse_recipe(
            f"model: {tiny_llama_dir}\nscheme: {{preset: W4A4}}\nsteps: [{{clip_search: {{grid: [1.5]}}}}, rtn]"
        )
    r = parse_recipe(
        f"model: {tiny_llama_dir}\ndevice: cpu\nscheme: {{preset: W4A16}}\nsteps: [clip_search, rtn]"
    )
    from qtool.api import run_recipe

    with pytest.raises(QtoolError, match="needs scheme.activations or scheme.kv_cache"):
        run_recipe(r, export=False)
