"""W4A16 matmul: 16-bit activations times packed int4 weights (``torch.ops.qtool.int4_matmul``)."""

from __future__ import annotations

import math

import torch

from qtool.ops.registry import define_op
from qtool.quant.packing import NIBBLES, pack_int4, pack_int4_dim0, unpack_int4, unpack_int4_dim0
from qtool.quant.quantizer import QSpec, compute_qparams, dequantize, quantize

SCHEMA = (
    "int4_matmul(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros=None, int group_size=-1) -> Tensor"
)


def weight_spec(group_size: int, symmetric: bool) -> QSpec:
    """The :class:`QSpec` of a packed int4 weight (``group_size <= 0`` means per-channel)."""
    if group_size is None or group_size <= 0:
        return QSpec(bits=4, symmetric=symmetric, granularity="channel")
    return QSpec(bits=4, symmetric=symmetric, granularity="group", group_size=group_size, ragged=True)


def check_int4_weight(
    in_features: int,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> int:
    """Validate a packed weight against ``in_features``; returns ``out_features``."""
    if w_packed.dtype != torch.int32 or w_packed.dim() != 2:
        raise ValueError(
            f"w_packed must be int32 [out, ceil(in / 8)], got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    n_out, words = w_packed.shape
    if words != math.ceil(in_features / NIBBLES):
        raise ValueError(
            f"w_packed has {words} words per row but the input width {in_features} needs "
            f"{math.ceil(in_features / NIBBLES)}; pack the weight with qtool.quant.packing.pack_int4"
        )
    groups = 1 if group_size <= 0 else math.ceil(in_features / group_size)
    if tuple(scales.shape) != (n_out, groups):
        raise ValueError(
            f"scales must be [{n_out}, {groups}] for input width {in_features} and group_size "
            f"{group_size}, got {tuple(scales.shape)}"
        )
    if zeros is not None and (
        zeros.dtype != torch.int32 or tuple(zeros.shape) != (math.ceil(n_out / 8), groups)
    ):
        raise ValueError(
            f"zeros must be int32 [{math.ceil(n_out / 8)}, {groups}] (int4 codes packed along the "
            f"output dim), got {zeros.dtype} {tuple(zeros.shape)}"
        )
    return n_out


def dequantize_int4_weight(
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    in_features: int,
    group_size: int = -1,
) -> torch.Tensor:
    """``(q - z) * s`` of a packed weight as a float32 ``[out, in]`` tensor."""
    n_out = check_int4_weight(in_features, w_packed, scales, zeros, group_size)
    q = unpack_int4(w_packed, in_features)
    z = torch.zeros_like(scales, dtype=torch.int8) if zeros is None else unpack_int4_dim0(zeros, n_out)
    return dequantize(q, scales.float(), z, weight_spec(group_size, zeros is None))


def quantize_weight_int4(
    w: torch.Tensor,
    group_size: int = -1,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RTN-quantize a dense ``[out, in]`` weight into the packed layout.

    Returns ``(w_packed int32 [out, ceil(in/8)], scales [out, G], zeros int32 [ceil(out/8), G]
    or None)``; scales are in ``scale_dtype`` (default ``w.dtype``) and the codes are taken
    with the rounded scales, so dequantizing the result is exactly what the ops compute.
    """
    spec = QSpec(
        bits=4,
        symmetric=symmetric,
        granularity="channel" if group_size <= 0 else "group",
        group_size=group_size if group_size > 0 else None,
        clip_ratio=clip_ratio,
        ragged=True,
    )
    scale, zero = compute_qparams(w, spec)
    scale = scale.to(scale_dtype or w.dtype)
    q = quantize(w, scale.float(), zero, spec)
    return pack_int4(q), scale, None if symmetric else pack_int4_dim0(zero)


def int4_matmul_ref(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    group_size: int = -1,
) -> torch.Tensor:
    """Reference W4A16 matmul ``y = x @ dequant(W)^T``.

    Shapes and dtypes:
      * ``x``: ``[..., K]`` float16 / bfloat16 (float32 accepted by the reference);
      * ``w_packed``: int32 ``[N, ceil(K / 8)]``, the qtool int4 layout: the signed code of
        column ``c`` sits in word ``c // 8`` at bits ``4 * (c % 8)`` as the nibble ``q + 8``;
      * ``scales``: ``[N, G]`` in x's 16-bit dtype, ``G = 1`` when ``group_size == -1``
        (per output channel) else ``G = ceil(K / group_size)`` (a ragged last group is shorter);
      * ``zeros``: None (symmetric) or asymmetric int4 zero-point codes packed along the
        output dim, int32 ``[ceil(N / 8), G]``;
      * returns ``[..., N]`` in x's dtype.

    Equivalent to ``(x.float() @ ((unpack(w_packed) - z) * s).T).to(x.dtype)``, computed in
    float32 here; the CUDA kernels accumulate in float32 as well.
    """
    k = x.shape[-1]
    w = dequantize_int4_weight(w_packed, scales, zeros, k, group_size)
    return (x.float() @ w.t()).to(x.dtype)


def _int4_matmul_fake(x, w_packed, scales, zeros=None, group_size=-1):
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


define_op(SCHEMA, int4_matmul_ref, _int4_matmul_fake)


def int4_matmul(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    group_size: int = -1,
) -> torch.Tensor:
    """``torch.ops.qtool.int4_matmul``: the CUDA kernel on CUDA tensors when built, else the ref."""
    return torch.ops.qtool.int4_matmul(x, w_packed, scales, zeros, group_size)
