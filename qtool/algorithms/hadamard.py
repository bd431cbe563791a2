"""Hadamard matrices of many orders, built in code, and a fast Hadamard transform.

Convention used by every function here. For ``n = p * m`` with ``p = 2^a`` the largest power of
two for which a base matrix of order ``m`` can be built::

    H_n = kron(B_m, S_p)        row index i = i_m * p + i_p

``S_p`` is the Sylvester matrix in natural order (``S_p[i, j] = (-1)^popcount(i & j)``) and
``B_m`` a +-1 matrix with ``B_m @ B_m.T == m I`` (absent when ``m == 1``). The fast transform
reshapes the last dim to ``(m, p)``, runs an O(p log p) butterfly over the contiguous ``p`` axis
and then a dense ``m x m`` matmul, which equals ``x @ H_n.T`` exactly in exact arithmetic.

Base orders ``m``: Paley I (``q + 1``, prime power ``q = 3 mod 4``), Paley II (``2(q + 1)``,
``q = 1 mod 4``) and Goethals-Seidel (``4t``, ``t`` odd) from four circulants whose first rows
are constant on the orbits of a cyclic multiplier group, found by a small deterministic search
(this gives 156 = 4*39 and 172 = 4*43, which no Paley construction reaches). Everything is
deterministic: an order always yields the same matrix, so online rotations recomputed at load time
match the weights they were fused into. Changing a construction here changes those matrices.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers

import torch

logger = logging.getLogger(__name__)

_GS_MAX_T = 201  # Goethals-Seidel search only for base orders 4t with odd t up to this
_GS_MAX_ORBITS = 11  # multiplier groups with more orbits make the search too slow / too big
ORTHOGONAL_KINDS = ("hadamard", "random_orthogonal")


# ----------------------------------------------------------------------------- finite fields
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q == p**k and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest, k = rest // p, k + 1
    return (p, k) if rest == 1 else None


def _powers_of_x(coeffs: list[int], p: int) -> list[int] | None:
    """Codes of x^0 .. x^(q-2) in GF(p)[x]/f, f = x^k + sum coeffs[i] x^i; None unless x is primitive.

    An element is coded as the integer whose base-p digits are its polynomial coefficients.
    """
    k = len(coeffs)
    q = p**k
    one = [1] + [0] * (k - 1)
    v, codes = one, []
    for step in range(q - 1):
        if step and v == one:
            return None  # x has order < q - 1: f is not primitive
        codes.append(sum(c * p**i for i, c in enumerate(v)))
        lead = v[-1]
        v = [((v[i - 1] if i else 0) - lead * coeffs[i]) % p for i in range(k)]
    return codes if v == one else None


@functools.lru_cache(maxsize=64)
def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) float64 Jacobsthal matrix Q[i, j] = chi(x_j - x_i) over GF(q), chi the quadratic character."""
    pk = _prime_power(q)
    if pk is None:
        raise ValueError(f"GF({q}) does not exist: {q} is not a prime power")
    p, k = pk
    codes = None
    for code in range(1, p**k):  # monic f with nonzero constant term, in a fixed order
        coeffs = [(code // p**i) % p for i in range(k)]
        if coeffs[0] and (codes := _powers_of_x(coeffs, p)) is not None:
            break
    assert codes is not None, f"no primitive polynomial found for GF({q})"
    chi = torch.zeros(q, dtype=torch.float64)
    logs = torch.tensor(codes)
    chi[logs[0::2]] = 1.0  # even powers of a primitive element are the nonzero squares
    chi[logs[1::2]] = -1.0
    elems = torch.arange(q)
    diff = torch.zeros(q, q, dtype=torch.long)
    for i in range(k):
        digit = (elems // p**i) % p
        diff += ((digit[None, :] - digit[:, None]) % p) * p**i
    return chi[diff]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 (q = 3 mod 4): [[1, 1^T], [-1, Q + I]]."""
    h = torch.ones(q + 1, q + 1, dtype=torch.float64)
    h[1:, 0] = -1.0
    h[1:, 1:] = _jacobsthal(q) + torch.eye(q, dtype=torch.float64)
    return h


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) (q = 1 mod 4): C (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


# ----------------------------------------------------------------------------- Goethals-Seidel
def _circulant(row: torch.Tensor) -> torch.Tensor:
    """C[i, j] = row[(j - i) mod t]."""
    t = row.numel()
    idx = torch.arange(t)
    return row[(idx[None, :] - idx[:, None]) % t]


def _multiplier_orbits(t: int, group: tuple[int, ...]) -> list[list[int]]:
    """Orbits of Z_t under multiplication by ``group``; the first one is [0]."""
    seen: set[int] = set()
    orbits = []
    for x in range(t):
        if x not in seen:
            orbit = sorted({x * g % t for g in group})
            seen.update(orbit)
            orbits.append(orbit)
    return orbits


def _gs_quadruple(t: int, orbits: list[list[int]]) -> list[torch.Tensor] | None:
    """Four +-1 rows (length t), constant on ``orbits``, whose periodic autocorrelations sum to 0."""
    n_free = len(orbits) - 1  # the sign on orbit [0] is fixed to +1 (negating a row changes nothing)
    patterns = torch.arange(1 << n_free)
    signs = ((patterns[:, None] >> torch.arange(n_free)) & 1).to(torch.float64) * 2 - 1
    signs = torch.cat([torch.ones(len(patterns), 1, dtype=torch.float64), signs], 1)
    owner = torch.empty(t, dtype=torch.long)
    for idx, orbit in enumerate(orbits):
        owner[orbit] = idx
    rows = signs[:, owner]
    rows = rows[(torch.fft.fft(rows).abs() ** 2 <= 4 * t + 1e-6).all(1)]  # spectrum bound: necessary
    if len(rows) == 0:
        return None
    # periodic autocorrelation is constant on orbits of shifts, so one shift per orbit suffices
    paf = torch.stack([(rows * rows.roll(-o[0], 1)).sum(1) for o in orbits[1:]], 1).round().long()
    i, j = torch.triu_indices(len(rows), len(rows))
    key = paf[i] + paf[j]
    uniq, inverse = torch.unique(torch.cat([key, -key]), dim=0, return_inverse=True)
    n_pairs = len(key)
    first = torch.full((len(uniq),), n_pairs, dtype=torch.long)
    first.scatter_reduce_(0, inverse[:n_pairs], torch.arange(n_pairs), reduce="amin")
    partner = first[inverse[n_pairs:]]  # smallest pair whose key is minus this pair's key
    hits = (partner < n_pairs).nonzero().flatten()
    if len(hits) == 0:
        return None
    a, b = int(hits[0]), int(partner[hits[0]])
    return [rows[i[a]], rows[j[a]], rows[i[b]], rows[j[b]]]


@functools.lru_cache(maxsize=64)
def _goethals_seidel(t: int) -> torch.Tensor | None:
    """Order 4t (t odd) via the Goethals-Seidel array, or None when the bounded search fails."""
    if t % 2 == 0 or t < 3 or t > _GS_MAX_T:
        return None
    groups = set()
    for g in range(1, t):
        if math.gcd(g, t) == 1:
            groups.add(tuple(sorted({pow(g, e, t) for e in range(t)})))
    candidates = sorted((len(_multiplier_orbits(t, g)), g) for g in groups)
    for n_orbits, group in candidates:
        if n_orbits > _GS_MAX_ORBITS:
            break
        quad = _gs_quadruple(t, _multiplier_orbits(t, group))
        if quad is None:
            continue
        a, b, c, d = (_circulant(r) for r in quad)
        h = torch.cat(
            [
                torch.cat([a, b.flip(1), c.flip(1), d.flip(1)], 1),
                torch.cat([-b.flip(1), a, d.T.flip(1), -c.T.flip(1)], 1),
                torch.cat([-c.flip(1), -d.T.flip(1), a, b.T.flip(1)], 1),
                torch.cat([-d.flip(1), c.T.flip(1), -b.T.flip(1), a], 1),
            ],
            0,
        )
        assert torch.equal(h @ h.T, 4 * t * torch.eye(4 * t, dtype=torch.float64)), "GS array broken"
        return h
    return None


# ----------------------------------------------------------------------------- orders
@functools.lru_cache(maxsize=256)
def _base_matrix(m: int) -> torch.Tensor | None:
    """(m, m) float64 +-1 base matrix with B @ B.T == m I (m a multiple of 4), or None. Do not mutate."""
    if m % 4:
        return None
    if (m - 1) % 4 == 3 and _prime_power(m - 1):
        logger.debug("Hadamard base order %d: Paley I, q=%d", m, m - 1)
        return _paley1(m - 1)
    if (m // 2 - 1) % 4 == 1 and _prime_power(m // 2 - 1):
        logger.debug("Hadamard base order %d: Paley II, q=%d", m, m // 2 - 1)
        return _paley2(m // 2 - 1)
    h = _goethals_seidel(m // 4) if (m // 4) % 2 == 1 else None
    logger.debug("Hadamard base order %d: Goethals-Seidel %s", m, "found" if h is not None else "not found")
    return h


@functools.lru_cache(maxsize=1024)
def _split(n: int) -> tuple[int, int] | None:
    """(p, m) with n == p * m, p the largest power of two leaving a constructible base order m."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"Hadamard order must be a positive int, got {n!r}")
    n = int(n)
    odd, a = n, 0
    while odd % 2 == 0:
        odd, a = odd // 2, a + 1
    if odd == 1:
        return n, 1
    for j in range(2, a + 1):
        if _base_matrix(odd << j) is not None:
            return 1 << (a - j), odd << j
    return None


def _sylvester(p: int) -> torch.Tensor:
    """(p, p) float64 Sylvester matrix, natural order: S[i, j] = (-1)^popcount(i & j)."""
    idx = torch.arange(p)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.float64)


def hadamard_factors(n: int) -> tuple[int, torch.Tensor | None] | None:
    """``(p, B)`` with ``H_n = kron(B, S_p)``: p a power of two, B the (m, m) float64 +-1 base
    (None when m == 1). None when no construction of order n is known (e.g. any odd n > 1)."""
    split = _split(n)
    if split is None:
        return None
    p, m = split
    return p, (None if m == 1 else _base_matrix(m).clone())


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
    """Dense (n, n) unnormalized +-1 Hadamard matrix ``kron(B_m, S_p)``, or None if none is known."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    p, base = factors
    h = _sylvester(p)
    return (h if base is None else torch.kron(base, h)).to(dtype)


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` exists (cheap after the first call for that order)."""
    return _split(n) is not None


# ----------------------------------------------------------------------------- fast transform
def _no_order_error(n: int) -> ValueError:
    return ValueError(
        f"no Hadamard matrix of order {n} is known to qtool (it builds 2^a * m with m from Paley I/II "
        f"or Goethals-Seidel; odd orders > 1 have none): use random_orthogonal({n}, seed) or "
        f"orthogonal_matrix({n}, 'random_orthogonal', seed) instead, or a dimension that has one"
    )


@functools.lru_cache(maxsize=64)
def _scaled_base(m: int, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """scale * B_m, scaled in float64, then cast and moved once per (dtype, device). Do not mutate."""
    return (_base_matrix(m) * scale).to(device=device, dtype=dtype)


def _transform(x: torch.Tensor, p: int, m: int, scale: float) -> torch.Tensor:
    """x (..., m * p) float32/64 -> x @ (scale * kron(B_m, S_p)).T in x's dtype."""
    lead = x.shape[:-1]
    y = x.reshape(*lead, m, p)
    own = p > 1 and not (torch.is_grad_enabled() and x.requires_grad)
    if own:
        # butterflies between two buffers of x's size, written in place: the same sums as the plain
        # branch below at every stage, without three new tensors per stage (a down_proj input of
        # 8 x 512 x 1536 float32: 9 stages of 25 MB allocations), and 2.3x faster
        bufs = (torch.empty(y.shape, dtype=y.dtype, device=y.device), None)
        h, k = 1, 0
        while h < p:  # butterfly on bit log2(h) of the p index
            if bufs[k] is None:
                bufs = (bufs[0], torch.empty_like(bufs[0]))
            src = y.reshape(*lead, m, p // (2 * h), 2, h)
            dst = bufs[k].view(*lead, m, p // (2 * h), 2, h)
            torch.add(src[..., 0, :], src[..., 1, :], out=dst[..., 0, :])
            torch.sub(src[..., 0, :], src[..., 1, :], out=dst[..., 1, :])
            y, k, h = bufs[k], 1 - k, h * 2
        y = y.view(*lead, m, p)
    else:  # differentiable (training through an online rotation), or p == 1: new tensors
        h = 1
        while h < p:
            y = y.reshape(*lead, m, p // (2 * h), 2, h)
            lo, hi = y[..., 0, :], y[..., 1, :]
            y = torch.stack((lo + hi, lo - hi), dim=-2)
            h *= 2
        y = y.reshape(*lead, m, p)
    if m > 1:
        y = torch.matmul(_scaled_base(m, scale, x.dtype, x.device), y)
    elif scale != 1.0:
        y = y.mul_(scale) if own else y * scale  # y is this function's own buffer when own
    return y.reshape(x.shape)


def fast_hadamard_transform(x: torch.Tensor, n: int | None = None, normalize: bool = True) -> torch.Tensor:
    """``x @ H_n.T`` (times ``1/sqrt(n)`` when normalize) over the last dim, in O(n log n) for 2^a.

    x: (..., d) floating, d == n or a multiple of n (then each consecutive block of n entries is
    transformed, i.e. ``x @ kron(I, H_n).T``). n defaults to d. float32/float64 compute in their
    dtype; bf16/fp16 compute in float32 and are cast back. Returns a tensor shaped like x.
    """
    if not x.is_floating_point():
        raise ValueError(f"fast_hadamard_transform needs a floating-point tensor, got {x.dtype}")
    d = x.shape[-1]
    n = d if n is None else n
    if n < 1 or d % n:
        raise ValueError(f"order n={n} must be positive and divide the last dim {d}")
    split = _split(n)
    if split is None:
        raise _no_order_error(n)
    p, m = split
    xc = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    y = _transform(xc.reshape(*x.shape[:-1], d // n, n), p, m, 1 / math.sqrt(n) if normalize else 1.0)
    return y.reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------- random rotations
def random_signs(n: int, seed: int) -> torch.Tensor:
    """(n,) float64 vector of +-1 drawn from a torch.Generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) Haar-random orthogonal matrix: QR of a seeded float64 Gaussian, R's diagonal made positive."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype).contiguous()


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) orthogonal ``Q = diag(s) @ H_n.T / sqrt(n)``, s = ``random_signs(n, seed)``.

    So ``x @ Q == fast_hadamard_transform(x * s)``. Falls back (with a warning) to
    ``random_orthogonal(n, seed)`` when no Hadamard matrix of order n is known.
    """
    h = hadamard_matrix(n)
    if h is None:
        logger.warning("no Hadamard matrix of order %d: using a seeded random orthogonal matrix instead", n)
        return random_orthogonal(n, seed, dtype)
    return (random_signs(n, seed)[:, None] * h.T / math.sqrt(n)).to(dtype).contiguous()


def orthogonal_matrix(n: int, kind: str, seed: int) -> torch.Tensor:
    """(n, n) float64 orthogonal matrix of ``kind`` in ORTHOGONAL_KINDS (see the functions above)."""
    if kind == "hadamard":
        return random_hadamard_matrix(n, seed)
    if kind == "random_orthogonal":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown orthogonal matrix kind {kind!r}: use one of {', '.join(ORTHOGONAL_KINDS)}")
