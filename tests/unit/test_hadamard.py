"""Hadamard constructions, the fast transform, random rotations and the online rotations (CPU, fast)."""

import logging
import math

import pytest
import torch

from qtool.algorithms.hadamard import (
    fast_hadamard_transform,
    hadamard_factors,
    hadamard_matrix,
    orthogonal_matrix,
    random_hadamard_matrix,
    random_orthogonal,
    random_signs,
)
from qtool.models.online import OnlineRotation

LISTED = [
    1,
    2,
    4,
    12,
    20,
    28,
    36,
    40,
    52,
    60,
    64,
    108,
    140,
    148,
    156,
    172,
    576,
    896,
    1536,
    2560,
    3584,
    4096,
    4864,
    5120,
    6144,
    8192,
    11008,
    13824,
    14336,
    18944,
]
# largest power of two (the butterfly part) expected for some real model sizes
EXPECTED_POW2 = {
    576: 16,
    896: 32,
    1536: 128,
    3584: 128,
    4864: 64,
    6144: 512,
    11008: 64,
    13824: 128,
    14336: 512,
    18944: 128,
    172: 1,
    156: 1,
    40: 2,
}
F64 = torch.float64


def sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < p:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64), h)
    return h


def dense_reference(x: torch.Tensor, n: int, normalize: bool = True) -> torch.Tensor:
    h = hadamard_matrix(n)
    y = x.to(F64) @ h.T
    return y / math.sqrt(n) if normalize else y


@pytest.mark.parametrize("n", LISTED)
def test_listed_orders_are_hadamard(n):
    factors = hadamard_factors(n)
    assert factors is not None, f"order {n} should be constructible"
    p, base = factors
    m = n // p
    assert p & (p - 1) == 0 and p * m == n
    if n in EXPECTED_POW2:
        assert p == EXPECTED_POW2[n]
    if base is None:
        assert m == 1
    else:
        assert base.shape == (m, m) and bool((base.abs() == 1).all())
        assert torch.equal(base @ base.T, m * torch.eye(m, dtype=F64))
    if n <= 2048:
        h = hadamard_matrix(n)
        assert h.shape == (n, n) and bool((h.abs() == 1).all())
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=F64))
        expected = sylvester(p) if base is None else torch.kron(base, sylvester(p))
        assert torch.equal(h, expected)
    else:  # too big for a dense n x n check: compare with the factored product B X S^T
        x = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(n))
        xs = x.reshape(3, m, p) @ sylvester(p).T
        ref = xs if base is None else base @ xs
        got = fast_hadamard_transform(x, normalize=False)
        torch.testing.assert_close(got, ref.reshape(3, n), rtol=0, atol=1e-9)
        torch.testing.assert_close(got.norm(dim=-1), math.sqrt(n) * x.norm(dim=-1), rtol=1e-12, atol=0)


def test_dtype_argument_and_cache_isolation():
    h = hadamard_matrix(12, dtype=torch.float32)
    assert h.dtype == torch.float32
    h.zero_()  # a caller mutating its copy must not corrupt the cached base
    _, base = hadamard_factors(12)
    base.zero_()
    assert torch.equal(hadamard_matrix(12) @ hadamard_matrix(12).T, 12 * torch.eye(12, dtype=F64))


@pytest.mark.parametrize("n", [9, 3, 5, 6, 10, 18, 7 * 128 + 2])
def test_orders_without_hadamard(n):
    assert hadamard_matrix(n) is None
    assert hadamard_factors(n) is None
    with pytest.raises(ValueError, match="random_orthogonal"):
        fast_hadamard_transform(torch.randn(2, n), n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divide"):
        fast_hadamard_transform(torch.randn(2, 12), 8)
    with pytest.raises(ValueError, match="floating"):
        fast_hadamard_transform(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="positive"):
        hadamard_matrix(0)


@pytest.mark.parametrize("n", [1, 2, 12, 40, 64, 156, 172, 576, 1536])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (0, 4)])
def test_fast_transform_matches_dense(n, lead):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*lead, n, dtype=F64, generator=gen)
    ref = dense_reference(x, n)
    out = fast_hadamard_transform(x)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        fast_hadamard_transform(x, normalize=False), dense_reference(x, n, False), rtol=0, atol=1e-9
    )
    out32 = fast_hadamard_transform(x.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.to(F64), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 172, 1536])
