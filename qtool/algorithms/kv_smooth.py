"""WKVQuant's smoothing folded into the attention weights (METHODS.md section 4), as tensor math.

A per-KV-channel scale ``s_k`` (tied on RoPE pairs) and ``s_v`` ``[H_kv, D]`` divide K and V before
quantization; the fold keeps the full-precision function unchanged: ``W_k`` rows ``/ s_k`` and
``W_q`` rows ``* s_k`` (per KV group), ``W_v`` rows ``/ s_v`` and ``W_o`` columns ``* s_v``.
:func:`fold_linear` is the one definition: the in-place fold (float64, no grad) and the
differentiable one used while learning the scales both call it.
"""

from __future__ import annotations

import torch


def q_rows(s: torch.Tensor, groups: int) -> torch.Tensor:
    """A per-KV-head ``[H_kv, D]`` factor as one per q/o channel ``[H_kv * groups * D]``."""
    return s.repeat_interleave(groups, dim=0).reshape(-1)


def fold_factors(
    name: str, sk: torch.Tensor, sv: torch.Tensor, groups: int, fold_k: bool, fold_v: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(row, column)`` factors of linear ``name`` (None where it is not scaled)."""
    if fold_k and name == "k_proj":
        return 1 / sk.reshape(-1), None
    if fold_k and name == "q_proj":
        return q_rows(sk, groups), None
    if fold_v and name == "v_proj":
        return 1 / sv.reshape(-1), None
    if fold_v and name == "o_proj":
        return None, q_rows(sv, groups)
    return None, None


def fold_linear(
    name: str,
    w: torch.Tensor,
    b: torch.Tensor | None,
    sk: torch.Tensor,
    sv: torch.Tensor,
    groups: int,
    fold_k: bool,
    fold_v: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ``[out, in]`` and bias of linear ``name`` with the smoothing folded in."""
    row, col = fold_factors(name, sk.to(w.device), sv.to(w.device), groups, fold_k, fold_v)
    if row is not None:
        w = w * row[:, None]
        b = None if b is None else b * row.to(b.device)
    if col is not None:
        w = w * col[None]
    return w, b
