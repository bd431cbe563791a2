"""Generation with a real 4-bit KV cache: :class:`PackedKVCache` behind qtool's attention.

The fake-quant path (``qtool.models.attention``) keeps dequantized K/V in a 16-bit transformers
cache; this one stores them as packed int4 in a :class:`~qtool.ops.kv_cache.QuantizedKVCache`
per decoder layer and attends with ``torch.ops.qtool.kv4_attention_decode`` (the CUDA kernel when
built, its reference elsewhere), so the memory and the decode speed are the 4-bit ones.

It computes what the fake-quant path computes for the same tokens:

* the 16-bit prefix (IntactKV pivot / system prompt) sits beside the int4 tensors, unquantized;
* WKVQuant smoothing ``(x - shift) / scale`` is applied before quantization; attention then runs
  in the smoothed basis: ``q . (k_s * scale + shift) = (q * scale) . k_s + q . shift``, and the
  last term is the same for every key of a query, so the query is scaled and the shift dropped;
  the output is ``out_s * scale_v + shift_v`` since the attention weights sum to one. The pivot is
  stored smoothed too, so every key is in the same basis;
* past-only: a token attends to its own K/V in 16 bits; without it, to its dequantized K/V;
* decode steps (a few new tokens) use the decode op; a longer prefill dequantizes the cache and
  uses PyTorch's attention (a correct path that writes the same quantized cache).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from qtool.models.attention import _channels, attend, repeat_kv
from qtool.ops.kv4_attention import kv4_dequantize
from qtool.ops.kv_cache import QuantizedKVCache

DECODE_MAX_TOKENS = 16  # new tokens per step served by the decode op; longer chunks are a prefill


def kv4_unsupported(st) -> str | None:
    """Why an attention's KV scheme cannot use the packed int4 cache (None when it can)."""
    k, v = st.k_spec, st.v_spec
    if k is None or v is None:
        return "K and V must both be quantized"
    if k != v:
        return "K and V must use the same KV scheme"
    if k.bits != 4 or k.symmetric:
        return (
            f"the int4 cache stores asymmetric 4-bit KV, the scheme is {k.bits}-bit symmetric={k.symmetric}"
        )
    if k.granularity not in ("token", "group"):
        return f"KV granularity {k.granularity!r} (the cache quantizes per token and head, or per group)"
    if k.granularity == "group" and k.group_size % 8:
        return f"KV group_size {k.group_size} is not a multiple of 8"
    return None


def _per_head(t: torch.Tensor | None, groups: int, like: torch.Tensor) -> torch.Tensor | None:
    """``[H_kv, D]`` -> ``[1, H_kv * groups, 1, D]`` in ``like``'s dtype and device."""
    if t is None:
        return None
    return repeat_kv(_channels(t, like), groups)


class PackedKVCache(DynamicCache):
    """A model-level cache of per-layer :class:`QuantizedKVCache` (created on first use).

    ``prefix``: the 16-bit prefix (a :class:`~qtool.models.pivot.PivotCache`) for every sequence.
    All sequences of the batch advance together (generation of equal-length prompts).
    """

    qtool_packed = True  # qtool's attention forward hands its K/V to :meth:`attention`

    def __init__(self, batch: int, max_len: int, prefix=None) -> None:
        super().__init__()
        self.batch = batch
        self.max_len = max_len
        self.prefix = prefix
        self.caches: dict[int, QuantizedKVCache] = {}

    # -- what transformers asks of a cache -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        seen = self.caches[0].host_lengths()[0] if 0 in self.caches else 0
        return (len(self.prefix) if self.prefix is not None else 0) + seen

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        # the mask transformers builds is not used: the packed attention is causal by construction
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return q, 0

    # -- qtool ------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of the int4 tensors and their scales, all layers (the 16-bit prefix excluded)."""
        return sum(c.memory_bytes() for c in self.caches.values())

    def _layer(self, idx: int, st, k: torch.Tensor) -> QuantizedKVCache:
        cache = self.caches.get(idx)
        if cache is not None:
            return cache
        spec = st.k_spec
        h_kv, d = k.shape[1], k.shape[3]
        kp = vp = None
        if self.prefix is not None and len(self.prefix):
            kp = self.prefix.keys[idx].to(k.device, torch.float32)
            vp = self.prefix.values[idx].to(k.device, torch.float32)
            kp, vp = st.smooth_kv(kp, vp)
            kp, vp = kp.to(k.dtype), vp.to(k.dtype)
        cache = QuantizedKVCache(
            self.batch,
            h_kv,
            d,
            self.max_len,
            group_size=spec.group_size if spec.granularity == "group" else -1,
            clip_ratio=spec.clip_ratio,
            device=k.device,
            k_pivot=kp,
            v_pivot=vp,
        )
        self.caches[idx] = cache
        return cache

    def attention(self, idx: int, st, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
        """Append the new tokens' K/V ``[B, H_kv, T, D]`` (after RoPE) and attend with ``q``."""
        cache = self._layer(idx, st, k)
        ks, vs = st.smooth_kv(k, v)
        cache.append(ks, vs)
        t = q.shape[2]
        n = cache.host_lengths()[0]
        if st.past_only:
            k_cur, v_cur = ks, vs
        else:
            k_cur, v_cur = (
                kv4_dequantize(c[:, :, n - t : n], m[:, :, n - t : n]).to(k.dtype)
                for c, m in ((cache.k_cache, cache.k_meta), (cache.v_cache, cache.v_meta))
            )
        groups = q.shape[1] // k.shape[1]
        k_scale = _per_head(st.k_scale, groups, q)
        qs = q if k_scale is None else q * k_scale
        if t <= DECODE_MAX_TOKENS:
            out = cache.attend(qs, k_cur, v_cur, scaling)
        else:
            keys = kv4_dequantize(cache.k_cache[:, :, :n], cache.k_meta[:, :, :n]).to(q.dtype)
            vals = kv4_dequantize(cache.v_cache[:, :, :n], cache.v_meta[:, :, :n]).to(q.dtype)
            if cache.k_pivot is not None:
                b = keys.shape[0]
                keys = torch.cat([cache.k_pivot.expand(b, -1, -1, -1), keys], dim=2)
                vals = torch.cat([cache.v_pivot.expand(b, -1, -1, -1), vals], dim=2)
            out = attend(qs, keys, vals, None, scaling, (k_cur, v_cur))
        v_scale, v_shift = _per_head(st.v_scale, groups, out), _per_head(st.v_shift, groups, out)
        if v_scale is not None:
            out = out * v_scale
        if v_shift is not None:
            out = out + v_shift
        return out


def packed_kv_reason(model) -> str | None:
    """Why ``model`` cannot generate with the packed int4 cache (None when every layer can)."""
    from qtool.models.adapters import get_adapter

    adapter = get_adapter(model.config)
    for i, layer in enumerate(adapter.layers(model)):
        st = getattr(adapter.attention(layer), "qtool", None)
        if st is None:
            return "the model has no quantized KV cache"
        why = kv4_unsupported(st)
        if why:
            return f"layer {i}: {why}"
    return None
