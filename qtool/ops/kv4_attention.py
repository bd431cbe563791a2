"""4-bit KV cache: quantize-and-append, and decode attention over it with a 16-bit pivot prefix.

Cache layout (one per K and one per V; ``G = D / group_size``, ``G = 1`` per token and head):

* ``cache``: int32 ``[B, H_kv, T_max, D / 8]``, each (sequence, head, position) row of ``D``
  signed int4 codes packed in the qtool int4 layout (column ``d`` in word ``d // 8`` at bits
  ``4 * (d % 8)`` as the nibble ``q + 8``);
* ``meta``: float16 ``[B, H_kv, T_max, G, 2]`` holding ``(scale, zero)`` per group, the zero an
  integer in ``[-8, 7]`` stored as float16, dequant ``(q - zero) * scale``;
* ``lengths``: int32 ``[B]``, how many positions of each sequence are filled.

Attention for query ``i`` of the ``Tq`` new tokens of sequence ``b`` (past-only quantization,
METHODS.md sections 3 and 4): the 16-bit pivot prefix (IntactKV), the dequantized cache
positions ``t < lengths[b] + i`` (earlier new tokens included, as the cache holds them), and
its own K/V in 16-bit on the diagonal. The new tokens must be appended before attending.
"""

from __future__ import annotations

import math

import torch

from qtool.ops.registry import define_op
from qtool.quant.packing import NIBBLES, pack_int4, unpack_int4
from qtool.quant.quantizer import QSpec, compute_qparams, quantize

APPEND_SCHEMA = (
    "kv4_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) k_meta, Tensor(c!) v_cache, "
    "Tensor(d!) v_meta, Tensor lengths, int group_size=-1, float clip_ratio=1.0) -> ()"
)
DECODE_SCHEMA = (
    "kv4_attention_decode(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor k_meta, "
    "Tensor v_cache, Tensor v_meta, Tensor lengths, Tensor? k_pivot=None, Tensor? v_pivot=None, "
    "int group_size=-1, float? softmax_scale=None) -> Tensor"
)
MIN_SCALE = torch.finfo(torch.float16).tiny  # 2**-14: a stored scale never rounds to zero


def kv_spec(head_dim: int, group_size: int, clip_ratio: float = 1.0) -> QSpec:
    """Per-(token, head) or per-group asymmetric int4 over the head dim."""
    if group_size <= 0 or group_size == head_dim:
        return QSpec(bits=4, symmetric=False, granularity="token", clip_ratio=clip_ratio)
    if head_dim % group_size or group_size % NIBBLES:
        raise ValueError(
            f"KV group_size {group_size} must divide head_dim {head_dim} and be a multiple of 8; "
            f"use -1 (one group per token and head) or e.g. {head_dim // 2}"
        )
    return QSpec(bits=4, symmetric=False, granularity="group", group_size=group_size, clip_ratio=clip_ratio)


