"""Generation with the packed int4 KV cache (and packed linears) against the fake-quant path.

On CPU the ``torch.ops.qtool`` ops run their pure-PyTorch references, so these tests check the
runtime plumbing the CUDA kernels plug into: the per-layer int4 caches, the 16-bit pivot beside
them, smoothing folded into the query/output, past-only, the prefill path and the decode op.
The GPU variant (same tokens with the kernels) is in ``tests/kernels/test_packed_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from qtool.api import run_recipe
from qtool.errors import QtoolError
from qtool.generate import decode, generate
from qtool.models.kv4_runtime import PackedKVCache, kv4_unsupported, packed_kv_reason
from qtool.models.packed import pack_model
from qtool.models.pivot import forward_with_prefix
from qtool.models.prepare import iter_qlinears
from qtool.quant.quantizer import sqnr_db
from qtool.recipe import Recipe


def quantized(model_dir, scheme: dict, steps: list) -> object:
    r = Recipe.model_validate(
        {
            "model": str(model_dir),
            "device": "cpu",
            "checkpoint_dtype": "float32",
            "calibration": {"samples": 4, "seq_len": 64},
            "scheme": scheme,
            "steps": steps,
        }
    )
    return run_recipe(r, export=False)


SMOOTH_PIVOT = (
    {"weights": {"bits": 4, "group_size": 32}, "kv_cache": {"bits": 4, "past_only": True}},
    ["kv_smooth", "rtn", "intactkv"],
)
ROTATED_W4A4KV4 = (
    {
        "preset": "W4A4KV4",
        "weights": {"bits": 4, "group_size": None},
        "activations": {"bits": 4, "clip_ratio": 0.9},
        "kv_cache": {"bits": 4, "symmetric": False, "clip_ratio": 0.95, "group_size": 16},
    },
    ["rotate", "rtn"],
)


@torch.no_grad()
def packed_logits(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """Logits of every position after the prefix: prefill ``ids[:n_prompt]`` then one token a step."""
    pivot = getattr(model, "qtool_pivot", None)
    n_pre = len(pivot) if pivot is not None else 0
    cache = PackedKVCache(1, len(ids), pivot)
    out = [model(input_ids=torch.tensor([ids[n_pre:n_prompt]]), cache=cache, use_cache=True).logits[0]]
    for tok in ids[n_prompt:]:
        out.append(model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True).logits[0])
    assert cache.memory_bytes() > 0 and cache.get_seq_length() == len(ids)
    return torch.cat(out)


@pytest.mark.parametrize(
    "case", [SMOOTH_PIVOT, ROTATED_W4A4KV4], ids=["smooth-pivot-pastonly", "rotated-w4a4kv4"]
)
@pytest.mark.parametrize("n_prompt", [6, 40], ids=["decode-op-prompt", "prefill-path"])
def test_packed_cache_matches_fake_quant(tiny_llama_dir, case, n_prompt):
    ctx = quantized(tiny_llama_dir, *case)
    model = ctx.model
    assert packed_kv_reason(model) is None
    g = torch.Generator().manual_seed(0)
    pivot = getattr(model, "qtool_pivot", None)
    pre = list(pivot.token_ids) if pivot is not None else []
    body = torch.randint(0, model.config.vocab_size, (56,), generator=g).tolist()
    ids = pre + body
    # the KV path alone (activation quantization off): the fake-quant path rounds its KV scales
    # to float16 as the int4 cache stores them, so the two compute the same values
    lins = [lin for _, _, lin in iter_qlinears(model)]
    for lin in lins:
        lin.act_quant_enabled = False
    got = packed_logits(model, ids, len(pre) + n_prompt)
    want = forward_with_prefix(model, torch.tensor([body]), pre)[0]
    assert got.shape == want.shape
    assert sqnr_db(want, got) > 100
    # everything on: 4-bit activations turn those last-bit differences into occasional code flips
    for lin in lins:
        lin.act_quant_enabled = True
    want = forward_with_prefix(model, torch.tensor([body]), pre)[0]
    assert sqnr_db(want, packed_logits(model, ids, len(pre) + n_prompt)) > 20
    # the same with packed int4 linears (reference ops on CPU)
    info = pack_model(model)
    assert info["packed"] > 0
    assert sqnr_db(want, packed_logits(model, ids, len(pre) + n_prompt)) > 20


def test_generate_packed_same_tokens(tiny_llama_dir):
    ctx = quantized(tiny_llama_dir, *SMOOTH_PIVOT)
    tok = ctx.tokenizer
    a = generate(ctx.model, tok, "Name a colour.", system="Be brief.", max_new_tokens=12)
    b = generate(ctx.model, tok, "Name a colour.", system="Be brief.", max_new_tokens=12, packed_kv=True)
    assert b.kv_cache == "int4 packed" and a.kv_cache.startswith("16-bit")
    assert b.prefix_tokens == a.prefix_tokens > 1
    assert a.new_token_ids[:4] == b.new_token_ids[:4]


def test_packed_cache_refuses_what_it_cannot_store(tiny_llama_dir):
    ctx = quantized(
        tiny_llama_dir, {"weights": {"bits": 4, "group_size": 32}, "kv_cache": {"bits": 8}}, ["rtn"]
    )
    why = packed_kv_reason(ctx.model)
    assert why is not None and "8-bit" in why
    from qtool.models.adapters import get_adapter

    st = get_adapter(ctx.model.config).attention(get_adapter(ctx.model.config).layers(ctx.model)[0]).qtool
    assert kv4_unsupported(st) is not None
    fp = quantized(tiny_llama_dir, {"weights": {"bits": 4, "group_size": 32}}, ["rtn"])
    assert "no quantized KV" in packed_kv_reason(fp.model) or "both" in packed_kv_reason(fp.model)


def test_decode_overflow_is_a_clear_error(tiny_llama_dir):
    ctx = quantized(tiny_llama_dir, *SMOOTH_PIVOT)
    pivot = ctx.model.qtool_pivot
    ids = list(pivot.token_ids) + [5, 6, 7]
    new, *_ = decode(ctx.model, ids, pivot, max_new_tokens=5, packed_kv=True)
    assert len(new) == 5


@pytest.mark.slow
def test_smollm2_packed_generation_same_tokens(smollm2_path):
    """SmolLM2-135M W4A16-g64 + KV4 past-only + IntactKV: packed linears and int4 cache (reference
    ops on CPU) give the fake-quant path's greedy tokens for 32 tokens on every prompt."""
    ctx = quantized(
        smollm2_path,
        {"weights": {"bits": 4, "group_size": 64}, "kv_cache": {"bits": 4, "past_only": True}},
        ["rtn", "intactkv"],
    )
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    fake = [generate(ctx.model, ctx.tokenizer, p, max_new_tokens=32).new_token_ids for p in prompts]
    pack_model(ctx.model)
    packed = [
        generate(ctx.model, ctx.tokenizer, p, max_new_tokens=32, packed_kv=True).new_token_ids
        for p in prompts
    ]
    for f, p in zip(fake, packed, strict=True):
        assert f[:32] == p[:32]


