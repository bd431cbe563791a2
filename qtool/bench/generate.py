"""End-to-end decode benchmark: a 16-bit model against W4A16 + int4 KV on the same shapes.

A random-initialized model of a real architecture's shapes (decode speed does not depend on the
weight values) is timed twice in one process:

1. 16-bit: the Hugging Face model as is, with its own attention and a 16-bit ``DynamicCache``;
2. the same model quantized in place: RTN W4A16 (symmetric, ``group_size``), packed
   (:class:`~qtool.models.packed.PackedLinear`, ``torch.ops.qtool.int4_matmul``) and a packed
   int4 KV cache (:class:`~qtool.models.kv4_runtime.PackedKVCache`, ``kv4_append`` +
   ``kv4_attention_decode``).

Each point prefills ``context`` random tokens per sequence (in chunks, not timed as decode),
then times ``new_tokens`` greedy decode steps for the whole batch. The maximum batch at
``max_context`` is computed from the device's free memory after the weights are loaded and the
cache's bytes per sequence (16-bit: ``2 * layers * kv_heads * head_dim * 2`` bytes per token;
int4: the packed words plus float16 scale and zero per token and head), with a reserve for the
activations; it is an estimate from measured quantities, stated as such.

``qtool bench generate`` runs it through :func:`qtool.api.bench_generate`.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from qtool.errors import QtoolError
from qtool.models.kv4_runtime import PackedKVCache
from qtool.models.pivot import cache_kw

SHAPES: dict[str, dict[str, int]] = {
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "tiny": {  # for tests on any device (head_dim 64)
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
}
PREFILL_CHUNK = 512
RESERVE_BYTES = 2 * 2**30  # activations, workspace and allocator slack at long context


def random_model(shape: str, dtype: torch.dtype, device: str | torch.device) -> LlamaForCausalLM:
    if shape not in SHAPES:
        raise QtoolError(f"unknown model shape {shape!r}; choose from {', '.join(SHAPES)}")
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def quantize_w4a16_kv4(model, group_size: int = 128) -> dict[str, object]:
    """RTN W4A16 + KV4 in place (qtool's fake-quant model), then pack the linears."""
    from qtool.algorithms.gptq import rtn_quantize
    from qtool.models.packed import pack_model
    from qtool.models.prepare import iter_qlinears, prepare_model
    from qtool.models.qlinear import QuantizedWeight
    from qtool.recipe import Scheme

    scheme = Scheme.model_validate(
        {"weights": {"bits": 4, "group_size": group_size}, "kv_cache": {"bits": 4}}
    )
    prepare_model(model, scheme)
    spec = scheme.weights.spec()
    for _, _, lin in iter_qlinears(model):
        res = rtn_quantize(lin.weight.data.float(), spec, scale_dtype=lin.weight.dtype)
        lin.set_quantized(QuantizedWeight(res.codes, res.scale, res.zero, spec))
    info = pack_model(model)
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return info


def kv_bytes_per_token(model, packed: bool) -> int:
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_head = head_dim // 2 + 2 * 2 if packed else head_dim * 2  # int4 + fp16 (scale, zero) | fp16
    return 2 * cfg.num_hidden_layers * kv_heads * per_head


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, batch: int, context: int, new_tokens: int, packed: bool) -> dict[str, object]:
    """Prefill ``context`` random tokens per sequence, then time ``new_tokens`` greedy steps."""
    device = model.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), device=device)
    cache = PackedKVCache(batch, context + new_tokens + 1) if packed else DynamicCache()
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, context, PREFILL_CHUNK):
        logits = model(
            input_ids=ids[:, i : i + PREFILL_CHUNK], **cache_kw(cache), use_cache=True, logits_to_keep=1
        ).logits
    _sync(device)
    prefill = time.perf_counter() - t0
    tok = logits[:, -1].argmax(-1, keepdim=True)
    tok = model(input_ids=tok, **cache_kw(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)  # one warm step (kernel selection), then the timed ones
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        tok = model(input_ids=tok, **cache_kw(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    dt = time.perf_counter() - t1
    if packed:
        kv_bytes = cache.memory_bytes()
    elif hasattr(cache, "layers"):
        kv_bytes = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
    else:  # transformers 4.x
        kv_bytes = sum(2 * k.numel() * k.element_size() for k in cache.key_cache)
    return {
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": round(prefill, 3),
        "ms_per_step": round(1e3 * dt / new_tokens, 3),
        "tokens_per_s": round(batch * new_tokens / dt, 1),
        "kv_cache_bytes": kv_bytes,
        "kv_cache_gib": round(kv_bytes / 2**30, 3),
    }


def max_batch(model, context: int, packed: bool) -> dict[str, object]:
    """Largest batch whose KV cache at ``context`` fits the free device memory (an estimate)."""
    per_seq = kv_bytes_per_token(model, packed) * context
    if model.device.type != "cuda":
        return {"context": context, "kv_gib_per_sequence": round(per_seq / 2**30, 3), "max_batch": None}
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    return {
        "context": context,
        "kv_gib_per_sequence": round(per_seq / 2**30, 3),
        "free_gib_after_weights": round(free / 2**30, 1),
        "max_batch": max(0, (free - RESERVE_BYTES) // per_seq),
    }


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench_generate(
    shape: str = "llama-2-7b",
    batches: tuple[int, ...] = (1, 16),
    context: int = 4096,
    new_tokens: int = 64,
    max_context: int = 32768,
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    device: str = "cuda",
) -> dict[str, object]:
    """Both models, every batch: tokens/s, ms per step, KV memory, max batch at ``max_context``."""
    model = random_model(shape, dtype, device)
    out: dict[str, object] = {"shape": shape, "config": SHAPES[shape], "dtype": str(dtype), "rows": []}
    rows: list[dict] = out["rows"]  # type: ignore[assignment]
    out["fp16_weights_gib"] = round(weight_bytes(model) / 2**30, 4)
    out["fp16_max_batch"] = max_batch(model, max_context, packed=False)

    def run_batches(label: str, packed: bool) -> None:
        for b in batches:
            rows.append({"model": label, **time_decode(model, b, context, new_tokens, packed=packed)})
            if model.device.type == "cuda":
                torch.cuda.empty_cache()

    run_batches("16-bit", packed=False)
    out["packing"] = quantize_w4a16_kv4(model, group_size)
    out["w4_weights_gib"] = round(weight_bytes(model) / 2**30, 4)
    out["w4kv4_max_batch"] = max_batch(model, max_context, packed=True)
    run_batches("W4A16 + KV4", packed=True)
    fp = {r["batch"]: r["tokens_per_s"] for r in rows if r["model"] == "16-bit"}
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / fp[r["batch"]], 2)
    return out
