"""Low-rank correction: statistics, closed-form steps and the alternating solver."""

from __future__ import annotations

import pytest
import torch

from qtool.algorithms.gptq import gptq_quantize
from qtool.algorithms.lowrank import (
    LowRankStats,
    cross_shrink_factor,
    lowrank_objective,
    lowrank_solve,
    rank_for_fraction,
    relaxed_optimum,
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


@pytest.mark.parametrize("init", ["zero", "closed_form"])
def test_objective_never_increases(data, init):
    W, X, Y = data
    stats = make_stats(X, Y)
    res = lowrank_solve(W.float(), stats, WSPEC, rank=6, iterations=3, init=init)
    obj = res.objective
    assert 2 <= len(obj) <= 6
    assert all(b <= a for a, b in zip(obj, obj[1:], strict=False))
    no_correction = lowrank_solve(W.float(), stats, WSPEC, rank=0).objective[0]
    if init == "zero":
        assert obj[0] == no_correction  # from U = V = 0 the first W-step is the rank-0 solve
        assert obj[-1] < 0.9 * obj[0]  # the correction helps
    else:
        assert obj[-1] < 0.9 * no_correction  # the correction helps
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
    res = lowrank_solve(W.float(), stats, WSPEC, rank=0, cross_shrink=1.0)
    zeros_u, zeros_v = torch.zeros(M, 0), torch.zeros(D, 0)
    target = w_target(W.float(), zeros_u, zeros_v, stats, 0.01).float()
    ref = gptq_quantize(target, H.float(), WSPEC, damp=0.01)
    assert torch.equal(res.codes, ref.codes) and torch.equal(res.weight, ref.weight)
    assert res.U.shape == (M, 0) and res.V.shape == (D, 0)

    # the default shrinks the cross term by the data-driven factor
    s = cross_shrink_factor(W.float(), zeros_u, zeros_v, stats, 0.01)
    assert 0.0 < s < 1.0
    res = lowrank_solve(W.float(), stats, WSPEC, rank=0)
    assert res.cross_shrink == [s]
    target = w_target(W.float(), zeros_u, zeros_v, stats, 0.01, shrink=s).float()
    ref = gptq_quantize(target, H.float(), WSPEC, damp=0.01)
    assert torch.equal(res.codes, ref.codes) and torch.equal(res.weight, ref.weight)

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
    with pytest.raises(ValueError, match="init must be"):
        lowrank_solve(W.float(), stats, WSPEC, rank=2, init="random")
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ValueError, match="cross_shrink must be"):
            lowrank_solve(W.float(), stats, WSPEC, rank=2, cross_shrink=bad)


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


# --- closed-form start and cross-term guard --------------------------------------------------

ASPEC = QSpec(4, True, "token", clip_ratio=0.9)


def heavy_layer(m, d, n, n_test, seed, boost=12.0, n_boost=4, channels=True):
    """A rotated heavy-tailed layer: ``W`` and calibration / held-out ``(X, Q_a(X))``, float64.

    Student-t (4 dof) latents with a decaying spectrum, log-normal token scales, ``n_boost``
    outlier channels (``channels``) or dominant directions scaled by ``boost``, a random rotation,
    4-bit per-token activations (clip 0.9), as a rotated LLM layer's input looks.
    """
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    mix = mix * (1.0 + torch.arange(d, dtype=torch.float64)) ** -0.5
    if channels:
        mix[:n_boost] *= boost
    else:
        mix[:, :n_boost] *= boost
    rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    W = torch.randn(m, d, generator=g, dtype=torch.float64) / d**0.5

    def draw(k):
        chi2 = torch.randn(4, d, k, generator=g, dtype=torch.float64).pow(2).mean(0)
        z = torch.randn(d, k, generator=g, dtype=torch.float64) / chi2.sqrt()
        scale = torch.exp(0.5 * torch.randn(1, k, generator=g, dtype=torch.float64))
        x = (rot @ (mix @ z) * scale).float()
        return x.double(), fake_quant(x.T, ASPEC).T.double()

    X, Y = draw(n)
    Xt, Yt = draw(n_test)
    return W, X, Y, Xt, Yt


def heldout(W, res, Xt, Yt):
    """Relative held-out output error ``|W X - W^ Y - U V^T X|^2 / |W X|^2``."""
    err = W @ Xt - res.weight.double() @ Yt - res.U.double() @ (res.V.double().T @ Xt)
    return float(err.pow(2).sum() / (W @ Xt).pow(2).sum())