def test_bench_generate_runs_on_cpu_references():
    """The benchmark's plumbing on a tiny random model (timings on CPU mean nothing)."""
    from qtool.bench.generate import bench_generate

    res = bench_generate("tiny", (1, 2), context=24, new_tokens=3, max_context=512, device="cpu")
    rows = {(r["model"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("16-bit", 1), ("16-bit", 2), ("W4A16 + KV4", 1), ("W4A16 + KV4", 2)}
    assert res["packing"]["packed"] == 14 and res["w4_weights_gib"] < res["fp16_weights_gib"]
    for b in (1, 2):
        fp, q = rows[("16-bit", b)], rows[("W4A16 + KV4", b)]
        assert q["kv_cache_bytes"] <= 0.3 * fp["kv_cache_bytes"] and q["tokens_per_s"] > 0
    with pytest.raises(QtoolError, match="unknown model shape"):
        bench_generate("llama-9000", device="cpu")


def test_bench_cli_goes_through_the_api(tmp_path):
    """``qtool bench generate`` on CPU (tiny shape) writes the API's result; a kernel benchmark
    without CUDA + the extension (or an unknown shape) is a one-line user error, exit 2."""
    import json

    from typer.testing import CliRunner

    from qtool.cli import app
    from qtool.ops.registry import backend

    runner = CliRunner()
    out = tmp_path / "gen.json"
    args = ["bench", "generate", "--shape", "tiny", "--device", "cpu", "--batch", "1"]
    args += ["--context", "16", "--new-tokens", "2", "--max-context", "256", "--json", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["bench"] == "generate" and data["device"] == {"device": "cpu"}
    assert {r["model"] for r in data["rows"]} == {"16-bit", "W4A16 + KV4"}
    res = runner.invoke(app, ["bench", "generate", "--shape", "llama-9000", "--device", "cpu"])
    assert res.exit_code == 1 and "unknown model shape" in res.output
    if not (torch.cuda.is_available() and backend() == "cuda"):
        res = runner.invoke(app, ["bench", "matmul", "--iters", "1"])
        assert res.exit_code == 1 and "make kernels" in res.output and "Traceback" not in res.output
