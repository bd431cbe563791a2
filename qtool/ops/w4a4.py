"""W4A4: per-token int4 activation quantization and the int4 x int4 matmul.

``torch.ops.qtool.quantize_act_int4`` turns 16-bit activations into packed int4 codes plus one
float32 scale per token (optionally after an online Hadamard rotation of the input), and
``torch.ops.qtool.w4a4_matmul`` multiplies them with a packed symmetric per-channel int4 weight
(int32 accumulation, scales applied in the epilogue), plus an optional full-precision low-rank
correction ``(x @ V) @ U^T`` computed from the unquantized input (METHODS.md section 6).
"""

from __future__ import annotations

import math

import torch

from qtool.ops.registry import define_op
from qtool.quant.packing import NIBBLES, pack_int4, unpack_int4
from qtool.quant.quantizer import QSpec, compute_qparams, quantize

QUANT_SCHEMA = (
    "quantize_act_int4(Tensor x, float clip_ratio=1.0, bool hadamard=False, bool pack=True) "
    "-> (Tensor, Tensor)"
)
MATMUL_SCHEMA = (
    "w4a4_matmul(Tensor x_codes, Tensor x_scales, Tensor w_packed, Tensor w_scales, "
    "Tensor? x=None, Tensor? lr_u=None, Tensor? lr_v=None) -> Tensor"
)


