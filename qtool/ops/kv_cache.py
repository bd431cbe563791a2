"""``QuantizedKVCache``: one attention layer's 4-bit KV cache with a 16-bit pivot prefix.

It owns the packed tensors described in :mod:`qtool.ops.kv4_attention` and calls the
``torch.ops.qtool.kv4_append`` / ``kv4_attention_decode`` ops, so the same object runs the CUDA
kernels on CUDA tensors (when built) and the references everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import qtool.ops.kv4_attention  # noqa: F401  (defines the ops)
from qtool.ops.kv4_attention import kv4_dequantize, kv_spec
from qtool.quant.packing import NIBBLES


class QuantizedKVCache:
    """Packed int4 K/V for ``batch`` sequences of up to ``max_len`` quantized positions each.

    ``k_pivot`` / ``v_pivot`` (``[1 or batch, num_kv_heads, P, head_dim]``, 16-bit) are the
    IntactKV prefix: attended by every query, never quantized, not counted in ``lengths``.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        group_size: int = -1,
        clip_ratio: float = 1.0,
        device: torch.device | str | None = None,
        k_pivot: torch.Tensor | None = None,
        v_pivot: torch.Tensor | None = None,
    ) -> None:
        if head_dim % NIBBLES:
            raise ValueError(f"head_dim must be a multiple of 8 for the int4 KV cache, got {head_dim}")
        kv_spec(head_dim, group_size, clip_ratio)  # validates group_size and clip_ratio
        if (k_pivot is None) != (v_pivot is None):
            raise ValueError("give both k_pivot and v_pivot, or neither")
        groups = 1 if group_size <= 0 else head_dim // group_size
        self.group_size = group_size if 0 < group_size < head_dim else -1
        self.clip_ratio = float(clip_ratio)
        self.head_dim = head_dim
        self.max_len = max_len
        shape = (batch, num_kv_heads, max_len)
        self.k_cache = torch.zeros(*shape, head_dim // NIBBLES, dtype=torch.int32, device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k_meta = torch.zeros(*shape, groups, 2, dtype=torch.float16, device=device)
        self.v_meta = torch.zeros_like(self.k_meta)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self._host_lengths = [0] * batch
        self.k_pivot = k_pivot
        self.v_pivot = v_pivot

    @property
    def batch(self) -> int:
        return self.k_cache.shape[0]

    @property
    def pivot_len(self) -> int:
        return 0 if self.k_pivot is None else self.k_pivot.shape[2]

    def host_lengths(self) -> list[int]:
        """Filled positions per sequence (a host copy: no device sync)."""
        return list(self._host_lengths)

    def append(self, k: torch.Tensor, v: torch.Tensor, n_valid: Sequence[int] | None = None) -> None:
        """Quantize ``k``, ``v`` ``[B, H_kv, T, D]`` into the cache after each sequence's tokens.

        ``n_valid`` (per sequence, default ``T``) says how many of the ``T`` tokens are real: a
        right-padded ragged prefill writes all ``T`` but advances each length by ``n_valid[b]``,
        so the padding is overwritten by the next append.
        """
        t_new = k.shape[2]
        counts = [t_new] * self.batch if n_valid is None else [int(n) for n in n_valid]
        if len(counts) != self.batch or any(not 0 <= c <= t_new for c in counts):
            raise ValueError(f"n_valid must hold {self.batch} counts in [0, {t_new}], got {counts}")
        full = [n + t_new for n in self._host_lengths]
        if max(full) > self.max_len:
            raise ValueError(
                f"appending {t_new} tokens overflows the cache (lengths {self._host_lengths}, "
                f"max_len {self.max_len}); allocate a larger max_len"
            )
        torch.ops.qtool.kv4_append(
            k,
            v,
            self.k_cache,
            self.k_meta,
            self.v_cache,
            self.v_meta,
            self.lengths,
            self.group_size,
            self.clip_ratio,
        )
        self._host_lengths = [n + c for n, c in zip(self._host_lengths, counts, strict=True)]
        self.lengths.copy_(torch.tensor(self._host_lengths, dtype=torch.int32))

    def attend(
        self,
        q: torch.Tensor,
        k_cur: torch.Tensor,
        v_cur: torch.Tensor,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of the last ``Tq`` appended tokens (``q [B, H_q, Tq, D]``) over the cache.

        ``k_cur`` / ``v_cur`` are those tokens' 16-bit K/V (as appended): each query sees the
        pivot prefix, the quantized earlier tokens and its own K/V unquantized.
        """
        tq = q.shape[2]
        if any(n < tq for n in self._host_lengths):
            raise ValueError(
                f"attend() covers the last {tq} appended tokens, but some sequences hold fewer "
                f"({self._host_lengths}); append the new tokens first"
            )
        past = torch.tensor(
            [n - tq for n in self._host_lengths], dtype=torch.int32, device=self.lengths.device
        )
        return torch.ops.qtool.kv4_attention_decode(
            q,
            k_cur,
            v_cur,
            self.k_cache,
            self.k_meta,
            self.v_cache,
            self.v_meta,
            past,
            self.k_pivot,
            self.v_pivot,
            self.group_size,
            softmax_scale,
        )

    def step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None
    ) -> torch.Tensor:
        """Append ``k``, ``v`` then attend with ``q``: one decode step."""
        self.append(k, v)
        return self.attend(q, k, v, softmax_scale)

    def dequantized(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``b``'s cached K and V as float32 ``[H_kv, length, D]`` (pivot excluded)."""
        n = self._host_lengths[b]
        return (
            kv4_dequantize(self.k_cache[b, :, :n], self.k_meta[b, :, :n]),
            kv4_dequantize(self.v_cache[b, :, :n], self.v_meta[b, :, :n]),
        )

    def memory_bytes(self) -> int:
        """Bytes held by the quantized cache and its scales (pivot excluded)."""
        tensors = (self.k_cache, self.v_cache, self.k_meta, self.v_meta)
        return sum(t.numel() * t.element_size() for t in tensors)