def kv4_quantize(
    x: torch.Tensor, group_size: int = -1, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., D]`` per row (and group): returns ``(packed [..., D/8], meta [..., G, 2])``.

    Scale and zero follow ``quantizer.compute_qparams`` (asymmetric, clip ratio applied to the
    min and max); the scale is then stored as float16 (at least 2**-14) and the codes are
    taken with that stored scale, so ``kv4_dequantize`` gives exactly what the kernels read.
    """
    d = x.shape[-1]
    if d % NIBBLES:
        raise ValueError(f"head_dim must be a multiple of 8 for the int4 KV cache, got {d}")
    spec = kv_spec(d, group_size, clip_ratio)
    x2 = x.reshape(-1, d).float()
    scale, zero = compute_qparams(x2, spec)
    s16 = scale.clamp(min=MIN_SCALE).to(torch.float16)
    q = quantize(x2, s16.float(), zero, spec)
    meta = torch.stack([s16, zero.to(torch.float16)], dim=-1)
    lead = x.shape[:-1]
    return pack_int4(q).reshape(*lead, d // NIBBLES), meta.reshape(*lead, -1, 2)


def kv4_dequantize(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` of packed rows ``[..., D/8]`` with ``meta [..., G, 2]``, float32."""
    lead = packed.shape[:-1]
    d = packed.shape[-1] * NIBBLES
    q = unpack_int4(packed.reshape(-1, packed.shape[-1]), d).float()
    groups = meta.shape[-2]
    m = meta.reshape(-1, groups, 2).float()
    qg = q.reshape(-1, groups, d // groups)
    return ((qg - m[..., 1:2]) * m[..., 0:1]).reshape(*lead, d)


def _check_cache(name: str, cache: torch.Tensor, meta: torch.Tensor, b: int, h: int, d: int) -> None:
    if (
        cache.dtype != torch.int32
        or cache.dim() != 4
        or tuple(cache.shape[:2]) != (b, h)
        or cache.shape[3] * NIBBLES != d
    ):
        raise ValueError(
            f"{name}_cache must be int32 [{b}, {h}, T_max, {d // NIBBLES}], got {cache.dtype} {tuple(cache.shape)}"
        )
    if (
        meta.dtype != torch.float16
        or meta.dim() != 5
        or tuple(meta.shape[:3]) != tuple(cache.shape[:3])
        or meta.shape[4] != 2
    ):
        raise ValueError(
            f"{name}_meta must be float16 [{b}, {h}, {cache.shape[2]}, G, 2], got {meta.dtype} {tuple(meta.shape)}"
        )


def kv4_append_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    k_meta: torch.Tensor,
    v_cache: torch.Tensor,
    v_meta: torch.Tensor,
    lengths: torch.Tensor,
    group_size: int = -1,
    clip_ratio: float = 1.0,
) -> None:
    """Reference quantize-and-append of new keys and values (in place).

    Shapes and dtypes: ``k``, ``v`` float16 / bfloat16 ``[B, H_kv, T, D]``; caches and metas as
    in the module docstring; ``lengths`` int32 ``[B]`` (not modified: the caller advances it).
    Token ``t`` of sequence ``b`` goes to position ``lengths[b] + t``, which must be below
    ``T_max``.

    Equivalent to ``cache[b, :, lengths[b] + t] = kv4_quantize(x[b, :, t])`` for K and V.
    """
    bsz, heads, t_new, d = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_cache("k", k_cache, k_meta, bsz, heads, d)
    _check_cache("v", v_cache, v_meta, bsz, heads, d)
    lens = [int(n) for n in lengths.tolist()]
    t_max = k_cache.shape[2]
    if len(lens) != bsz or any(n < 0 or n + t_new > t_max for n in lens):
        raise ValueError(f"cannot append {t_new} tokens at lengths {lens}: the cache holds {t_max} positions")
    for x, cache, meta in ((k, k_cache, k_meta), (v, v_cache, v_meta)):
        packed, scales = kv4_quantize(x, group_size, clip_ratio)
        if scales.shape[-2] != meta.shape[3]:
            raise ValueError(
                f"meta has {meta.shape[3]} groups, group_size {group_size} gives {scales.shape[-2]}"
            )
        for b, n in enumerate(lens):
            cache[b, :, n : n + t_new] = packed[b]
            meta[b, :, n : n + t_new] = scales[b]


def _append_fake(k, v, k_cache, k_meta, v_cache, v_meta, lengths, group_size=-1, clip_ratio=1.0):
    return None


