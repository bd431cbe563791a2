"""Low-rank correction (LRC) for activation quantization: ``y = Q_w(W) Q_a(x) + U V^T x``.

Full-precision factors ``U`` ``[m, k]`` and ``V`` ``[d, k]`` act on the *unquantized* input and
absorb what weight and activation quantization lose. With calibration inputs ``X`` ``[d, n]``,
their quantized version ``Y = Q_a(X)`` and the statistics ``S_x = X X^T``, ``S_y = Y Y^T``,
``S_xy = X Y^T`` (accumulated online in float64), :func:`lowrank_solve` starts from the
relaxed optimum (``init="closed_form"``, the default) or from ``U = V = 0`` (``init="zero"``) and
then alternates ``iterations`` times

* W-step (``U, V`` fixed): GPTQ on the target ``W~ = (W - U V^T) S_xy S_y^-1`` (its cross term
  scaled, see below) with Hessian ``S_y``, since ``|A X - B Y|^2 = tr((B - W~) S_y (B - W~)^T) +
  const`` for ``A = W - U V^T``;
* UV-step (``W^`` fixed): reduced-rank regression ``M = W - W^ S_xy^T S_x^-1``,
  ``S_x = L L^T``, truncated SVD ``M L = U_k S_k V_k^T``, ``U = U_k S_k``, ``V^T = V_k^T L^-1``.

Closed-form start (:func:`relaxed_optimum`, METHODS.md 6): with a *continuous* ``W^`` the
problem ``min |W X - W^ Y - U V^T X|^2`` has an exact solution. For fixed ``C = U V^T`` the best
``W^`` is ``(W - C) S_xy S_y^-1`` and what is left is ``tr((W - C) K (W - C)^T)`` with the Schur
complement ``K = S_x - S_xy S_y^-1 S_xy^T`` (the part of ``X`` that no linear map of ``Y``
explains); with ``K = L L^T``, Eckart-Young on ``(W - C) L`` gives, from the SVD
``W L = P S Q^T``, ``U = P_k S_k`` and ``V = L^-T Q_k``, i.e. ``U V^T = P_k P_k^T W``. From
``U = V = 0`` the first W-step fits only what the weights can fix and the alternation zig-zags
between two paths reading almost the same input; from this start one round does most of the work
(the best-seen rule below then often stops at the second W-step).

Damping: every solve adds ``lam = damp * mean(diag S_y)`` to ``S_x``, ``S_y`` *and* ``S_xy``,
i.e. solves the problem exactly on calibration data augmented with ``sqrt(lam) I`` columns where
``Y == X``. This is ridge regression toward the unquantized solution (not toward zero): the
W-step target is ``A + A (S_xy - S_y)(S_y + lam I)^-1``, exactly ``A`` when ``Y == X``, and the
GPTQ Hessian is then GPTQ's own ``S_y + damp * mean(diag S_y) I``. The closed form uses the same
damped statistics, ``K = S_x + lam I - (S_xy + lam I)(S_y + lam I)^-1 (S_xy + lam I)^T``
(computed as ``(S_x - S_xy) - G (S_xy^T - S_y)``, ``G = (S_xy + lam I)(S_y + lam I)^-1``), so it is
the exact optimum of the damped relaxed problem whose continuous W-step is the target above. The
damping does *not* make ``K`` positive definite: ``K`` is PSD, and positive definite iff the
activation error ``X - Y`` spans all ``d`` directions (never with fewer tokens than ``d``, dead
channels or ``Y == X``). A failed Cholesky logs a warning and uses ``K``'s eigen factor
(eigenvalues clamped at 0); ``U V^T = P_k P_k^T W`` needs no inverse of ``L``, so the start stays
exact; ``Y == X`` (``K == 0``) starts at ``U = V = 0``. With ``cross_shrink = 1``, ``rank = 0``
is plain GPTQ on ``W (S_xy + lam I)(S_y + lam I)^-1``; with any factor, plain GPTQ on ``W`` when
``Y == X``.

Cross-term guard (``cross_shrink``, default ``"auto"``): the W-step's ``A (S_xy - S_y) S_y^-1``
regresses ``A``'s share of the activation error on ``Y``, a ``d x d`` fit whose true part is
small (rounding error is nearly unpredictable); with few tokens it fits noise, and rank-0 LRC is
worse on held-out tokens than plain GPTQ (issue 13: down_proj, d = 1536, 32 x 512 tokens). The
W-step therefore uses ``A + s * cross term`` with the positive-part Stein factor
``s = 1 - d RSS / ((n - d) ESS)`` (:func:`cross_shrink_factor`; ``ESS`` = calibration error the
cross term removes, ``RSS`` = what is left; the classic shrinkage ``1 - 1/F`` of a regression's
predictions toward zero), recomputed for each W-step's ``A``; a fixed ``cross_shrink`` in
``[0, 1]`` overrides it. Why a data-driven factor rather than a fixed ridge: the value of the
cross term varies by orders of magnitude between linears (worth a few percent of the error of a
rotated down_proj, far more on heavy-tailed inputs), so any fixed ridge is too strong for some and
too weak for others. Measured by ``python -m scripts.diagnostics.lowrank_heldout --calib
32x512,128x512 --heldout 16x512`` (results/lowrank_heldout.md; SmolLM2-135M layer 5, rotated, W4
per channel, A4 per token): down_proj at 32 x 512 tokens, held-out error against plain GPTQ,
rank 0: the solver before (``init="zero"``, unshrunk) 5.8% worse, the default (closed-form start,
``"auto"``) 0.3% better; rank fraction 0.1: 0.0% vs 22.5% better, 0.3: 8.9% vs 50.9% (q_proj:
11.2% vs 36.0% at 0.1, 17.2% vs 62.7% at 0.3); calibration and held-out reductions stay within a
few points of each other. Below ``10 d`` tokens the cross term cannot pay for itself, so :func:`lowrank_solve` also warns (once per ``(n, d)``).

The reported objective is the exact calibration output error
``|W X - W^ Y - U V^T X|_F^2 = tr(A S_x A^T) - 2 tr(A S_xy W^^T) + tr(W^ S_y W^^T)`` with
``A = W - U V^T``, computed from the statistics alone. GPTQ is not guaranteed to lower it, so the
best ``(W^, U, V)`` seen is kept: a half-step that would raise it is rejected (and a rejected
W-step ends the alternation, since later iterations would repeat it). ``objective`` is thus
non-increasing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qtool.algorithms.gptq import HessianError, gptq_quantize
from qtool.quant.quantizer import QSpec

logger = logging.getLogger(__name__)

INITS = ("closed_form", "zero")
MIN_TOKENS_PER_INPUT = 10  # below n = 10 d the W-step's d x d cross term overfits (METHODS.md 6)
_warned_few_tokens: set[tuple[int, int]] = set()


def _warn_few_tokens(stats: LowRankStats) -> None:
    """Warn once per ``(n, d)`` when activations are quantized and ``n < 10 d``."""
    n, d = stats.n, stats.dim
    if n >= MIN_TOKENS_PER_INPUT * d or (n, d) in _warned_few_tokens or torch.equal(stats.S_xy, stats.S_y):
        return
    _warned_few_tokens.add((n, d))
    logger.warning(
        "LRC: %d calibration tokens for input width %d (fewer than %d x width): the W-step's d x d "
        "cross term overfits; cross_shrink='auto' shrinks it toward plain GPTQ (a fixed factor of 1 "
        "does not); use more calibration tokens for it to help",
        n,
        d,
        MIN_TOKENS_PER_INPUT,
    )


class LowRankStats:
    """Online ``S_x = X X^T``, ``S_y = Y Y^T``, ``S_xy = X Y^T`` (float64) and the count ``n``."""

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None) -> None:
        self.n = 0
        self.S_x: torch.Tensor | None = None
        self.S_y: torch.Tensor | None = None
        self.S_xy: torch.Tensor | None = None
        if dim is not None:
            self._init(dim, torch.device(device) if device is not None else torch.device("cpu"))

    def _init(self, dim: int, device: torch.device) -> None:
        self.S_x, self.S_y, self.S_xy = (
            torch.zeros(dim, dim, dtype=torch.float64, device=device) for _ in range(3)
        )

    @property
    def dim(self) -> int | None:
        return None if self.S_x is None else self.S_x.shape[0]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add unquantized inputs ``x`` ``[..., d]`` and their quantized version ``y`` (same shape)."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.S_x is None:
            self._init(x.shape[-1], x.device)
        if x.shape[-1] != self.dim:
            raise ValueError(f"input width {x.shape[-1]} does not match the statistics width {self.dim}")
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.S_x.device, dtype=torch.float64)
        y = y.detach().reshape(-1, y.shape[-1]).to(device=self.S_x.device, dtype=torch.float64)
        self.S_x += x.T @ x
        self.S_y += y.T @ y
        self.S_xy += x.T @ y
        self.n += x.shape[0]

    def merged(self, total: Callable[[torch.Tensor], torch.Tensor]) -> LowRankStats:
        """The statistics over the rows seen by every process: ``total`` sums a tensor over
        processes in float64 (:func:`qtool.dist.sum_`)."""
        out = LowRankStats()
        out.n = int(total(torch.tensor([float(self.n)], dtype=torch.float64)).item())
        out.S_x, out.S_y, out.S_xy = (total(t) for t in (self.S_x, self.S_y, self.S_xy))
        return out


@dataclass
class LowRankResult:
    """Quantized weight (as in ``GPTQResult``) plus the correction ``U`` ``[m, k]``, ``V`` ``[d, k]``.

    ``objective`` holds the calibration output error after each accepted half-step (W, UV, W, ...);
    ``cross_shrink`` the cross-term factor of each W-step run.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    objective: list[float] = field(default_factory=list)
    cross_shrink: list[float] = field(default_factory=list)
    seconds: float = 0.0