def act_spec(clip_ratio: float) -> QSpec:
    """Dynamic per-token symmetric int4 (QuaRot's activation quantizer)."""
    return QSpec(bits=4, symmetric=True, granularity="token", clip_ratio=clip_ratio)


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard rotation of the last dim, in float32.

    Delegates to ``qtool.algorithms.hadamard.fast_hadamard_transform`` (imported here, lazily,
    so the ops load without it). For power-of-two sizes this is the Sylvester matrix divided
    by ``sqrt(K)``, which is what the CUDA kernel computes in shared memory.
    """
    try:
        from qtool.algorithms.hadamard import fast_hadamard_transform
    except ImportError as exc:  # pragma: no cover - depends on the rest of the tree
        raise RuntimeError(
            "hadamard=True needs qtool.algorithms.hadamard.fast_hadamard_transform, which could "
            f"not be imported ({exc}); quantize without the online rotation (hadamard=False)"
        ) from exc
    return fast_hadamard_transform(x.float()).float()


def quantize_act_int4_ref(
    x: torch.Tensor, clip_ratio: float = 1.0, hadamard: bool = False, pack: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-token symmetric int4 activation quantization.

    Shapes and dtypes:
      * ``x``: ``[..., K]`` float16 / bfloat16 (float32 accepted by the reference);
      * ``hadamard``: rotate each token by the orthonormal Hadamard matrix of size ``K`` first
        (the CUDA kernel supports power-of-two ``K`` up to 32768);
      * returns ``(codes, scales)``: ``scales`` float32 ``[..., 1]`` with
        ``scale = clip_ratio * amax(|x|) / 7`` (at least 1e-8), codes
        ``q = clamp(round(x / scale), -8, 7)`` (round half to even) either packed in the qtool
        int4 layout, int32 ``[..., ceil(K / 8)]`` (``pack=True``: column ``c`` in word ``c // 8``
        at bits ``4 * (c % 8)`` as ``q + 8``, a ragged tail padded with code 0), or as int8
        ``[..., K]`` (``pack=False``).

    Equivalent to ``quantizer.compute_qparams`` / ``quantize`` with
    ``QSpec(bits=4, symmetric=True, granularity="token", clip_ratio=clip_ratio)`` on the
    (rotated) float32 input, followed by ``packing.pack_int4``.
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    xf = online_hadamard(x) if hadamard else x.float()
    xf = xf.reshape(-1, k)
    spec = act_spec(clip_ratio)
    scale, zero = compute_qparams(xf, spec)
    q = quantize(xf, scale, zero, spec)
    scales = scale.reshape(*lead, 1)
    if not pack:
        return q.reshape(*lead, k), scales
    return pack_int4(q).reshape(*lead, math.ceil(k / NIBBLES)), scales


def _quantize_act_fake(x, clip_ratio=1.0, hadamard=False, pack=True):
    lead = x.shape[:-1]
    k = x.shape[-1]
    if pack:
        codes = x.new_empty((*lead, math.ceil(k / NIBBLES)), dtype=torch.int32)
    else:
        codes = x.new_empty((*lead, k), dtype=torch.int8)
    return codes, x.new_empty((*lead, 1), dtype=torch.float32)


def _check_w4a4(x_codes, x_scales, w_packed, w_scales, x, lr_u, lr_v) -> None:
    if x_codes.dtype != torch.int32 or x_codes.dim() != 2:
        raise ValueError(
            "x_codes must be packed int32 [M, ceil(K / 8)] (quantize_act_int4(..., pack=True)), "
            f"got {x_codes.dtype} {tuple(x_codes.shape)}"
        )
    if w_packed.dtype != torch.int32 or w_packed.dim() != 2 or w_packed.shape[1] != x_codes.shape[1]:
        raise ValueError(
            f"w_packed must be int32 [N, {x_codes.shape[1]}] to match x_codes, got "
            f"{w_packed.dtype} {tuple(w_packed.shape)}"
        )
    m, n = x_codes.shape[0], w_packed.shape[0]
    if tuple(x_scales.shape) != (m, 1) or x_scales.dtype != torch.float32:
        raise ValueError(f"x_scales must be float32 [{m}, 1], got {x_scales.dtype} {tuple(x_scales.shape)}")
    if tuple(w_scales.shape) != (n, 1):
        raise ValueError(
            f"w_scales must be [{n}, 1] (symmetric per-channel weights), got {tuple(w_scales.shape)}"
        )
    given = [t is not None for t in (x, lr_u, lr_v)]
    if any(given) and not all(given):
        raise ValueError("the low-rank term needs all of x [M, K], lr_u [N, r] and lr_v [K, r]")
    if all(given):
        if x.dim() != 2 or x.shape[0] != m or math.ceil(x.shape[1] / NIBBLES) != x_codes.shape[1]:
            raise ValueError(f"x must be the unquantized input [{m}, K], got {tuple(x.shape)}")
        r = lr_u.shape[-1]
        if tuple(lr_u.shape) != (n, r) or tuple(lr_v.shape) != (x.shape[1], r):
            raise ValueError(
                f"lr_u must be [{n}, r] and lr_v [{x.shape[1]}, r], got {tuple(lr_u.shape)} and "
                f"{tuple(lr_v.shape)}"
            )


def w4a4_matmul_ref(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    x: torch.Tensor | None = None,
    lr_u: torch.Tensor | None = None,
    lr_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference int4 x int4 matmul with per-token and per-channel scales.

    Shapes and dtypes:
      * ``x_codes``: int32 ``[M, ceil(K / 8)]``, activations packed in the qtool int4 layout
        (from ``quantize_act_int4(..., pack=True)``); ``x_scales``: float32 ``[M, 1]``;
      * ``w_packed``: int32 ``[N, ceil(K / 8)]`` symmetric int4 weight codes, same layout;
        ``w_scales``: ``[N, 1]`` float16 / bfloat16, which is also the output dtype;
      * optional low-rank correction: ``x`` ``[M, K]`` the unquantized input exactly as given to
        ``quantize_act_int4`` (fold any online rotation into ``lr_v``), ``lr_v`` ``[K, r]``,
        ``lr_u`` ``[N, r]``;
      * returns ``[M, N]`` in ``w_scales.dtype``.

    Equivalent to ``acc = q_x @ q_w^T`` exactly in integers (int32 accumulation; padded tail
    codes are 0), then ``y = acc * s_x * s_w^T + (x @ V) @ U^T`` in float32.
    """
    _check_w4a4(x_codes, x_scales, w_packed, w_scales, x, lr_u, lr_v)
    width = x_codes.shape[1] * NIBBLES
    qa = unpack_int4(x_codes, width).double()
    qw = unpack_int4(w_packed, width).double()
    # |q| <= 8, so every partial sum is an integer far below 2**53: float64 is exact here
    acc = (qa @ qw.t()).to(torch.int32)
    y = acc.float() * x_scales.float() * w_scales.float().t()
    if x is not None:
        y = y + (x.float() @ lr_v.float()) @ lr_u.float().t()
    return y.to(w_scales.dtype)


def _w4a4_fake(x_codes, x_scales, w_packed, w_scales, x=None, lr_u=None, lr_v=None):
    return w_scales.new_empty((x_codes.shape[0], w_packed.shape[0]))


define_op(QUANT_SCHEMA, quantize_act_int4_ref, _quantize_act_fake)
define_op(MATMUL_SCHEMA, w4a4_matmul_ref, _w4a4_fake)


def quantize_act_int4(
    x: torch.Tensor, clip_ratio: float = 1.0, hadamard: bool = False, pack: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.qtool.quantize_act_int4`` (kernel on CUDA tensors when built, else the ref)."""
    return torch.ops.qtool.quantize_act_int4(x, clip_ratio, hadamard, pack)


def w4a4_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    clip_ratio: float = 1.0,
    hadamard: bool = False,
    lr_u: torch.Tensor | None = None,
    lr_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize ``x [..., K]`` per token and multiply: the whole W4A4 linear in two op calls."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    codes, scales = quantize_act_int4(x2, clip_ratio, hadamard, True)
    full = x2 if lr_u is not None else None
    y = torch.ops.qtool.w4a4_matmul(codes, scales, w_packed, w_scales, full, lr_u, lr_v)
    return y.reshape(*lead, w_packed.shape[0])
