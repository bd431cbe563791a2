"""Low-rank correction (LRC) for activation quantization: ``y = Q_w(W) Q_a(x) + U V^T x``.

Full-precision factors ``U`` ``[m, k]`` and ``V`` ``[d, k]`` act on the *unquantized* input and
absorb what weight and activation quantization lose. With calibration inputs ``X`` ``[d, n]``,
their quantized version ``Y = Q_a(X)`` and the statistics ``S_x = X X^T``, ``S_y = Y Y^T``,
``S_xy = X Y^T`` (accumulated online in float64), :func:`lowrank_solve` alternates

* W-step (``U, V`` fixed): GPTQ on the target ``W~ = (W - U V^T) S_xy S_y^-1`` with Hessian
  ``S_y``, since ``|A X - B Y|^2 = tr((B - W~) S_y (B - W~)^T) + const`` for ``A = W - U V^T``;
* UV-step (``W^`` fixed): reduced-rank regression ``M = W - W^ S_xy^T S_x^-1``,
  ``S_x = L L^T``, truncated SVD ``M L = U_k S_k V_k^T``, ``U = U_k S_k``, ``V^T = V_k^T L^-1``.

Damping: both solves add ``lam = damp * mean(diag S_y)`` to ``S_x``, ``S_y`` *and* ``S_xy``,
i.e. they solve the problem exactly on calibration data augmented with ``sqrt(lam) I`` columns
where ``Y == X``. This is ridge regression toward the unquantized solution (not toward zero): the
W-step target is ``A + A (S_xy - S_y)(S_y + lam I)^-1``, exactly ``A`` when ``Y == X``, and the
GPTQ Hessian is then GPTQ's own ``S_y + damp * mean(diag S_y) I``. Hence ``rank = 0`` is plain
GPTQ on ``W S_xy S_y^-1`` (damped as above), and plain GPTQ on ``W`` when ``Y == X``.

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
from dataclasses import dataclass, field

import torch

from qtool.algorithms.gptq import HessianError, gptq_quantize
from qtool.quant.quantizer import QSpec

logger = logging.getLogger(__name__)


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


@dataclass
class LowRankResult:
    """Quantized weight (as in ``GPTQResult``) plus the correction ``U`` ``[m, k]``, ``V`` ``[d, k]``.

    ``objective`` holds the calibration output error after each accepted half-step (W, UV, W, ...).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    objective: list[float] = field(default_factory=list)
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


def w_target(
    W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, stats: LowRankStats, damp: float
) -> torch.Tensor:
    """W-step target ``A + A (S_xy - S_y)(S_y + lam I)^-1`` with ``A = W - U V^T``; ``[m, d]`` float64."""
    dev = stats.S_x.device
    A = W.to(dev, torch.float64) - U.to(dev, torch.float64) @ V.to(dev, torch.float64).T
    eye = torch.eye(A.shape[1], dtype=torch.float64, device=dev)
    L = _cholesky(stats.S_y + _damping(stats, damp) * eye, "S_y (quantized-input statistics)")
    # (A D) S^-1 with S symmetric is (S^-1 (A D)^T)^T
    return A + torch.cholesky_solve((A @ (stats.S_xy - stats.S_y)).T, L).T


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


def lowrank_solve(
    W: torch.Tensor,
    stats: LowRankStats,
    spec: QSpec,
    rank: int,
    *,
    iterations: int = 1,
    damp: float = 0.01,
    gptq_kwargs: dict | None = None,
) -> LowRankResult:
    """Quantize ``W`` ``[m, d]`` with GPTQ and fit a rank-``rank`` correction ``U V^T``.

    Alternates ``iterations`` W-steps and UV-steps from ``U = V = 0`` (see the module docstring).
    ``damp`` is the relative ridge of both solves and GPTQ's damping; ``gptq_kwargs`` go to
    :func:`~qtool.algorithms.gptq.gptq_quantize` (``block_size``, ``act_order``, ``mse_clip``,
    ``scale_dtype``; a ``damp`` there overrides GPTQ's damping only).
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
    kwargs = {"damp": damp, **(gptq_kwargs or {})}
    H = (2.0 / stats.n) * stats.S_y  # GPTQ's scaling; the GPTQ objective is scale-invariant
    U = torch.zeros(m, rank, dtype=torch.float64, device=stats.S_x.device)
    V = torch.zeros(d, rank, dtype=torch.float64, device=stats.S_x.device)

    best, best_obj, objective = None, float("inf"), []
    for it in range(iterations):
        target = w_target(W, U, V, stats, damp).to(device=W.device, dtype=torch.float32)
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
        seconds=time.perf_counter() - start,
    )
