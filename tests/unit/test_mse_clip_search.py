"""The coarse-to-fine MSE clip search against the exhaustive one it replaced (issue 16, item 5):
the chosen clips agree within a tolerance, the quantization error it reaches is within 0.2%, and
it is faster."""

from __future__ import annotations

import time

import pytest
import torch

from qtool.quant.quantizer import QSpec, _grouped, grid_params, mse_clip_search


def exhaustive(w, spec, grid=100, max_shrink=0.8, norm=2.4):
    """The search as it was: every ratio of the grid, the best per (row, group)."""
    wg, _ = _grouped(w.float(), spec)
    if spec.granularity == "tensor":
        wg = wg.reshape(1, 1, -1)
    xmin = wg.amin(dim=-1).clamp(max=0)
    xmax = wg.amax(dim=-1).clamp(min=0)
    best_err = torch.full(xmin.shape, float("inf"))
    best = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid) + 1):
        ratio = (1.0 - i / grid) * spec.clip_ratio
        scale, zero = grid_params(xmin * ratio, xmax * ratio, spec)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = (torch.round(wg / s) + z).clamp_(spec.qmin, spec.qmax)
        err = ((q - z) * s - wg).abs_().pow_(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def error_of(w, spec, clip, norm=2.4):
    wg, _ = _grouped(w.float(), spec)
    if spec.granularity == "tensor":
        wg = wg.reshape(1, 1, -1)
    xmin, xmax = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale, zero = grid_params(xmin * clip, xmax * clip, spec)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = (torch.round(wg / s) + z).clamp(spec.qmin, spec.qmax)
    return ((q - z) * s - wg).abs().pow(norm).sum(-1)


def weights():
    g = torch.Generator().manual_seed(0)
    yield "gaussian, row scales", torch.randn(384, 576, generator=g) * torch.rand(384, 1, generator=g) * 2
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(1)
    yield "heavy-tailed", t.sample((192, 1536))
    yield (
        "outlier columns",
        torch.randn(256, 512, generator=g) * (1 + 20 * (torch.rand(512, generator=g) > 0.99)),
    )


SPECS = [
    QSpec(4, True, "group", 64),
    QSpec(4, False, "group", 64),
    QSpec(4, True, "channel"),
    QSpec(3, False, "group", 128),
    QSpec(4, True, "group", 64, clip_ratio=0.9),
    QSpec(4, False, "group", 100, ragged=True),
]


@pytest.mark.parametrize(
    "spec",
    SPECS,
    ids=lambda s: (
        f"w{s.bits}-{'sym' if s.symmetric else 'asym'}-{s.granularity}{s.group_size or ''}-c{s.clip_ratio}"
    ),
)
def test_clips_agree_with_the_exhaustive_search(spec):
    for name, w in weights():
        fast, ref = mse_clip_search(w, spec), exhaustive(w, spec)
        assert fast.shape == ref.shape and fast.dtype == ref.dtype
        same = (fast == ref).float().mean().item()
        assert same >= 0.95, (name, same)
        # every chosen clip is on the exhaustive search's grid
        grid = torch.tensor([(1.0 - i / 100) * spec.clip_ratio for i in range(81)])
        assert torch.isin(fast, grid).all()
        e_fast, e_ref = error_of(w, spec, fast), error_of(w, spec, ref)
        assert (e_fast >= e_ref * (1 - 1e-6)).all()  # the exhaustive one is the optimum
        assert e_fast.sum() <= e_ref.sum() * 1.002, name  # the summed error within 0.2%
        # where a clip differs the group is still far better than not clipping
        assert (e_fast <= error_of(w, spec, torch.full_like(fast, spec.clip_ratio)) * (1 + 1e-6)).all()


def test_small_grids_are_exhaustive():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    spec = QSpec(4, True, "group", 32)
    for grid, shrink in ((4, 0.75), (5, 0.4), (20, 0.1)):  # at most 4 steps: nothing is skipped
        assert torch.equal(
            mse_clip_search(w, spec, grid=grid, max_shrink=shrink), exhaustive(w, spec, grid, shrink)
        )


def test_faster_than_the_exhaustive_search():
    w = torch.randn(768, 576, generator=torch.Generator().manual_seed(4))
    spec = QSpec(4, True, "group", 64)

    def best_of(fn, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn(w, spec)
            times.append(time.perf_counter() - t)
        return min(times)

    slow, fast = best_of(exhaustive), best_of(mse_clip_search)
    assert fast * 2 < slow, (fast, slow)  # measured ~4x with one thread