def relaxed_brute_force(W, X, Y, lam, k, starts=4, seed=0):
    """``min`` over continuous ``B`` and rank-``k`` ``U V^T`` by L-BFGS on ``(U, V)``.

    Works on explicit data augmented with ``sqrt(lam) I`` columns (the damped problem); the best
    ``B`` for given ``U, V`` is eliminated by projecting out the row space of ``Y_aug`` (QR).
    """
    d = X.shape[0]
    Xa = torch.cat([X, lam**0.5 * torch.eye(d, dtype=torch.float64)], 1)
    Ya = torch.cat([Y, lam**0.5 * torch.eye(d, dtype=torch.float64)], 1)
    Q = torch.linalg.qr(Ya.T)[0]
    R = Xa - (Xa @ Q) @ Q.T  # what no linear map of Y_aug explains

    def f(U, V):
        return ((W - U @ V.T) @ R).pow(2).sum()

    g = torch.Generator().manual_seed(seed)
    best = float("inf")
    for _ in range(starts):
        U = torch.randn(W.shape[0], k, generator=g, dtype=torch.float64).requires_grad_()
        V = (0.1 * torch.randn(d, k, generator=g, dtype=torch.float64)).requires_grad_()
        opt = torch.optim.LBFGS(
            [U, V], max_iter=3000, tolerance_grad=1e-13, tolerance_change=1e-16, line_search_fn="strong_wolfe"
        )

        def closure(U=U, V=V, opt=opt):
            opt.zero_grad()
            loss = f(U, V)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        best = min(best, float(f(U, V).detach()))
    return best, f


@pytest.mark.parametrize(("n", "damp"), [(60, 0.0), (60, 0.01), (8, 0.01)])
def test_closed_form_is_relaxed_optimum(n, damp, caplog):
    """The closed form attains the brute-force minimum of the relaxed (continuous ``W^``) problem.

    ``damp=0`` is the plain problem ``min |W X - W^ Q(X) - U V^T X|^2``; ``n=8 < d`` makes ``K``
    singular (Cholesky fails, eigen-factor fallback with a warning).
    """
    m, d, k = 7, 12, 3
    W, X, Y, _, _ = heavy_layer(m, d, n, 1, seed=4)
    stats = LowRankStats()
    stats.add(X.T, Y.T)  # float64 inputs: the statistics are exact
    lam = damp * float(torch.diag(stats.S_y).mean())
    with caplog.at_level("WARNING", logger="qtool.algorithms.lowrank"):
        U, V = relaxed_optimum(W, stats, k, damp)
    assert ("not positive definite" in caplog.text) == (n < d)
    brute, f = relaxed_brute_force(W, X, Y, lam, k)
    closed = float(f(U, V))
    assert closed <= brute * (1 + 1e-8)  # nothing the optimizer finds is better
    assert brute <= closed * (1 + 1e-6)  # and it converges to the same value
    # the continuous W-step from this start is the problem's best W^
    Xa = torch.cat([X, lam**0.5 * torch.eye(d, dtype=torch.float64)], 1)
    Ya = torch.cat([Y, lam**0.5 * torch.eye(d, dtype=torch.float64)], 1)
    B = w_target(W, U, V, stats, damp)
    assert float(((W - U @ V.T) @ Xa - B @ Ya).pow(2).sum()) == pytest.approx(closed, rel=1e-6)


