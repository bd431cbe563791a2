"""qtool's attention forward: KV-cache quantization inside attention, for every adapter.

It replaces the ``forward`` of each Llama/Mistral/Qwen2 attention module (same projections,
same RoPE) and adds, in order:

1. an optional online rotation of Q and K after RoPE (``qk_rotate``; it cancels in ``q . k``);
2. an optional per-channel KV transform (WKVQuant smoothing: ``(k - shift) / scale``), undone
   after dequantization so the attention function is unchanged in full precision;
3. dynamic per-token quantization of the *new* tokens' K and V (K after RoPE) before they are
   written to the cache: a prefix already in the cache (IntactKV pivot, system prompt) stays as
   it was written, in 16 bits;
4. past-only attention (WKVQuant): a token attends to its own K/V unquantized.

With a :class:`~qtool.models.kv4_runtime.PackedKVCache` (generation with real int4 storage)
steps 2-4 happen inside that cache instead.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qtool.quant.quantizer import QSpec, fake_quant, fake_quant_ste

KV_SCALE_DTYPE = torch.float16  # what QuantizedKVCache stores per token and head (or group)


@dataclass
class AttnQuantState:
    k_spec: QSpec | None = None
    v_spec: QSpec | None = None
    past_only: bool = False
    qk_rotate: nn.Module | None = None
    # per-channel smoothing, shape [num_kv_heads, head_dim] (None = identity)
    k_shift: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    v_shift: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    enabled: bool = True
    # straight-through rounding (gradients reach K/V and the smoothing), for learned methods
    ste: bool = False
    extra: dict = field(default_factory=dict)

    def _fq(self, x: torch.Tensor, spec: QSpec | None, shift, scale) -> torch.Tensor:
        if spec is None or not self.enabled:
            return x
        # the int4 cache stores K/V scales in float16: simulate exactly that
        fq = functools.partial(fake_quant_ste if self.ste else fake_quant, scale_dtype=KV_SCALE_DTYPE)
        if shift is not None or scale is not None:
            sh = 0.0 if shift is None else _channels(shift, x)
            sc = 1.0 if scale is None else _channels(scale, x)
            return fq((x - sh) / sc, spec) * sc + sh
        return fq(x, spec)

    def smooth_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x - shift) / scale`` of K and V: what :meth:`quantize_kv` quantizes (identity unset)."""

        def f(x, shift, scale):
            if shift is not None:
                x = x - _channels(shift, x)
            return x if scale is None else x / _channels(scale, x)

        return f(k, self.k_shift, self.k_scale), f(v, self.v_shift, self.v_scale)

    def quantize_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantize K and V ``[B, H_kv, T, D]`` per token and head (or group of D)."""
        return (
            self._fq(k, self.k_spec, self.k_shift, self.k_scale),
            self._fq(v, self.v_spec, self.v_shift, self.v_scale),
        )


def _channels(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel ``[H_kv, D]`` factor broadcast against ``[B, H_kv, T, D]``."""
    return t[None, :, None, :].to(like.device, like.dtype)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H_kv, S, D]`` -> ``[B, H_kv * groups, S, D]`` (each KV head repeated in place)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _bool_mask(mask: torch.Tensor | None, t: int, s: int, device) -> torch.Tensor:
    """A boolean ``[*, T, S]`` mask (True = attend); causal with the past offset when None."""
    if mask is None:
        i = torch.arange(t, device=device)[:, None] + (s - t)
        j = torch.arange(s, device=device)[None, :]
        return j <= i
    if mask.dtype == torch.bool:
        return mask[..., -t:, -s:]
    return mask[..., -t:, -s:] > torch.finfo(mask.dtype).min / 2


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    past_only_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of new queries ``[B, H, T, D]`` over all keys ``[B, H_kv, S, D]`` (S >= T).

    With ``past_only_kv = (k_cur, v_cur)`` (the new tokens' exact K/V, ``[B, H_kv, T, D]``),
    the diagonal (query i against its own key, column ``S - T + i``) uses the exact values
    instead of the cached (quantized) ones, in the scores and in the value sum.
    """
    groups = q.shape[1] // k.shape[1]
    t, s = q.shape[2], k.shape[2]
    kr, vr = repeat_kv(k, groups), repeat_kv(v, groups)
    if past_only_kv is None:
        if mask is None and s == t:
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scaling)
        return F.scaled_dot_product_attention(
            q, kr, vr, attn_mask=_bool_mask(mask, t, s, q.device), scale=scaling
        )
    k_cur, v_cur = (repeat_kv(x, groups) for x in past_only_kv)
    scores = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scaling
    diag = (q.float() * k_cur.float()).sum(-1) * scaling  # [B, H, T]
    cols = torch.arange(t, device=q.device) + (s - t)
    idx = cols.view(1, 1, t, 1).expand(*scores.shape[:2], t, 1)
    scores = scores.scatter(-1, idx, diag.unsqueeze(-1))
    scores = scores.masked_fill(~_bool_mask(mask, t, s, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vr.float())
    p_diag = probs.gather(-1, idx)  # [B, H, T, 1]
    out = out + p_diag * (v_cur.float() - vr[:, :, s - t :].float())
    return out.to(q.dtype)


def qtool_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    cache=None,
    past_key_values=None,
    **kwargs,
):
    """Drop-in forward for LlamaAttention / MistralAttention / Qwen2Attention."""
    cache = cache if cache is not None else past_key_values
    st: AttnQuantState = self.qtool
    bsz, t = hidden_states.shape[:2]
    shape = (bsz, t, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = self.qtool_rope(q, k, cos, sin)
    if st.qk_rotate is not None:
        q, k = st.qk_rotate(q), st.qk_rotate(k)
    if getattr(cache, "qtool_packed", False) and st.enabled:
        out = cache.attention(self.layer_idx, st, q, k, v, self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1).contiguous()), None
    kq, vq = st.quantize_kv(k, v)
    if cache is not None:
        k_all, v_all = cache.update(kq, vq, self.layer_idx)
    else:
        k_all, v_all = kq, vq
    quantized = st.enabled and (st.k_spec is not None or st.v_spec is not None)
    exact = (k, v) if (st.past_only and quantized) else None
    out = attend(q, k_all, v_all, attention_mask, self.scaling, exact)
    out = out.transpose(1, 2).reshape(bsz, t, -1).contiguous()
    return self.o_proj(out), None


def install_attention(attn: nn.Module, state: AttnQuantState) -> None:
    """Swap in qtool's forward on one attention module (idempotent)."""
    import importlib

    if not hasattr(attn, "qtool_rope"):
        mod = importlib.import_module(type(attn).__module__)
        attn.qtool_rope = mod.apply_rotary_pos_emb
    attn.qtool = state
    attn.forward = types.MethodType(qtool_attention_forward, attn)