def test_fast_transform_half_precision(dtype, n):
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = fast_hadamard_transform(x)
    assert out.dtype == dtype
    ref = dense_reference(x, n)  # exact transform of the rounded input
    err = (out.to(F64) - ref).abs().max()
    rounding = (ref.to(dtype).to(F64) - ref).abs().max()  # best possible in this dtype
    assert err <= 2 * rounding + 1e-5


def test_blockwise_transform():
    x = torch.randn(3, 5 * 12, dtype=F64)
    block = torch.kron(torch.eye(5, dtype=F64), hadamard_matrix(12) / math.sqrt(12))
    torch.testing.assert_close(fast_hadamard_transform(x, 12), x @ block.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [64, 576, 172])
def test_random_hadamard_matrix(n):
    q = random_hadamard_matrix(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_hadamard_matrix(n, seed=3))
    assert not torch.equal(q, random_hadamard_matrix(n, seed=4))
    x = torch.randn(2, n, dtype=F64)
    torch.testing.assert_close(x @ q, fast_hadamard_transform(x * random_signs(n, 3)), rtol=0, atol=1e-12)
    assert random_hadamard_matrix(n, 3, dtype=torch.float32).dtype == torch.float32


def test_random_hadamard_fallback_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="qtool"):
        q = random_hadamard_matrix(9, seed=1)
    assert "no Hadamard matrix of order 9" in caplog.text
    assert torch.equal(q, random_orthogonal(9, seed=1))


def test_random_orthogonal():
    q = random_orthogonal(50, seed=7)
    torch.testing.assert_close(q @ q.T, torch.eye(50, dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(50, seed=7))
    assert not torch.equal(q, random_orthogonal(50, seed=8))
    assert random_orthogonal(5, 0, dtype=torch.float32).dtype == torch.float32


def test_orthogonal_matrix_kinds():
    assert torch.equal(orthogonal_matrix(12, "hadamard", 0), random_hadamard_matrix(12, 0))
    assert torch.equal(orthogonal_matrix(12, "random_orthogonal", 0), random_orthogonal(12, 0))
    with pytest.raises(ValueError, match="hadamard, random_orthogonal"):
        orthogonal_matrix(12, "givens", 0)


def _normed(k: int) -> torch.Tensor:
    return hadamard_matrix(k) / math.sqrt(k)


@pytest.mark.parametrize(
    "n, heads, expected, fallback",
    [
        (172, None, lambda: _normed(172), False),
        (1536, None, lambda: _normed(1536), False),
        (12 * 64, 12, lambda: torch.kron(_normed(12), torch.eye(64, dtype=F64)), False),
        (9 * 64, 9, lambda: torch.kron(random_orthogonal(9, 5), torch.eye(64, dtype=F64)), True),
    ],
)
def test_online_rotation_matches_kron(n, heads, expected, fallback):
    """forward(x) == x @ M with M = H^T/sqrt(n) (or the head-mixing kron); dense() agrees."""
    mod = OnlineRotation(n, "hadamard", heads=heads, seed=5)
    m = expected().T
    assert mod.fallback == fallback
    torch.testing.assert_close(mod.dense(), m, rtol=0, atol=1e-6 if fallback else 1e-12)
    x = torch.randn(2, 3, n, dtype=F64)
    torch.testing.assert_close(mod(x), x @ mod.dense(), rtol=0, atol=1e-10)
    xb = x.to(torch.bfloat16)
    out = mod(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.to(F64), xb.to(F64) @ m, rtol=2**-7, atol=1e-2)


def test_online_rotation_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        OnlineRotation(8, "diagonal")


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("kind", ["dense", "hadamard", "heads"])
def test_map_rows_slices_equal_one_call(monkeypatch, rows, kind):
    """map_rows computes a weight transform a slice at a time: bit for bit what one float64 call on
    the whole weight gives (the rotation step's values, hence every checkpoint, do not change)."""
    import qtool.models.online as online

    monkeypatch.setattr(online, "SLICE_BYTES", 7 * 96 * 8)  # 7 rows (columns) a slice, a short last one
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 96, generator=g) if rows else torch.randn(96, 100, generator=g)  # fn maps 96
    if kind == "dense":
        q = random_orthogonal(96, 3)
        fn = lambda x: x @ q  # noqa: E731
    elif kind == "hadamard":
        fn = OnlineRotation(96, "hadamard")
    else:
        fn = OnlineRotation(96, "hadamard", heads=3)
    whole = w.double()
    want = (fn(whole) if rows else fn(whole.t()).t()).float()
    got = online.map_rows(w, fn, "cpu", rows)
    assert got.dtype == w.dtype and got.shape == w.shape and got.data_ptr() != w.data_ptr()
    assert torch.equal(got, want)


