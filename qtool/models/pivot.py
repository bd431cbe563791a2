"""Prefix caches: a 16-bit K/V prefix (IntactKV pivot, system prompt) in front of new tokens.

A :class:`PivotCache` holds the prefix token ids and, for every decoder layer, the K/V those
tokens produce in the full-precision model (in the rotated basis when the model is rotated).
The quantized model attends to it as an ordinary cache, so the prefix K/V are never quantized;
only new tokens' K/V are (see ``qtool.models.attention``).
"""

from __future__ import annotations

import functools
import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@functools.cache
def _cache_kwarg() -> str:
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_kw(cache) -> dict:
    """``{"cache": cache}`` for a model forward (``past_key_values`` in transformers before 5.x)."""
    return {_cache_kwarg(): cache}


@dataclass
class PivotCache:
    token_ids: list[int]
    keys: list[torch.Tensor]  # per layer [1, H_kv, P, D]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.token_ids)

    def as_cache(self, batch: int, dtype: torch.dtype, device) -> DynamicCache:
        """A fresh DynamicCache holding the prefix, expanded to ``batch`` sequences."""
        data = [
            (
                k.to(device, dtype).expand(batch, -1, -1, -1).contiguous(),
                v.to(device, dtype).expand(batch, -1, -1, -1).contiguous(),
            )
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        return DynamicCache(ddp_cache_data=data)


def forward_with_prefix(model, input_ids: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """Logits of ``input_ids`` positions ``[B, L, V]`` with ``prefix`` tokens in front, unscored.

    Uses the model's pivot cache when it holds exactly these prefix tokens, else runs the prefix
    through the model together with the input.
    """
    pivot: PivotCache | None = getattr(model, "qtool_pivot", None)
    if prefix and pivot is not None and pivot.token_ids == list(prefix):
        dtype = next(model.parameters()).dtype
        cache = pivot.as_cache(input_ids.shape[0], dtype, input_ids.device)
        return model(input_ids=input_ids, **cache_kw(cache), use_cache=True).logits
    if not prefix:
        return model(input_ids=input_ids, use_cache=False).logits
    pre = torch.tensor(prefix, dtype=input_ids.dtype, device=input_ids.device).expand(input_ids.shape[0], -1)
    logits = model(input_ids=torch.cat([pre, input_ids], dim=1), use_cache=False).logits
    return logits[:, len(prefix) :]


# --- building and storing prefix caches (IntactKV-B/-P, prompt mixed precision) ------------------


def _attn_states(model):
    from qtool.models.adapters import get_adapter

    adapter = get_adapter(model.config)
    return [getattr(adapter.attention(layer), "qtool", None) for layer in adapter.layers(model)]


@contextmanager
def kv_quant_disabled(model):
    """Run ``model`` with its KV-cache quantization off (weights and activations unchanged)."""
    states = [s for s in _attn_states(model) if s is not None]
    before = [s.enabled for s in states]
    for s in states:
        s.enabled = False
    try:
        yield model
    finally:
        for s, e in zip(states, before, strict=True):
            s.enabled = e


def cache_tensors(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a transformers cache."""
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


@torch.no_grad()
def compute_prefix_cache(
    model, token_ids: list[int], base: PivotCache | None = None, dtype: torch.dtype | None = None
) -> PivotCache:
    """The 16-bit K/V that ``model`` writes for ``token_ids`` (KV quantization off).

    Pass the full-precision model for IntactKV (pivot = BOS or a system prompt), or the quantized
    model for prompt mixed precision (BiSup: its own system-prompt KV, kept unquantized). When
    ``base`` holds a prefix of ``token_ids`` (e.g. the BOS pivot in front of a system prompt), its
    K/V are reused and only the remaining tokens are computed, attending to it. ``dtype`` rounds
    the result (e.g. bfloat16, the dtype the cache is stored in); it is kept in float32.
    """
    token_ids = [int(t) for t in token_ids]
    device = next(model.parameters()).device
    mdtype = next(model.parameters()).dtype
    if base is not None and len(base) <= len(token_ids) and base.token_ids == token_ids[: len(base)]:
        cache, rest = base.as_cache(1, mdtype, device), token_ids[len(base) :]
    else:
        cache, rest = DynamicCache(), token_ids
    if rest:
        ids = torch.tensor([rest], dtype=torch.long, device=device)
        with kv_quant_disabled(model):
            model(input_ids=ids, **cache_kw(cache), use_cache=True, logits_to_keep=1)
    keys, values = cache_tensors(cache)
    rnd = (
        (lambda x: x.detach().float().cpu())
        if dtype is None
        else (lambda x: x.detach().to(dtype).float().cpu())
    )
    return PivotCache(token_ids, [rnd(k[:1]) for k in keys], [rnd(v[:1]) for v in values])


def save_pivot(pivot: PivotCache, path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a pivot cache as safetensors (``layers.{i}.key`` / ``.value``, token ids in metadata)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (k, v) in enumerate(zip(pivot.keys, pivot.values, strict=True)):
        tensors[f"layers.{i}.key"] = k.detach().to(dtype).cpu().contiguous()
        tensors[f"layers.{i}.value"] = v.detach().to(dtype).cpu().contiguous()
    save_file(
        # one metadata key: safetensors writes several in hash-map order, which differs between
        # processes, and two exports of the same run must be byte-identical
        tensors,
        str(path),
        metadata={"qtool_pivot": json.dumps({"token_ids": list(pivot.token_ids)})},
    )


def load_pivot(path) -> PivotCache:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        n = len({k.split(".")[1] for k in fh.keys()})
        keys = [fh.get_tensor(f"layers.{i}.key").float() for i in range(n)]
        values = [fh.get_tensor(f"layers.{i}.value").float() for i in range(n)]
    if "qtool_pivot" in meta:
        ids = json.loads(meta["qtool_pivot"])["token_ids"]
    else:  # the two-key form earlier qtool builds wrote
        ids = json.loads(meta["token_ids"])
    return PivotCache(ids, keys, values)
