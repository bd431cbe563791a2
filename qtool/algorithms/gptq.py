"""GPTQ (Frantar et al.) and round-to-nearest on one linear layer, as pure tensor functions.

A linear layer computes ``y = W x`` with ``W`` of shape ``[out, in]``. GPTQ quantizes the columns
of ``W`` one at a time and spreads each column's rounding error over the not yet quantized
columns through the inverse Hessian ``H = 2/n * X X^T`` of the layer's calibration inputs, so the
output error ``|W X - W^ X|`` is small rather than the weight error.

Groups are *static*: the group of column ``c`` is always ``c // group_size`` in the original
column order, even with act-order, so exported checkpoints need no ``g_idx``. A group's scale and
zero point are computed from the current (error-updated) weights of the whole group at the moment
its first column, in processing order, is quantized. Without act-order this is the usual GPTQ
behaviour.

All grid arithmetic goes through :mod:`qtool.quant.quantizer`; nothing here rounds on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from qtool.errors import QtoolError
from qtool.quant.quantizer import (
    QSpec,
    compute_qparams,
    dequantize,
    mse_clip_search,
    n_groups,
    quantize,
)

logger = logging.getLogger(__name__)

_CHOLESKY_RETRIES = 4


class HessianError(QtoolError):
    """The layer Hessian is not usable (non-finite, or not positive definite even when damped)."""


@dataclass
class GPTQResult:
    """A quantized weight matrix ``[out, in]``.

    ``codes`` int8 signed codes in the original column order; ``scale`` float32 and ``zero`` int8
    of shape ``[out, n_groups]`` (``[1, 1]`` for tensor granularity); ``weight`` the dequantized
    float32 weight, equal to ``dequantize(codes, scale, zero, spec)``; ``loss`` the objective
    (see :func:`gptq_quantize` / :func:`rtn_quantize`); ``seconds`` the wall time.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor
    loss: float
    seconds: float


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over calibration activations (float32).

    Uses the running-average update of the reference GPTQ, so batches can be added one at a
    time and ``H`` is always the average over the ``n`` rows seen so far.
    """

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None) -> None:
        self.H: torch.Tensor | None = None
        self.n = 0
        if dim is not None:
            self.H = torch.zeros(dim, dim, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add activations ``x`` of shape ``[..., d]`` (every leading index is one sample)."""
        x = x.detach().reshape(-1, x.shape[-1])
        if self.H is None:
            self.H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        if x.shape[-1] != self.H.shape[0]:
            raise ValueError(
                f"activation width {x.shape[-1]} does not match the Hessian width {self.H.shape[0]}"
            )
        t = x.shape[0]
        if t == 0:
            return
        x = x.to(device=self.H.device, dtype=torch.float32)
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H.add_(x.T @ x)

    def merged(self, total: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``H`` over the rows seen by every process: ``total`` sums a tensor over processes (in
        float64; :func:`qtool.dist.sum_`). ``n H`` is summed and divided by the total ``n``."""
        n = float(total(torch.tensor([float(self.n)], dtype=torch.float64)))
        return (total(self.H.to(torch.float64) * self.n) / n).to(torch.float32)


def _check_spec(spec: QSpec) -> None:
    if spec.granularity == "token":
        raise ValueError(
            "granularity 'token' is for activations; quantize weights per 'channel', 'group' or 'tensor'"
        )


def _column_spec(spec: QSpec) -> QSpec:
    """The spec that quantizes one column (or one group slice) with one scale per row."""
    return replace(spec, granularity="channel", group_size=None, ragged=False)


def _qparams(
    x: torch.Tensor, spec: QSpec, mse_clip: bool, scale_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero of ``x`` under ``spec`` (optionally MSE-clipped, scale rounded to a dtype)."""
    clip = mse_clip_search(x, spec) if mse_clip else None
    scale, zero = compute_qparams(x, spec, clip)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(torch.float32)
    return scale, zero


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; retries with 10x damping."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    current = damp
    for attempt in range(_CHOLESKY_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + current * mean_diag * eye)
        if int(info) == 0:
            # cholesky_solve against I: same result as cholesky_inverse, much faster on CPU
            U, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye, L), upper=True)
            if int(info) == 0:
                return U
        if attempt < _CHOLESKY_RETRIES:
            nxt = max(current * 10.0, 1e-4)
            logger.warning("GPTQ: Cholesky failed with damp=%g, retrying with damp=%g", current, nxt)
            current = nxt
    raise HessianError(
        f"the Hessian is not positive definite even with damp={current:g}; check the calibration "
        "activations (enough tokens, no NaN/inf) or raise damp"
    )


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    mse_clip: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """Quantize ``W`` ``[out, in]`` with GPTQ under the Hessian ``H`` ``[in, in]``.

    Dead inputs (``diag H == 0``) get ``H_ii = 1`` and zero weights; ``H`` is damped by
    ``damp * mean(diag H)``; ``act_order`` processes columns by descending ``diag H``; updates are
    applied lazily in blocks of ``block_size`` columns. Per-channel/tensor qparams are computed
    once from ``W`` (``mse_clip``: MSE-searched clip per row); group qparams are static groups (see
    the module docstring), MSE-searched on the group's current weights when ``mse_clip``.
    ``scale_dtype`` rounds every scale to that dtype before codes are computed, so a checkpoint
    storing scales in it reproduces ``weight`` exactly.

    ``loss`` is ``sum_c |w_c - q_c|^2 / [U]_cc^2`` with ``U`` the upper Cholesky factor of the
    damped ``H^-1``; it equals ``tr(E H_damped E^T)`` with ``E = W - weight`` (so
    ``n/2 * loss ~ |W X - weight X|_F^2`` for ``H = 2/n X X^T``).
    """
    start = time.perf_counter()
    _check_spec(spec)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    m, d = W.shape
    if tuple(H.shape) != (d, d):
        raise ValueError(
            f"H must be [in, in] = [{d}, {d}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    spec.check_width(d, "W")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(H).all():
        raise HessianError("the Hessian contains NaN or inf; check the calibration activations")

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    grouped = spec.granularity == "group"
    cspec = _column_spec(spec)
    if grouped:
        ng = n_groups(d, spec)
        scale = torch.zeros(m, ng, dtype=torch.float32, device=W.device)
        zero = torch.zeros(m, ng, dtype=torch.int8, device=W.device)
    else:
        scale, zero = _qparams(W, spec, mse_clip, scale_dtype)

    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(d, device=W.device)
    invperm = torch.argsort(perm)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)

    if grouped:
        group_of = (perm // spec.group_size).tolist()
        first = torch.full((ng,), d, dtype=torch.long, device=W.device)
        first = first.scatter_reduce(0, perm // spec.group_size, torch.arange(d, device=W.device), "amin")
        is_first = set(first.tolist())
    else:
        group_of = [0] * d
        is_first = set()

    codes = torch.zeros(m, d, dtype=torch.int8, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    # the column loop inlines quantize/dequantize (same float32 operations, so the same codes):
    # q = clamp(round(w / s) + z), dq = (q - z) * s, with s and z the column's group parameters.
    # Inside a block the columns are rows (W1t = W[:, i1:i2]^T), so every per-column update
    # touches contiguous memory; the arithmetic is elementwise, hence unchanged.
    zf = zero.float()  # zero points as floats; a group's column is refreshed when its qparams are set
    qmin, qmax = cspec.qmin, cspec.qmax
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1t = W[:, i1:i2].t().contiguous()
        Err1t = torch.zeros_like(W1t)
        Q1t = torch.empty_like(W1t)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            p = i1 + i
            g = group_of[p]
            if p in is_first:
                cols = invperm[g * spec.group_size : min((g + 1) * spec.group_size, d)]
                current = _current_columns(W, W1t, Err1t, Hinv, i1, i, cols)
                s, z = _qparams(current, cspec, mse_clip, scale_dtype)
                scale[:, g] = s[:, 0]
                zero[:, g] = z[:, 0]
                zf[:, g] = zero[:, g].float()
            w = W1t[i]
            s_col = scale[:, g]
            z_col = zf[:, g]
            q = torch.div(w, s_col).round_().add_(z_col).clamp_(qmin, qmax)
            Q1t[i] = q
            err = Err1t[i]
            torch.sub(w, q.sub_(z_col).mul_(s_col), out=err)
            err.div_(Hinv1[i, i])
            # W1[:, i:] -= err h^T, as a product then a subtraction (addr_ rounds differently)
            W1t[i:] -= Hinv1[i, i:][:, None] * err[None, :]
        codes[:, i1:i2] = Q1t.t().to(torch.int8)
        for i in range(i2 - i1):
            loss += Err1t[i].double().pow(2).sum()
        W[:, i2:] -= Err1t.t().contiguous() @ Hinv[i1:i2, i2:]

    codes = codes[:, invperm].contiguous()
    weight = dequantize(codes, scale, zero, spec)
    seconds = time.perf_counter() - start
    logger.debug("GPTQ [%d x %d] %s: loss %.4g in %.2fs", m, d, spec, float(loss), seconds)
    return GPTQResult(codes, scale, zero, weight, float(loss), seconds)


def _current_columns(
    W: torch.Tensor,
    W1t: torch.Tensor,
    Err1t: torch.Tensor,
    Hinv: torch.Tensor,
    i1: int,
    i: int,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Current weights ``[out, len(cols)]`` of the not yet quantized columns at positions ``cols``.

    Columns inside the current block already carry the in-block updates (``W1t``, the block
    transposed); columns past the block get the updates still pending from the ``i`` columns
    quantized in this block (``Err1t``, transposed as well).
    """
    i2 = i1 + W1t.shape[0]
    out = torch.empty(W.shape[0], cols.numel(), dtype=W.dtype, device=W.device)
    inside = cols < i2
    if inside.any():
        out[:, inside] = W1t[cols[inside] - i1].t()
    if (~inside).any():
        later = cols[~inside]
        # the same [out, block] layout as the block's error matrix, so the product rounds alike
        err1 = Err1t.t().contiguous()[:, :i]
        out[:, ~inside] = W[:, later] - err1 @ Hinv[i1 : i1 + i][:, later]
    return out


def rtn_quantize(
    W: torch.Tensor,
    spec: QSpec,
    *,
    mse_clip: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> GPTQResult:
    """Round-to-nearest quantization of ``W`` ``[out, in]``; same result type as GPTQ.

    ``loss`` is the squared weight error ``|W - weight|_F^2``. ``mse_clip`` and ``scale_dtype``
    mean the same as in :func:`gptq_quantize`.
    """
    start = time.perf_counter()
    _check_spec(spec)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D [out, in], got shape {tuple(W.shape)}")
    spec.check_width(W.shape[1], "W")
    W = W.detach().to(torch.float32)
    scale, zero = _qparams(W, spec, mse_clip, scale_dtype)
    codes = quantize(W, scale, zero, spec)
    weight = dequantize(codes, scale, zero, spec)
    loss = float((W.double() - weight.double()).pow(2).sum())
    return GPTQResult(codes, scale, zero, weight, loss, time.perf_counter() - start)