def test_closed_form_is_the_textbook_formula(data):
    """``U = P_k S_k``, ``V = L^-T Q_k`` with ``L = chol(K)``, ``W L = P S Q^T`` (METHODS.md 6)."""
    W, X, Y = data
    stats = make_stats(X, Y)
    k, damp = 5, 0.01
    lam = damp * float(torch.diag(stats.S_y).mean())
    eye = torch.eye(D, dtype=torch.float64)
    Sx, Sy, Sxy = stats.S_x + lam * eye, stats.S_y + lam * eye, stats.S_xy + lam * eye
    K = Sx - Sxy @ torch.linalg.solve(Sy, Sxy.T)
    L = torch.linalg.cholesky(0.5 * (K + K.T))
    P, S, Qh = torch.linalg.svd(W @ L, full_matrices=False)
    U_ref = P[:, :k] * S[:k]
    V_ref = torch.linalg.solve_triangular(L.T, Qh[:k].T, upper=True)
    U, V = relaxed_optimum(W, stats, k, damp)
    torch.testing.assert_close(U @ V.T, U_ref @ V_ref.T, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(U.norm(dim=0), S[:k], rtol=1e-7, atol=0)
    assert relaxed_optimum(W, stats, 0, damp)[0].shape == (M, 0)
    same = make_stats(X, X)  # Y == X: K == 0, every correction is optimal; start from zero
    U, V = relaxed_optimum(W, same, k, damp)
    assert not U.any() and not V.any()


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_closed_form_start_beats_zero_start(fraction):
    """After one full iteration the closed-form start is below the zero start (calibration and held out)."""
    m, d = 32, 64
    k = rank_for_fraction(m, d, fraction)
    for seed in (0, 1):
        W, X, Y, Xt, Yt = heavy_layer(m, d, 20 * d, 16 * d, seed)
        stats = LowRankStats()
        stats.add(X.T.float(), Y.T.float())
        zero = lowrank_solve(W.float(), stats, WSPEC, k, init="zero")
        closed = lowrank_solve(W.float(), stats, WSPEC, k, init="closed_form")
        assert len(zero.objective) == len(closed.objective) == 2
        assert closed.objective[1] < 0.9 * zero.objective[1]
        assert heldout(W, closed, Xt, Yt) < heldout(W, zero, Xt, Yt)


def test_zero_start_without_shrink_is_the_previous_solver(data):
    """``init="zero", cross_shrink=1`` runs exactly the alternation of the public half-steps."""
    W, X, Y = data
    stats = make_stats(X, Y)
    k, damp = 6, 0.01
    res = lowrank_solve(W.float(), stats, WSPEC, k, iterations=3, init="zero", cross_shrink=1.0)
    H = ((2.0 / stats.n) * stats.S_y).float()
    U, V = torch.zeros(M, k, dtype=torch.float64), torch.zeros(D, k, dtype=torch.float64)
    best, objective = None, []
    for _ in range(3):
        q = gptq_quantize(w_target(W.float(), U, V, stats, damp).float(), H, WSPEC, damp=damp)
        obj = lowrank_objective(W.float(), q.weight, U, V, stats)
        if objective and obj > objective[-1]:
            break
        objective.append(obj)
        best = (q, U, V)
        U2, V2 = uv_step(W.float(), q.weight, stats, k, damp)
        obj = lowrank_objective(W.float(), q.weight, U2, V2, stats)
        if obj <= objective[-1]:
            U, V = U2, V2
            best = (q, U, V)
        objective.append(min(obj, objective[-1]))
    assert res.objective == objective and res.cross_shrink == [1.0] * ((len(objective) + 1) // 2)
    assert torch.equal(res.codes, best[0].codes) and torch.equal(res.weight, best[0].weight)
    assert torch.equal(res.U, best[1].float()) and torch.equal(res.V, best[2].float())


def test_cross_shrink_guards_few_tokens(caplog, monkeypatch):
    """With few tokens the shrunk cross term is not worse on held-out tokens than the full one.

    Few tokens (3 x width) and an overfitting cross term: ``auto`` must not be worse held out,
    at rank 0 and with a correction; a warning says so. A case where the cross term is genuinely
    predictive keeps most of its gain.
    """
    import qtool.algorithms.lowrank as lowrank

    monkeypatch.setattr(lowrank, "_warned_few_tokens", set())
    m, d = 32, 64
    k = rank_for_fraction(m, d, 0.3)
    for seed in (0, 1):
        W, X, Y, Xt, Yt = heavy_layer(m, d, 3 * d, 16 * d, seed)
        stats = LowRankStats()
        stats.add(X.T.float(), Y.T.float())
        for rank in (0, k):
            with caplog.at_level("WARNING", logger="qtool.algorithms.lowrank"):
                auto = lowrank_solve(W.float(), stats, WSPEC, rank)
            full = lowrank_solve(W.float(), stats, WSPEC, rank, cross_shrink=1.0)
            assert 0.0 < auto.cross_shrink[0] < 0.9
            assert heldout(W, auto, Xt, Yt) <= heldout(W, full, Xt, Yt)
    assert caplog.text.count("fewer than 10 x width") == 1  # once per (n, d)

    # two dominant directions: the cross term is worth keeping, and auto keeps (nearly) all of it
    W, X, Y, Xt, Yt = heavy_layer(m, d, 20 * d, 16 * d, 1, boost=10.0, n_boost=2, channels=False)
    stats = LowRankStats()
    stats.add(X.T.float(), Y.T.float())
    errs = {
        s: heldout(W, lowrank_solve(W.float(), stats, WSPEC, 0, cross_shrink=s), Xt, Yt)
        for s in (0.0, 1.0, "auto")
    }
    assert errs[1.0] < 0.8 * errs[0.0]
    assert errs["auto"] < 0.8 * errs[0.0] and errs["auto"] <= 1.05 * errs[1.0]