def rank_for_fraction(m: int, d: int, fraction: float) -> int:
    """Rank whose ``U``, ``V`` hold ``fraction`` of the ``m x d`` weight's parameters."""
    if fraction < 0:
        raise ValueError(f"rank fraction must be >= 0, got {fraction}")
    return int(round(fraction * m * d / (m + d)))


def _cholesky(S: torch.Tensor, name: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        raise HessianError(f"{name} is not positive definite; use more calibration tokens or a larger damp")
    return L


def lowrank_objective(
    W: torch.Tensor, W_hat: torch.Tensor, U: torch.Tensor, V: torch.Tensor, stats: LowRankStats
) -> float:
    """``|W X - W_hat Y - U V^T X|_F^2`` from the statistics (float64, no stored ``X``)."""
    dev = stats.S_x.device
    A = W.to(dev, torch.float64) - U.to(dev, torch.float64) @ V.to(dev, torch.float64).T
    B = W_hat.to(dev, torch.float64)
    value = ((A @ stats.S_x) * A).sum() - 2 * ((A @ stats.S_xy) * B).sum() + ((B @ stats.S_y) * B).sum()
    return float(value)


def _damping(stats: LowRankStats, damp: float) -> float:
    return damp * float(torch.diag(stats.S_y).mean())


def _cross_term(
    W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, stats: LowRankStats, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A = W - U V^T``, ``A (S_xy - S_y)`` and the cross term ``A (S_xy - S_y)(S_y + lam I)^-1``."""
    dev = stats.S_x.device
    A = W.to(dev, torch.float64) - U.to(dev, torch.float64) @ V.to(dev, torch.float64).T
    eye = torch.eye(A.shape[1], dtype=torch.float64, device=dev)
    L = _cholesky(stats.S_y + _damping(stats, damp) * eye, "S_y (quantized-input statistics)")
    AD = A @ (stats.S_xy - stats.S_y)
    # (A D) S^-1 with S symmetric is (S^-1 (A D)^T)^T
    return A, AD, torch.cholesky_solve(AD.T, L).T


def _shrink_factor(A: torch.Tensor, AD: torch.Tensor, cross: torch.Tensor, stats: LowRankStats) -> float:
    n, d = stats.n, A.shape[1]
    ess = float((cross * AD).sum())  # calibration error the cross term removes
    if ess <= 0:
        return 1.0  # no cross term (Y == X): the factor does not matter; keep the target exact
    if n <= d:
        return 0.0  # the d x d regression interpolates: nothing to estimate from
    tot = float(((A @ (stats.S_x - stats.S_xy - stats.S_xy.T + stats.S_y)) * A).sum())  # |A (X - Y)|^2
    return min(1.0, max(0.0, 1.0 - d * max(tot - ess, 0.0) / ((n - d) * ess)))


def cross_shrink_factor(
    W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, stats: LowRankStats, damp: float
) -> float:
    """Data-driven factor in ``[0, 1]`` for the W-step's cross term (``cross_shrink="auto"``).

    Positive-part Stein shrinkage of the regression of ``A (X - Y)`` on ``Y`` (``A = W - U V^T``):
    ``s = 1 - d RSS / ((n - d) ESS) = 1 - 1/F``, with ``ESS`` the calibration error the cross term
    removes and ``RSS`` what is left; ``0`` when ``n <= d``, ``1`` when there is no cross term.
    """
    return _shrink_factor(*_cross_term(W, U, V, stats, damp), stats)


def w_target(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    stats: LowRankStats,
    damp: float,
    shrink: float = 1.0,
) -> torch.Tensor:
    """W-step target ``A + s A (S_xy - S_y)(S_y + lam I)^-1`` with ``A = W - U V^T``; ``[m, d]`` float64.

    ``s = shrink``: ``1`` is the exact continuous W-step, ``0`` drops the cross term (plain GPTQ
    on ``A``).
    """
    A, _, cross = _cross_term(W, U, V, stats, damp)
    return A + cross if shrink == 1.0 else A + shrink * cross


def uv_step(
    W: torch.Tensor, W_hat: torch.Tensor, stats: LowRankStats, rank: int, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` ``U`` ``[m, k]``, ``V`` ``[d, k]`` (float64) for a fixed ``W_hat``.

    Reduced-rank regression of ``W X - W_hat Y`` on ``X`` (damped as in the module docstring):
    ``M = W - W_hat - W_hat (S_xy^T - S_x)(S_x + lam I)^-1``, ``S_x + lam I = L L^T``, truncated
    SVD ``M L = U_k S_k V_k^T``, ``U = U_k S_k``, ``V = L^-T V_k``.
    """
    dev = stats.S_x.device
    W = W.to(dev, torch.float64)
    B = W_hat.to(dev, torch.float64)
    m, d = W.shape
    if rank == 0:
        return W.new_zeros(m, 0), W.new_zeros(d, 0)
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    L = _cholesky(stats.S_x + _damping(stats, damp) * eye, "S_x (input statistics)")
    M = W - B - torch.cholesky_solve((B @ (stats.S_xy.T - stats.S_x)).T, L).T
    Uk, Sk, Vhk = torch.linalg.svd(M @ L, full_matrices=False)
    U = Uk[:, :rank] * Sk[:rank]
    V = torch.linalg.solve_triangular(L.T, Vhk[:rank].T, upper=True)
    return U, V


def relaxed_optimum(
    W: torch.Tensor, stats: LowRankStats, rank: int, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``U`` ``[m, k]``, ``V`` ``[d, k]`` (float64) of the problem with continuous ``W^``.

    Exact minimizer over any ``B`` ``[m, d]`` and rank-``k`` ``C = U V^T`` of
    ``|(W - C) X - B Y|^2 + lam |(W - C) - B|^2`` (``lam = damp * mean(diag S_y)``: the damped
    problem every half-step solves; its best ``B`` for a given ``C`` is the W-step target with
    ``shrink = 1``). For fixed ``C`` the best ``B`` is ``(W - C) G`` with
    ``G = (S_xy + lam I)(S_y + lam I)^-1`` and the rest is ``tr((W - C) K (W - C)^T)``,
    ``K = S_x + lam I - G (S_xy + lam I)^T``, computed as ``(S_x - S_xy) - G (S_xy^T - S_y)``
    (``lam`` cancels in both differences). With ``K = L L^T``, Eckart-Young on ``(W - C) L``
    gives ``C L = P_k S_k Q_k^T`` from the SVD ``W L = P S Q^T``:
    ``U = P_k S_k``, ``V = L^-T Q_k``, computed as ``V = W^T P_k S_k^-1`` (equal, since
    ``Q_k = L^T W^T P_k S_k^-1``), so ``U V^T = P_k P_k^T W``: no solve with ``L``, and the same
    formula is exact for a singular ``K`` with any factor ``L``.

    ``K`` is PSD but positive definite only if the activation error ``E = X - Y`` spans all ``d``
    directions (``K v = 0`` iff ``E^T v = 0``); it is singular with fewer tokens than ``d``, dead
    channels or ``Y == X``. When its Cholesky fails, a warning is logged and ``L`` is the eigen
    factor of ``K`` with negative eigenvalues clamped to 0; components with ``S_j <= 1e-7 S_1``
    get zero columns (``K == 0``, i.e. ``Y == X``, gives ``U = V = 0``, the zero start).
    """
    dev = stats.S_x.device
    W = W.to(dev, torch.float64)
    m, d = W.shape
    U, V = W.new_zeros(m, rank), W.new_zeros(d, rank)
    if rank == 0:
        return U, V
    if torch.equal(stats.S_xy, stats.S_y):  # Y == X: K == 0, every C is optimal; take C = 0
        logger.info("LRC closed-form start: no activation quantization error; starting from U = V = 0")
        return U, V
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    lam = _damping(stats, damp)
    Ly = _cholesky(stats.S_y + lam * eye, "S_y (quantized-input statistics)")
    G = torch.cholesky_solve((stats.S_xy + lam * eye).T, Ly).T  # (S_xy + lam I)(S_y + lam I)^-1
    K = (stats.S_x - stats.S_xy) - G @ (stats.S_xy.T - stats.S_y)
    K = 0.5 * (K + K.T)
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        evals, evecs = torch.linalg.eigh(K)
        n_pos = int((evals > 1e-12 * evals.abs().max().clamp(min=1e-300)).sum())
        logger.warning(
            "LRC closed-form start: K = S_x - S_xy S_y^-1 S_xy^T is not positive definite "
            "(%d of %d eigenvalues > 0; %d calibration tokens): the activation error does not span "
            "every input direction; using K's eigen factor, the correction only where K > 0",
            n_pos,
            d,
            stats.n,
        )
        L = evecs * evals.clamp(min=0).sqrt()
    P, S, _ = torch.linalg.svd(W @ L, full_matrices=False)
    keep = min(rank, int((S > 1e-7 * S[0]).sum())) if S.numel() and S[0] > 0 else 0
    if keep < rank:
        logger.warning(
            "LRC closed-form start: W L has rank %d < %d; the other columns start at 0", keep, rank
        )
    Pk, Sk = P[:, :keep], S[:keep]
    U[:, :keep] = Pk * Sk
    V[:, :keep] = (W.T @ Pk) / Sk
    return U, V


def lowrank_solve(
    W: torch.Tensor,
    stats: LowRankStats,
    spec: QSpec,
    rank: int,
    *,
    iterations: int = 1,
    damp: float = 0.01,
    init: str = "closed_form",
    cross_shrink: float | str = "auto",
    gptq_kwargs: dict | None = None,
) -> LowRankResult:
    """Quantize ``W`` ``[m, d]`` with GPTQ and fit a rank-``rank`` correction ``U V^T``.

    Alternates ``iterations`` W-steps and UV-steps (see the module docstring) from ``init``:
    ``"closed_form"`` (:func:`relaxed_optimum`) or ``"zero"`` (``U = V = 0``). ``damp`` is the
    relative ridge of both solves and GPTQ's damping; ``cross_shrink`` scales the W-step's cross
    term: ``"auto"`` (:func:`cross_shrink_factor`, recomputed at each W-step) or a fixed factor in
    ``[0, 1]`` (``1.0`` with ``init="zero"`` is the solver before the closed-form start, bit for
    bit); ``gptq_kwargs`` go to :func:`~qtool.algorithms.gptq.gptq_quantize`
    (``block_size``, ``act_order``, ``mse_clip``, ``scale_dtype``; a ``damp`` there overrides
    GPTQ's damping only).
    """
    start = time.perf_counter()
    if stats.S_x is None or stats.n == 0:
        raise ValueError("the low-rank statistics are empty; add calibration activations first")
    if W.dim() != 2 or W.shape[1] != stats.dim:
        raise ValueError(f"W must be [m, {stats.dim}] to match the statistics, got {tuple(W.shape)}")
    m, d = W.shape
    if not 0 <= rank <= min(m, d):
        raise ValueError(f"rank must be between 0 and min(m, d) = {min(m, d)}, got {rank}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if cross_shrink != "auto" and not (
        isinstance(cross_shrink, (int, float)) and 0.0 <= float(cross_shrink) <= 1.0
    ):
        raise ValueError(f"cross_shrink must be 'auto' or a number in [0, 1], got {cross_shrink!r}")
    _warn_few_tokens(stats)
    kwargs = {"damp": damp, **(gptq_kwargs or {})}
    H = (2.0 / stats.n) * stats.S_y  # GPTQ's scaling; the GPTQ objective is scale-invariant
    if init == "closed_form":
        U, V = relaxed_optimum(W, stats, rank, damp)
    else:
        U = torch.zeros(m, rank, dtype=torch.float64, device=stats.S_x.device)
        V = torch.zeros(d, rank, dtype=torch.float64, device=stats.S_x.device)

    best, best_obj, objective, shrinks = None, float("inf"), [], []
    for it in range(iterations):
        A, AD, cross = _cross_term(W, U, V, stats, damp)
        s = _shrink_factor(A, AD, cross, stats) if cross_shrink == "auto" else float(cross_shrink)
        shrinks.append(s)
        logger.info("LRC iter %d: cross-term factor %.3f", it + 1, s)
        target = (A + cross if s == 1.0 else A + s * cross).to(device=W.device, dtype=torch.float32)
        del A, AD, cross
        q = gptq_quantize(target, H.to(device=W.device, dtype=torch.float32), spec, **kwargs)
        obj = lowrank_objective(W, q.weight, U, V, stats)
        if obj > best_obj:
            logger.info(
                "LRC iter %d: W-step would raise the objective to %.6g; keeping the previous W^", it + 1, obj
            )
            break
        best, best_obj = (q, U, V), obj
        objective.append(obj)
        logger.info("LRC iter %d: objective after W-step %.6g", it + 1, obj)

        U_new, V_new = uv_step(W, q.weight, stats, rank, damp)
        obj = lowrank_objective(W, q.weight, U_new, V_new, stats)
        if obj <= best_obj:
            U, V = U_new, V_new
            best, best_obj = (q, U, V), obj
        else:
            logger.info(
                "LRC iter %d: UV-step would raise the objective to %.6g; kept previous U, V", it + 1, obj
            )
        objective.append(best_obj)
        logger.info("LRC iter %d: objective after UV-step %.6g", it + 1, best_obj)

    q, U, V = best
    return LowRankResult(
        codes=q.codes,
        scale=q.scale,
        zero=q.zero,
        weight=q.weight,
        U=U.to(device=W.device, dtype=torch.float32),
        V=V.to(device=W.device, dtype=torch.float32),
        objective=objective,
        cross_shrink=shrinks,
        seconds=time.perf_counter() - start,
    )