def kv4_attention_decode_ref(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    k_meta: torch.Tensor,
    v_cache: torch.Tensor,
    v_meta: torch.Tensor,
    lengths: torch.Tensor,
    k_pivot: torch.Tensor | None = None,
    v_pivot: torch.Tensor | None = None,
    group_size: int = -1,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Reference decode attention over a 4-bit cache with a 16-bit pivot prefix.

    Shapes and dtypes:
      * ``q``: ``[B, H_q, Tq, D]`` float16 / bfloat16, ``H_q`` a multiple of ``H_kv`` (GQA: query
        head ``h`` reads kv head ``h // (H_q / H_kv)``), ``Tq`` small (decode / short chunks);
      * ``k_new``, ``v_new``: ``[B, H_kv, Tq, D]``, the new tokens' K/V in 16-bit, already
        appended to the cache with ``kv4_append`` at positions ``lengths[b] + i``;
      * caches and metas as in the module docstring; ``lengths`` int32 ``[B]``: past tokens per
        sequence *before* the ``Tq`` new ones (ragged);
      * ``k_pivot``, ``v_pivot``: optional 16-bit prefix ``[1 or B, H_kv, P, D]``, never quantized;
      * ``group_size`` is implied by ``meta`` and only checked; ``softmax_scale`` defaults to
        ``1 / sqrt(D)``; returns ``[B, H_q, Tq, D]`` in q's dtype.

    Equivalent to ``softmax(q K^T * scale + mask) V`` in float32 with ``K = [pivot;
    dequant(cache[:lengths[b] + i]); k_new[i]]`` for query ``i`` (and the same for V).
    """
    bsz, hq, tq, d = q.shape
    hkv = k_new.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if tuple(k_new.shape) != (bsz, hkv, tq, d) or tuple(v_new.shape) != (bsz, hkv, tq, d):
        raise ValueError(f"k_new and v_new must be [{bsz}, {hkv}, {tq}, {d}]")
    _check_cache("k", k_cache, k_meta, bsz, hkv, d)
    _check_cache("v", v_cache, v_meta, bsz, hkv, d)
    if group_size > 0 and k_meta.shape[3] != d // group_size:
        raise ValueError(
            f"k_meta has {k_meta.shape[3]} groups, group_size {group_size} gives {d // group_size}"
        )
    if (k_pivot is None) != (v_pivot is None):
        raise ValueError("give both k_pivot and v_pivot, or neither")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    rep = hq // hkv
    lens = [int(n) for n in lengths.tolist()]
    if any(n + tq > k_cache.shape[2] for n in lens):
        raise ValueError(
            f"lengths {lens} plus {tq} new tokens exceed the cache's {k_cache.shape[2]} positions"
        )
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(lens):
        keys = kv4_dequantize(k_cache[b, :, : n + tq], k_meta[b, :, : n + tq])  # [H_kv, n+Tq, D]
        vals = kv4_dequantize(v_cache[b, :, : n + tq], v_meta[b, :, : n + tq])
        n_piv = 0
        if k_pivot is not None:
            pb = 0 if k_pivot.shape[0] == 1 else b
            keys = torch.cat([k_pivot[pb].float(), keys], dim=1)
            vals = torch.cat([v_pivot[pb].float(), vals], dim=1)
            n_piv = k_pivot.shape[2]
        keys = keys.repeat_interleave(rep, dim=0)  # [H_q, L, D]
        vals = vals.repeat_interleave(rep, dim=0)
        qb = q[b].float()  # [H_q, Tq, D]
        scores = qb @ keys.transpose(1, 2) * scale  # [H_q, Tq, L]
        diag = n_piv + n + torch.arange(tq, device=q.device)  # key index of each query's own token
        self_k = k_new[b].float().repeat_interleave(rep, dim=0)  # [H_q, Tq, D]
        self_v = v_new[b].float().repeat_interleave(rep, dim=0)
        rows = torch.arange(tq, device=q.device)
        scores[:, rows, diag] = (qb * self_k).sum(-1) * scale
        mask = torch.arange(scores.shape[-1], device=q.device)[None, :] > diag[:, None]
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        ob = probs @ vals
        # the diagonal reads the exact 16-bit value instead of the cached (quantized) one
        ob += probs[:, rows, diag].unsqueeze(-1) * (self_v - vals[:, diag])
        out[b] = ob
    return out.to(q.dtype)


def _decode_fake(
    q,
    k_new,
    v_new,
    k_cache,
    k_meta,
    v_cache,
    v_meta,
    lengths,
    k_pivot=None,
    v_pivot=None,
    group_size=-1,
    softmax_scale=None,
):
    return torch.empty_like(q)


define_op(APPEND_SCHEMA, kv4_append_ref, _append_fake)
define_op(DECODE_SCHEMA, kv4_attention_decode_ref, _decode_fake)
