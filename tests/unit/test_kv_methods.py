"""IntactKV pivot caches, past-only attention, KV smoothing, generation (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from qtool.api import run_recipe
from qtool.models.attention import attend, repeat_kv
from qtool.models.pivot import cache_tensors, compute_prefix_cache, forward_with_prefix
from qtool.models.prepare import set_quantization_enabled
from qtool.quant.quantizer import QSpec, fake_quant
from qtool.recipe import Recipe

SEQ = 64


def recipe(model_dir, scheme: dict, steps: list, **kw) -> Recipe:
    data = {
        "model": str(model_dir),
        "device": "cpu",
        "calibration": {"samples": 4, "seq_len": SEQ},
        "scheme": scheme,
        "steps": steps,
        "checkpoint_dtype": "float32",
        **kw,
    }
    return Recipe.model_validate(data)


W4KV4 = {"weights": {"bits": 4, "group_size": 32}, "kv_cache": {"bits": 4}}
KV4 = {"kv_cache": {"bits": 4}}


@pytest.fixture(scope="module")
def windows(tiny_llama_dir):
    from qtool.eval.perplexity import eval_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = eval_token_ids(tok)[: 3 * SEQ]
    return ids.view(3, SEQ)


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def kv4_ctx(tiny_llama_dir):
    """KV4 only, IntactKV-B before any weight step (the FP snapshot path)."""
    return run_recipe(recipe(tiny_llama_dir, KV4, ["intactkv"]), export=False)


@pytest.fixture(scope="module")
def w4kv4_ctx(tiny_llama_dir):
    """W4KV4 (RTN weights), IntactKV-B after the weight step (the FP rebuild path)."""
    return run_recipe(recipe(tiny_llama_dir, W4KV4, ["rtn", "intactkv"]), export=False)


# --- pivot cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["kv4", "w4kv4"])
def test_pivot_cache_equals_fp_models_own_kv(tiny_llama_dir, kv4_ctx, w4kv4_ctx, which):
    ref = hf_model(tiny_llama_dir)
    ctx = kv4_ctx if which == "kv4" else w4kv4_ctx
    ids = [ctx.tokenizer.bos_token_id]
    pivot = ctx.model.qtool_pivot
    assert pivot.token_ids == ids
    cache = DynamicCache()
    with torch.no_grad():
        ref(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
    keys, values = cache_tensors(cache)
    for k, v, pk, pv in zip(keys, values, pivot.keys, pivot.values, strict=True):
        torch.testing.assert_close(pk, k, rtol=0, atol=1e-6)
        torch.testing.assert_close(pv, v, rtol=0, atol=1e-6)


def test_pivot_prefix_cache_reproduces_fp_logits_in_rotated_basis(tiny_llama_dir, windows):
    """The rotated quantized model fed the FP pivot (KV quant off) = FP model with BOS in front."""
    ref = hf_model(tiny_llama_dir)
    r = recipe(tiny_llama_dir, {"kv_cache": {"bits": 4}}, ["rotate", "intactkv"])
    ctx = run_recipe(r, export=False)
    bos = ctx.tokenizer.bos_token_id
    x = windows[:2]
    with torch.no_grad():
        want = ref(torch.cat([torch.full((2, 1), bos), x], 1)).logits[:, 1:]
        set_quantization_enabled(ctx.model, False)
        got = forward_with_prefix(ctx.model, x, [bos])
        set_quantization_enabled(ctx.model, True)
        quant = forward_with_prefix(ctx.model, x, [bos])
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(quant, want, atol=1e-3)  # KV quantization is on for the window tokens


def test_prefix_cache_extends_a_pivot(kv4_ctx):
    ctx = kv4_ctx
    ids = [ctx.tokenizer.bos_token_id, 100, 200, 300]
    whole = compute_prefix_cache(ctx.fp_reference(), ids)
    ext = compute_prefix_cache(ctx.fp_reference(), ids, base=ctx.model.qtool_pivot)
    for a, b in zip(whole.keys + whole.values, ext.keys + ext.values, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- past-only attention ------------------------------------------------------------------------


def test_past_only_attention_matches_reference():
    torch.manual_seed(0)
    b, hq, hkv, t, p, d = 2, 4, 2, 5, 3, 8
    q = torch.randn(b, hq, t, d)
    k_cur, v_cur = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    k_pre, v_pre = torch.randn(b, hkv, p, d), torch.randn(b, hkv, p, d)  # a 16-bit prefix cache
    spec = QSpec(4, False, "token")
    kq, vq = fake_quant(k_cur, spec), fake_quant(v_cur, spec)
    k_all, v_all = torch.cat([k_pre, kq], 2), torch.cat([v_pre, vq], 2)
    scale = d**-0.5
    got = attend(q, k_all, v_all, None, scale, past_only_kv=(k_cur, v_cur))
    # by hand: query i sees the prefix, quantized K/V of earlier new tokens, its own exact K/V
    kr, vr = repeat_kv(k_all, hq // hkv), repeat_kv(v_all, hq // hkv)
    kc, vc = repeat_kv(k_cur, hq // hkv), repeat_kv(v_cur, hq // hkv)
    want = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                keys = torch.cat([kr[bi, h, : p + i], kc[bi, h, i : i + 1]])
                vals = torch.cat([vr[bi, h, : p + i], vc[bi, h, i : i + 1]])
                w = torch.softmax(keys @ q[bi, h, i] * scale, dim=0)
                want[bi, h, i] = w @ vals
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = attend(q, k_all, v_all, None, scale)
    assert not torch.allclose(plain, want, atol=1e-4)


# --- smoothing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [
        ["kv_smooth"],
        [{"kv_smooth": {"alpha": 1.0, "learn": {"samples": 2, "seq_len": 32, "batch_size": 2}}}],
        ["rotate", "kv_smooth"],  # K/V scales at run time (online Q/K and head-mixing rotations)
    ],
    ids=["stats", "learned", "rotated"],
)
def test_smoothing_keeps_fp_function(tiny_llama_dir, windows, steps):
    ref = hf_model(tiny_llama_dir)
    ctx = run_recipe(recipe(tiny_llama_dir, KV4, steps), export=False)
    assert "kv_smooth" in ctx.runtime
    set_quantization_enabled(ctx.model, False)
    with torch.no_grad():
        torch.testing.assert_close(
            ctx.model(windows[:2]).logits, ref(windows[:2]).logits, rtol=1e-3, atol=1e-3
        )
    if steps == ["kv_smooth"]:
        st = ctx.model.model.layers[0].self_attn.qtool
        assert st.k_scale is None and st.v_scale is None and st.k_shift is not None  # scales folded
        w = ctx.model.model.layers[0].self_attn.k_proj.weight
        assert not torch.allclose(w, ref.model.layers[0].self_attn.k_proj.weight)


def test_smoothing_k_scale_is_rope_pair_tied():
    from qtool.steps.kv_smooth import init_smoothing

    lo, hi = -torch.rand(2, 16) * 5, torch.rand(2, 16) * 5
    s = init_smoothing(lo, hi, lo, hi, 0.5)
    torch.testing.assert_close(s["k_scale"][:, :8], s["k_scale"][:, 8:])
    assert not torch.allclose(s["v_scale"][:, :8], s["v_scale"][:, 8:])


def test_learned_clip_quantizes_weights(tiny_llama_dir, windows):
    steps = [
        {"kv_smooth": {"learn": {"samples": 2, "seq_len": 32, "batch_size": 2, "learn_clip": True}}},
        "rtn",
    ]
    ctx = run_recipe(recipe(tiny_llama_dir, W4KV4, steps), export=False)
    lin = ctx.model.model.layers[0].self_attn.q_proj
    assert lin.qweight is not None
    torch.testing.assert_close(lin.weight.data, lin.qweight.dequantize())


# --- calibrated IntactKV ------------------------------------------------------------------------


def test_calibrated_pivot_lowers_its_loss(tiny_llama_dir):
    steps = [
        "rtn",
        {"intactkv": {"calibrate": {"steps": 4, "samples": 4, "seq_len": 32, "batch_size": 2, "lr": 1e-2}}},
    ]
    r = recipe(
        tiny_llama_dir,
        {"weights": {"bits": 4, "group_size": 32}, "activations": {"bits": 4}, "kv_cache": {"bits": 4}},
        steps,
    )
    ctx = run_recipe(r, export=False)
    res = ctx.results["intactkv"]
    assert res["calibrated"] and res["loss_after"] < res["loss_before"]


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("past_only", [False, True])
def test_generation_matches_perplexity_path(w4kv4_ctx, past_only):
    from qtool.generate import generate, prompt_ids

    model, tok = w4kv4_ctx.model, w4kv4_ctx.tokenizer
    for layer in model.model.layers:
        layer.self_attn.qtool.past_only = past_only
    res = generate(model, tok, "The tower is", max_new_tokens=8, chat=False)
    assert res.prefix_tokens == 1 and len(res.new_token_ids) >= 1 and res.tokens_per_second > 0
    ids, _ = prompt_ids(tok, "The tower is", chat=False)
    seq = torch.tensor([ids + res.new_token_ids])
    with torch.no_grad():
        logits = forward_with_prefix(model, seq, [tok.bos_token_id])[0]
    n = len(ids)
    assert logits[n - 1 : n - 1 + len(res.new_token_ids)].argmax(-1).tolist() == res.new_token_ids


def test_system_prompt_mixed_precision(w4kv4_ctx):
    from qtool.generate import prefix_cache_for, prompt_ids

    ctx = w4kv4_ctx
    ids, n_sys = prompt_ids(ctx.tokenizer, "Hi there", system="You are terse.")
    assert n_sys > 1 and ids[0] == ctx.tokenizer.bos_token_id
    pre = prefix_cache_for(ctx.model, ids, n_sys, mixed_precision=True)
    assert len(pre) == n_sys
    torch.testing.assert_close(pre.keys[0][:, :, :1], ctx.model.qtool_pivot.keys[0])  # reuses the pivot
    only_pivot = prefix_cache_for(ctx.model, ids, n_sys, mixed_precision=False)
    assert len(only_pivot) == 1


# --- export -> reload -----------------------------------------------------------------------------


def test_export_reload_keeps_pivot_and_smoothing(tiny_llama_dir, windows, tmp_path):
    from qtool.export.loader import load_checkpoint
    from qtool.export.writer import write_checkpoint

    scheme = {"weights": {"bits": 4, "group_size": 32}, "kv_cache": {"bits": 4, "past_only": True}}
    ctx = run_recipe(recipe(tiny_llama_dir, scheme, ["kv_smooth", "rtn", "intactkv"]), export=False)
    out = tmp_path / "ckpt"
    write_checkpoint(ctx, out)
    assert (out / "intactkv_pivot.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert not any("pivot" in k for k in fh.keys())
    model, tok, meta = load_checkpoint(out, device="cpu")
    assert model.qtool_pivot.token_ids == ctx.model.qtool_pivot.token_ids
    for a, b in zip(model.qtool_pivot.keys, ctx.model.qtool_pivot.keys, strict=True):
        torch.testing.assert_close(a, b)
    bos = [tok.bos_token_id]
    with torch.no_grad():
        want = forward_with_prefix(ctx.model, windows, bos)
        got = forward_with_prefix(model, windows, bos)
    nll = [
        torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), windows[:, 1:].reshape(-1))
        for x in (want, got)
    ]
    assert math.isclose(float(nll[0]), float(nll[1]), rel_tol=1e-4)


def test_learned_smoothing_is_never_worse_than_its_start_on_held_out_batches(tiny_llama_dir):
    """``learn.holdout``: a learning rate that wrecks the smoothing is caught on the held-out
    batches; each block keeps the epoch with the lowest held-out loss, and a block where learning
    never helped keeps exactly the statistics start."""
    lo = {"samples": 8, "seq_len": 32, "batch_size": 2, "epochs": 2, "lr_smooth": 5.0, "holdout": 0.5}
    calib = {"samples": 8, "seq_len": 32}  # the statistics-only run sees the same windows
    learned = run_recipe(
        recipe(tiny_llama_dir, KV4, [{"kv_smooth": {"alpha": 0.5, "learn": lo}}], calibration=calib),
        export=False,
    )
    stats = run_recipe(
        recipe(tiny_llama_dir, KV4, [{"kv_smooth": {"alpha": 0.5}}], calibration=calib), export=False
    )
    report = learned.results["kv_smooth"]["learn_losses"]
    assert report
    for rep in report.values():
        held = rep["holdout"]
        assert len(held) == 3 and len(rep["train"]) == 2  # start + 2 epochs; 2 of 4 batches held out
        assert held[rep["epoch_kept"]] == min(held)
    reverted = [k for k, rep in report.items() if rep["epoch_kept"] == 0]
    assert reverted == list(report), report  # lr 5 on the log-scales never helps
    for key in reverted:  # every block kept its start, so each saw the statistics run's inputs
        i = int(key.split(".")[1])
        a, b = learned.runtime["kv_smooth"]["layers"][i], stats.runtime["kv_smooth"]["layers"][i]
        for name in ("k_scale", "v_scale", "k_shift", "v_shift"):
            torch.testing.assert_close(torch.tensor(a[name]), torch.tensor(b[name]), rtol=1e-6, atol=1e-7)


def test_pivot_file_has_one_metadata_key_and_old_files_still_load(tmp_path):
    """safetensors writes several metadata keys in hash-map order (it differs between processes):
    the pivot keeps one, so two exports of the same run are byte-identical; the older two-key form loads."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from qtool.models.pivot import PivotCache, load_pivot, save_pivot

    pivot = PivotCache([1, 7], [torch.randn(1, 2, 2, 4)], [torch.randn(1, 2, 2, 4)])
    save_pivot(pivot, tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as fh:
        assert list(fh.metadata()) == ["qtool_pivot"]
    back = load_pivot(tmp_path / "p.safetensors")
    assert back.token_ids == [1, 7]
    torch.testing.assert_close(back.keys[0], pivot.keys[0].to(torch.bfloat16).float())
    tensors = {"layers.0.key": pivot.keys[0], "layers.0.value": pivot.values[0]}
    save_file(
        tensors,
        str(tmp_path / "old.safetensors"),
        metadata={"token_ids": json.dumps([1, 7]), "format": "qtool-pivot"},
    )
    assert load_pivot(tmp_path / "old.safetensors").token_ids == [1, 7]
