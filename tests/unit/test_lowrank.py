"""Low-rank correction: statistics, closed-form steps and the alternating solver."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.gptq import gptq_quantize
from qtool.algorithms.lowrank import (
    LowRankStats,
    lowrank_objective,
    lowrank_solve,
    rank_for_fraction,
    uv_step,
    w_target,
)
from qtool.quant.quantizer import QSpec, fake_quant

M, D, N = 24, 40, 400
WSPEC = QSpec(4, True, "channel")


@pytest.fixture(scope="module")
def data():
    """Correlated inputs ``X`` ``[D, N]``, their 4-bit per-token quantization ``Y`` and ``W``."""
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(D, D, generator=g) / D**0.5) @ torch.randn(D, N, generator=g)
    X[3] *= 8.0  # an outlier channel, as in real activations
    Y = fake_quant(X.T, QSpec(4, True, "token")).T
    W = torch.randn(M, D, generator=g)
    return W.double(), X.double(), Y.double()


def make_stats(X, Y, chunks=3):
    stats = LowRankStats()
    for x, y in zip(X.T.chunk(chunks), Y.T.chunk(chunks), strict=True):
        stats.add(x.float(), y.float())
    return stats


def explicit(W, W_hat, U, V, X, Y):
    return float((W @ X - W_hat.double() @ Y - U.double() @ V.double().T @ X).pow(2).sum())


def test_stats_and_rank_budget(data):
    _, X, Y = data
    stats = make_stats(X, Y)
    assert stats.n == N and stats.S_x.dtype == torch.float64
    Xf, Yf = X.float().double(), Y.float().double()
    torch.testing.assert_close(stats.S_x, Xf @ Xf.T)
    torch.testing.assert_close(stats.S_y, Yf @ Yf.T)
    torch.testing.assert_close(stats.S_xy, Xf @ Yf.T)
    with pytest.raises(ValueError, match="same shape"):
        stats.add(torch.zeros(3, D), torch.zeros(2, D))
    assert rank_for_fraction(4096, 4096, 0.1) == 205
    assert rank_for_fraction(4096, 11008, 0.3) == round(0.3 * 4096 * 11008 / (4096 + 11008))
    assert rank_for_fraction(10, 10, 0.0) == 0


def test_closed_form_objective_matches_explicit(data):
    W, X, Y = data
    stats = make_stats(X, Y)
    X, Y = X.float().double(), Y.float().double()  # what the statistics saw
    g = torch.Generator().manual_seed(3)
    W_hat = W + 0.1 * torch.randn(M, D, generator=g, dtype=torch.float64)
    U = torch.randn(M, 5, generator=g, dtype=torch.float64)
    V = 0.05 * torch.randn(D, 5, generator=g, dtype=torch.float64)
    ref = explicit(W, W_hat, U, V, X, Y)
    assert lowrank_objective(W, W_hat, U, V, stats) == pytest.approx(ref, rel=1e-9)


def test_objective_never_increases(data):
    W, X, Y = data
    stats = make_stats(X, Y)
    res = lowrank_solve(W.float(), stats, WSPEC, rank=6, iterations=3)
    obj = res.objective
    assert 2 <= len(obj) <= 6
    assert all(b <= a for a, b in zip(obj, obj[1:], strict=False))
    assert obj[-1] < 0.9 * obj[0]  # the correction helps
    assert res.U.shape == (M, 6) and res.V.shape == (D, 6) and res.U.dtype == torch.float32
    ref = explicit(W, res.weight, res.U, res.V, X.float().double(), Y.float().double())
    assert obj[-1] == pytest.approx(ref, rel=1e-5)


def test_full_rank_uv_step_is_least_squares(data):
    W, X, Y = data
    stats = make_stats(X, Y)
    X, Y = X.float().double(), Y.float().double()
    W_hat = gptq_quantize(W.float(), (X @ X.T).float(), WSPEC).weight.double()
    k = min(M, D)
    U, V = uv_step(W, W_hat, stats, k, damp=0.0)
    R = W @ X - W_hat @ Y  # residual to regress on X
    C = torch.linalg.lstsq(X.T, R.T).solution.T
    torch.testing.assert_close(U @ V.T, C, rtol=1e-6, atol=1e-8)


def test_low_rank_uv_step_is_optimal(data):
    W, X, Y = data
    stats = make_stats(X, Y)
    X, Y = X.float().double(), Y.float().double()
    W_hat = gptq_quantize(W.float(), (X @ X.T).float(), WSPEC).weight.double()
    k = 3
    U, V = uv_step(W, W_hat, stats, k, damp=0.0)
    # independent rank-k regression from X itself: X^T = Q R so |Res - C X| = |Res Q - C R^T| + const;
    # take the best rank-k P of Res Q and solve C R^T = P
    Q, Rq = torch.linalg.qr(X.T)
    Uk, Sk, Vhk = torch.linalg.svd((W @ X - W_hat @ Y) @ Q, full_matrices=False)
    P = (Uk[:, :k] * Sk[:k]) @ Vhk[:k]
    C = torch.linalg.solve_triangular(Rq.T, P, upper=False, left=False)
    torch.testing.assert_close(U @ V.T, C, rtol=1e-6, atol=1e-8)
    best = lowrank_objective(W, W_hat, U, V, stats)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        dU = 1e-3 * torch.randn(U.shape, generator=g, dtype=torch.float64)
        dV = 1e-3 * torch.randn(V.shape, generator=g, dtype=torch.float64)
        assert lowrank_objective(W, W_hat, U + dU, V + dV, stats) >= best * (1 - 1e-12)


def test_rank_zero_is_plain_gptq(data):
    W, X, Y = data
    stats = make_stats(X, Y)
    H = (2.0 / stats.n) * stats.S_y
    res = lowrank_solve(W.float(), stats, WSPEC, rank=0)
    zeros_u, zeros_v = torch.zeros(M, 0), torch.zeros(D, 0)
    target = w_target(W.float(), zeros_u, zeros_v, stats, 0.01).float()
    ref = gptq_quantize(target, H.float(), WSPEC, damp=0.01)
    assert torch.equal(res.codes, ref.codes) and torch.equal(res.weight, ref.weight)
    assert res.U.shape == (M, 0) and res.V.shape == (D, 0)

    # without activation quantization (Y == X) the target is W itself
    same = make_stats(X, X)
    assert torch.equal(w_target(W.float(), zeros_u, zeros_v, same, 0.01).float(), W.float())
    res = lowrank_solve(W.float(), same, WSPEC, rank=0)
    ref = gptq_quantize(W.float(), ((2.0 / same.n) * same.S_y).float(), WSPEC, damp=0.01)
    assert torch.equal(res.weight, ref.weight)


def test_full_rank_recovers_weight_quantization_error(data):
    W, X, _ = data
    stats = make_stats(X, X)  # weight quantization only
    res = lowrank_solve(W.float(), stats, QSpec(2, True, "channel"), rank=min(M, D))
    Xd = X.float().double()
    out = res.weight.double() @ Xd + res.U.double() @ res.V.double().T @ Xd
    rel = float((W @ Xd - out).pow(2).sum() / (W @ Xd).pow(2).sum())
    assert rel < 1e-10
    assert res.objective[-1] < 1e-8 * res.objective[0]


def test_bad_arguments(data):
    W, X, Y = data
    stats = make_stats(X, Y)
    with pytest.raises(ValueError, match="rank must be"):
        lowrank_solve(W.float(), stats, WSPEC, rank=min(M, D) + 1)
    with pytest.raises(ValueError, match="empty"):
        lowrank_solve(W.float(), LowRankStats(), WSPEC, rank=2)
    with pytest.raises(ValueError, match="match the statistics"):
        lowrank_solve(W[:, :10].float(), stats, WSPEC, rank=2)


def test_worse_w_step_is_rejected(data, monkeypatch):
    """A W-step that raises the objective keeps the previous (W^, U, V) and stops."""
    import qtool.algorithms.lowrank as lowrank

    W, X, Y = data
    stats = make_stats(X, Y)
    calls = []

    def flaky_gptq(target, H, spec, **kwargs):
        res = gptq_quantize(target, H, spec, **kwargs)
        calls.append(res)
        if len(calls) == 2:  # second W-step: ruin the weight
            res.weight = res.weight + 1.0
        return res

    monkeypatch.setattr(lowrank, "gptq_quantize", flaky_gptq)
    res = lowrank_solve(W.float(), stats, WSPEC, rank=4, iterations=3)
    assert len(calls) == 2 and len(res.objective) == 2
    assert res.objective[1] <= res.objective[0]
    assert torch.equal(res.weight, calls[0].weight)
    ref = explicit(W, res.weight, res.U, res.V, X.float().double(), Y.float().double())
    assert res.objective[-1] == pytest.approx(ref, rel=1e-5)
