"""``clip_search``: per-linear activation and per-layer KV clip ratios, exported and reloaded."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qtool.api import load, quantize
from qtool.errors import QtoolError
from qtool.eval.perplexity import perplexity
from qtool.models.adapters import get_adapter
from qtool.models.prepare import iter_qlinears
from qtool.quant.quantizer import fake_quant
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
    # layer 0's q_proj reads the (rotated) embeddings through its norm, whatever later layers chose:
    # its ratio must be the grid's argmin of the output error of its input quantization, recomputed
    # here on the full-precision reference from the same calibration tokens
    fp = ctx.fp_reference()
    adapter = get_adapter(fp.config)
    lin = adapter.linear(adapter.layers(fp)[0], "q_proj")
    seen = []
    hook = lin.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        fp(ctx.calibration())
    hook.remove()
    X, W = torch.cat(seen).float(), lin.weight.float()
    spec = ctx.scheme.activations.spec()
    err = {
        c: float(((X - fake_quant(X, dataclasses.replace(spec, clip_ratio=c))) @ W.T).pow(2).sum())
        for c in grid
    }
    assert res["act"]["layers.0.q_proj"] == min(err, key=err.get), err
    assert res["mean_error_vs_scheme_clip"] <= res["max_error_vs_scheme_clip"]
    ratios = {f"layers.{i}.{n}": q.act_spec.clip_ratio for i, n, q in iter_qlinears(ctx.model)}
    assert ratios == res["act"]
    meta = json.loads((tmp_path / "ckpt" / "qtool.json").read_text())
    assert meta["runtime"]["clip_search"]["act"] == res["act"]
    model, tok, _ = load(str(tmp_path / "ckpt"), device="cpu", kernels="off")
    assert {f"layers.{i}.{n}": q.act_spec.clip_ratio for i, n, q in iter_qlinears(model)} == ratios
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
