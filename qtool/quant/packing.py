"""THE int4 packing layout, written down once and used by export, loader and kernels.

qtool layout (identical to compressed-tensors ``pack-quantized`` for 4 bits):

* a weight ``W`` of shape ``[out, in]`` with signed int4 codes ``q`` in ``[-8, 7]``;
* stored as ``weight_packed``: ``int32`` of shape ``[out, ceil(in / 8)]``;
* code ``q[r, c]`` lives in word ``c // 8`` of row ``r`` at bits ``4 * (c % 8)`` ..
  ``4 * (c % 8) + 3`` as the unsigned nibble ``q + 8`` (so the lowest nibble is column 0);
* a ragged tail (``in % 8 != 0``) is padded with the nibble for code 0;
* scales ``weight_scale`` are ``[out, n_groups]`` (``n_groups = 1`` per-channel) in the
  checkpoint dtype; asymmetric zero points are int4 codes packed the same way along the
  *output* dim: ``weight_zero_point`` int32 ``[ceil(out / 8), n_groups]``.

GPTQ (AutoGPTQ v1, symmetric only) is the second layout, for W4A16 exports:
``qweight`` int32 ``[in / 8, out]`` packing 8 input rows per word (unsigned codes ``q + 8``),
``qzeros`` int32 ``[n_groups, out / 8]`` holding ``zero - 1 = 7``, ``scales`` ``[n_groups,
out]`` and ``g_idx`` int32 ``[in]``.
"""

from __future__ import annotations

import math

import torch

NIBBLES = 8  # int4 codes per int32 word
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 codes ``[rows, cols]`` (int8 in [-8, 7]) along dim 1 into int32."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(q.shape)}")
    rows, cols = q.shape
    words = math.ceil(cols / NIBBLES)
    u = (q.to(torch.int32) + 8) & 0xF
    pad = words * NIBBLES - cols
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=8)
    u = u.reshape(rows, words, NIBBLES) << _SHIFTS.to(q.device)
    # the nibbles occupy disjoint bits, so their sum is their bitwise or
    return _to_int32(u)


def _to_int32(u: torch.Tensor) -> torch.Tensor:
    total = u.to(torch.int64).sum(dim=-1)
    total = torch.where(total >= (1 << 31), total - (1 << 32), total)
    return total.to(torch.int32).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[rows, words]`` -> int8 codes ``[rows, cols]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4 expects int32 words, got {packed.dtype}")
    rows, words = packed.shape
    if cols > words * NIBBLES:
        raise ValueError(f"cannot unpack {cols} columns from {words} words")
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (u.reshape(rows, words * NIBBLES)[:, :cols] - 8).to(torch.int8)


def pack_int4_dim0(q: torch.Tensor) -> torch.Tensor:
    """Pack along dim 0 (used for zero points ``[out, groups]`` -> ``[ceil(out/8), groups]``)."""
    return pack_int4(q.t().contiguous()).t().contiguous()


def unpack_int4_dim0(packed: torch.Tensor, rows: int) -> torch.Tensor:
    return unpack_int4(packed.t().contiguous(), rows).t().contiguous()


def pack_gptq(q: torch.Tensor) -> torch.Tensor:
    """GPTQ ``qweight``: codes ``[out, in]`` -> int32 ``[in / 8, out]`` packed along the input."""
    out, cols = q.shape
    if cols % NIBBLES:
        raise ValueError(f"GPTQ format needs an input width divisible by 8, got {cols}")
    return pack_int4_dim0(q.t().contiguous())


def unpack_gptq(qweight: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_gptq`: int32 ``[in / 8, out]`` -> codes ``[out, in]``."""
    return unpack_int4_dim0(qweight, cols).t().contiguous()