def test_fold_head_norm_unties_without_changing_the_embedding():
    """Folding the final norm into a tied lm_head gives lm_head its own weight; the embedding keeps its
    values (and the fold equals W diag(g) computed in float64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.steps.rotate import fold_head_norm

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.model.norm.weight.data.uniform_(0.5, 1.5)
    emb = model.model.embed_tokens.weight.data.clone()
    g = model.model.norm.weight.data.clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fold_head_norm(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight.data, emb)
    assert torch.equal(model.lm_head.weight.data, (emb.double() * g.double()).float())
    assert torch.equal(model.model.norm.weight.data, torch.ones_like(g))


def _butterflies_reference(x: torch.Tensor, n: int) -> torch.Tensor:
    """The transform written plainly: a new tensor per butterfly stage, then the base matrix."""
    from qtool.algorithms.hadamard import _scaled_base, _split

    p, m = _split(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, x.shape[-1] // n, m, p)
    h = 1
    while h < p:
        y = y.reshape(*lead, x.shape[-1] // n, m, p // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    y = y.reshape(*lead, x.shape[-1] // n, m, p)
    scale = 1 / math.sqrt(n)
    y = torch.matmul(_scaled_base(m, scale, x.dtype, x.device), y) if m > 1 else y * scale
    return y.reshape(x.shape)


@pytest.mark.parametrize(
    "n,shape", [(1536, (2, 16, 1536)), (576, (3, 576)), (64, (2, 9, 128)), (12, (5, 12)), (1, (4, 1))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_transform_bitwise_against_plain_butterflies(n, shape, dtype):
    """The in-place butterflies between two buffers add and subtract the same numbers in the same order
    as the plain version (every checkpoint of a rotated model depends on these bits); x is untouched."""
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(n))
    before = x.clone()
    got = fast_hadamard_transform(x, n)
    assert torch.equal(x, before)
    assert torch.equal(got, _butterflies_reference(x, n))
    t = x.transpose(0, -1).contiguous().transpose(0, -1)  # a non-contiguous input
    assert torch.equal(fast_hadamard_transform(t, n), got)


def test_fast_transform_differentiable_path_same_bits():
    """With autograd on (training through an online rotation) the transform builds new tensors; its
    values are the in-place path's, and the gradient is the transform of the upstream gradient."""
    x = torch.randn(4, 8, 1536, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = fast_hadamard_transform(x)
    xg = x.clone().requires_grad_()
    y = fast_hadamard_transform(xg)
    assert torch.equal(y.detach(), want)
    g = torch.randn_like(y)
    y.backward(g)
    # x @ M with M orthogonal and symmetric for this order's construction or not: the gradient is g @ M^T
    m = OnlineRotation(1536, "hadamard").dense().float()
    torch.testing.assert_close(xg.grad, g @ m.T, rtol=0, atol=1e-4)
