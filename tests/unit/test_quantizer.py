"""Quantization primitives: spec validation, grid ranges, error bounds, SQNR, clipping, STE."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from qtool.errors import QtoolError
from qtool.quant.quantizer import (
    QSpec,
    compute_qparams,
    dequantize,
    fake_quant,
    fake_quant_ste,
    mse_clip_search,
    n_groups,
    quantize,
    sqnr_db,
)

BITS = range(2, 9)
GRANULARITIES = ["tensor", "channel", "group", "token"]


def make_spec(bits: int, symmetric: bool, granularity: str, clip: float = 1.0, ragged: bool = False) -> QSpec:
    group = 16 if granularity == "group" else None
    return QSpec(bits, symmetric, granularity, group, clip, ragged)


def per_element(p: torch.Tensor, x: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Independent broadcast of ``[rows, groups]`` params to ``x`` (not the library's helper)."""
    p = p.float()
    if spec.granularity == "tensor":
        return p.reshape(1).expand(x.numel()).reshape(x.shape)
    rows = p.reshape(-1, p.shape[-1])
    if spec.granularity in ("channel", "token"):
        return rows.expand(-1, x.shape[-1]).reshape(x.shape)
    cols = torch.arange(x.shape[-1]) // spec.group_size
    return rows[:, cols].reshape(x.shape)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- QSpec validation -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits must be between 2 and 8"):
        QSpec(bits=bits)


@pytest.mark.parametrize("group_size", [None, 0, -32])
def test_group_needs_positive_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QSpec(4, True, "group", group_size)


@pytest.mark.parametrize("clip", [0.0, -0.5, 1.01])
def test_clip_ratio_range(clip):
    with pytest.raises(ValueError, match=r"clip_ratio must be in \(0, 1\]"):
        QSpec(4, clip_ratio=clip)


def test_unknown_granularity_lists_known():
    with pytest.raises(ValueError, match="tensor, channel, group, token"):
        QSpec(4, True, "row")


@pytest.mark.parametrize("bits", BITS)
def test_qmin_qmax(bits):
    spec = QSpec(bits)
    assert spec.qmin == -(2 ** (bits - 1))
    assert spec.qmax == 2 ** (bits - 1) - 1


# --- grid and error bounds --------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,symmetric,granularity", list(itertools.product(BITS, [True, False], GRANULARITIES))
)
def test_codes_in_range_and_error_within_half_step(bits, symmetric, granularity):
    spec = make_spec(bits, symmetric, granularity)
    x = gaussian(3, 5, 64, seed=bits) * 2 + (0.5 if not symmetric else 0.0)
    if granularity in ("channel", "group"):
        x = x.reshape(15, 64)
    scale, zero = compute_qparams(x, spec)
    rows = 1 if granularity == "tensor" else 15
    assert scale.shape == (rows, n_groups(64, spec))
    assert zero.shape == scale.shape and zero.dtype == torch.int8
    q = quantize(x, scale, zero, spec)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert int(zero.min()) >= spec.qmin and int(zero.max()) <= spec.qmax
    if symmetric:
        assert int(zero.abs().max()) == 0
    dq = dequantize(q, scale, zero, spec)
    s = per_element(scale, x, spec)
    err = (dq - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-5) + 1e-7).all()), float((err / s).max())
    # the whole grid is used: symmetric reaches +-qmax, asymmetric both ends
    if symmetric:
        assert int(q.abs().max()) == spec.qmax and int(q.min()) >= -spec.qmax
    else:
        assert int(q.max()) == spec.qmax and int(q.min()) == spec.qmin


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [0.5, 0.8])
def test_clip_ratio_bounds_error_inside_clip_range(symmetric, clip):
    spec = make_spec(4, symmetric, "channel", clip)
    x = gaussian(32, 256, seed=3)
    scale, zero = compute_qparams(x, spec)
    q = quantize(x, scale, zero, spec)
    dq = dequantize(q, scale, zero, spec)
    lo = x.amin(dim=1, keepdim=True) * clip
    hi = x.amax(dim=1, keepdim=True) * clip
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    inside = (x >= lo) & (x <= hi)
    assert 0.7 < float(inside.float().mean()) < 1.0  # most values are inside, some clipped
    err = (dq - x).abs()
    s = scale.expand_as(x)
    assert bool((err[inside] <= s[inside] / 2 * (1 + 1e-5)).all())
    # outside the clip range values saturate at the grid's ends
    assert bool((q[~inside].abs() >= spec.qmax).all())


def test_sqnr_gaussian_4bit_and_8bit_per_channel():
    w = gaussian(256, 1024, seed=1)
    s4 = sqnr_db(w, fake_quant(w, QSpec(4, True, "channel")))
    s8 = sqnr_db(w, fake_quant(w, QSpec(8, True, "channel")))
    assert s4 > 15.0
    assert s8 > 38.0
    assert s4 < 25.0  # 4 bits cannot be near-lossless: a vacuous quantizer would pass the above


@pytest.mark.parametrize("symmetric", [True, False])
def test_sqnr_grows_about_6db_per_bit(symmetric):
    w = gaussian(64, 512, seed=2)
    sq = [sqnr_db(w, fake_quant(w, QSpec(b, symmetric, "group", 64))) for b in BITS]
    assert sq[1] > sq[0] + 4.5  # 2 -> 3 bits (symmetric 2-bit has only 3 levels)
    for lo, hi in itertools.pairwise(sq[1:]):
        assert 4.5 < hi - lo < 7.5


def test_sqnr_db_known_value():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0, abs=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_asymmetric_grid_reproduced_exactly(bits, granularity):
    spec = make_spec(bits, False, granularity)
    g = torch.Generator().manual_seed(bits)
    rows, width = 12, 64
    groups = n_groups(width, spec)
    q = torch.randint(spec.qmin, spec.qmax + 1, (rows, width), generator=g)
    # every row/group spans the whole grid, so min/max pin the parameters down
    step = width // groups
    q[:, ::step] = spec.qmin
    q[:, 1::step] = spec.qmax
    z = torch.randint(spec.qmin, spec.qmax + 1, (rows, groups), generator=g)
    s = 2.0 ** torch.randint(-8, 2, (rows, groups), generator=g).float()  # exact in float32
    x = (q - per_element(z, q, spec)) * per_element(s, q, spec)
    scale, zero = compute_qparams(x, spec)
    assert torch.equal(scale, s)
    assert torch.equal(zero.long(), z)
    assert torch.equal(quantize(x, scale, zero, spec).long(), q)
    assert torch.equal(fake_quant(x, spec), x)


def test_symmetric_grid_reproduced_exactly():
    spec = QSpec(4, True, "group", 16)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-7, 8, (8, 64), generator=g)
    q[:, ::16] = 7
    s = 2.0 ** torch.randint(-6, 0, (8, 4), generator=g).float()
    x = q * per_element(s, q, spec)
    assert torch.equal(fake_quant(x, spec), x)


def test_fake_quant_keeps_dtype_and_shape():
    x = gaussian(2, 7, 32).to(torch.bfloat16)
    y = fake_quant(x, QSpec(4, True, "token"))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


# --- ragged groups and width checks -------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_ragged_groups_match_quantizing_each_group_alone(symmetric):
    spec = QSpec(4, symmetric, "group", 32, ragged=True)
    x = gaussian(6, 80, seed=5)
    spec.check_width(80)  # allowed: ragged
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == (6, 3)
    whole = fake_quant(x, spec)
    per_channel = QSpec(4, symmetric, "channel")
    pieces = torch.cat([fake_quant(x[:, a:b], per_channel) for a, b in ((0, 32), (32, 64), (64, 80))], dim=1)
    torch.testing.assert_close(whole, pieces, rtol=0, atol=1e-6)
    # the short tail group has its own range: the padded tail does not leak into it
    tail_scale, _ = compute_qparams(x[:, 64:], per_channel)
    torch.testing.assert_close(scale[:, 2:], tail_scale, rtol=1e-6, atol=0)


def test_ragged_fake_quant_ste_matches():
    spec = QSpec(3, False, "group", 32, ragged=True)
    x = gaussian(4, 72, seed=6)
    torch.testing.assert_close(fake_quant_ste(x, spec), fake_quant(x, spec), rtol=0, atol=1e-6)


@pytest.mark.parametrize("width,group", [(576, 128), (1600, 128), (96, 64)])
def test_check_width_names_a_valid_group_size(width, group):
    spec = QSpec(4, True, "group", group)
    with pytest.raises(
        QtoolError, match=f"group_size {group} does not divide the input width {width} of layers.0.q_proj"
    ) as exc:
        spec.check_width(width, "layers.0.q_proj")
    msg = str(exc.value)
    hint = re.search(r"e\.g\. ([0-9, ]+)\)", msg)
    assert hint, msg
    sizes = [int(v) for v in hint.group(1).split(",")]
    assert sizes and all(width % s == 0 for s in sizes)
    assert "ragged" in msg


def test_check_width_names_a_valid_group_size_for_small_divisors():
    with pytest.raises(QtoolError) as exc:
        QSpec(4, True, "group", 64).check_width(200, "w")
    hint = re.search(r"e\.g\. ([0-9, ]+)\)", str(exc.value))
    assert hint, str(exc.value)
    assert all(200 % int(v) == 0 for v in hint.group(1).split(","))


def test_check_width_accepts_divisible_and_non_group():
    QSpec(4, True, "group", 32).check_width(96)
    QSpec(4, True, "channel").check_width(97)
    QSpec(4, True, "tensor").check_width(97)


# --- MSE clip search ----------------------------------------------------------------------


def _row_err(w, spec, clip, norm=2.4):
    scale, zero = compute_qparams(w, spec, clip)
    dq = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
    e = (dq - w).abs().pow(norm)
    if spec.granularity == "group":
        return e.reshape(w.shape[0], -1, spec.group_size).sum(-1)
    return e.sum(-1, keepdim=True)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_mse_clip_search_never_worse_than_no_clipping(symmetric, granularity):
    spec = QSpec(4, symmetric, granularity, 32 if granularity == "group" else None)
    torch.manual_seed(7)
    # heavy tails: a few outliers make clipping worthwhile for most rows
    w = torch.distributions.StudentT(3.0).sample((32, 128))
    clip = mse_clip_search(w, spec, grid=50)
    assert clip.shape == (32, n_groups(128, spec))
    searched = _row_err(w, spec, clip)
    plain = _row_err(w, spec, None)
    assert bool((searched <= plain * (1 + 1e-6)).all())
    # heavy tails: most rows/groups gain from clipping, and the kept ratios are the grid's best
    # within the coarse-to-fine search's tolerance (tests/unit/test_mse_clip_search.py)
    assert float((clip < 1.0).float().mean()) > 0.5
    grid = [1.0 - i / 50 for i in range(41)]
    best = torch.stack([_row_err(w, spec, torch.full_like(clip, r)) for r in grid]).amin(0)
    assert float((searched <= best * (1 + 1e-5)).float().mean()) >= 0.95
    assert float(searched.sum()) <= 1.002 * float(best.sum())
    assert float(searched.sum()) < 0.95 * float(plain.sum())
    # and the plain squared error improves too
    assert sqnr_db(w, fake_quant(w, spec, clip)) > sqnr_db(w, fake_quant(w, spec))


def test_mse_clip_search_respects_spec_clip_ratio():
    spec = QSpec(4, True, "channel", clip_ratio=0.9)
    w = gaussian(8, 64, seed=8)
    clip = mse_clip_search(w, spec, grid=20)
    assert float(clip.max()) <= 0.9 + 1e-6


# --- straight-through estimator -------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,symmetric,granularity", list(itertools.product([2, 4, 8], [True, False], GRANULARITIES))
)
def test_fake_quant_ste_forward_equals_fake_quant(bits, symmetric, granularity):
    spec = make_spec(bits, symmetric, granularity, clip=0.9)
    x = gaussian(4, 6, 64, seed=bits)
    if granularity in ("channel", "group"):
        x = x.reshape(24, 64)
    torch.testing.assert_close(fake_quant_ste(x, spec), fake_quant(x, spec), rtol=0, atol=1e-6)


def test_fake_quant_ste_forward_with_clip_tensor():
    spec = QSpec(4, False, "group", 16)
    x = gaussian(8, 64, seed=9)
    clip = torch.linspace(0.6, 1.0, 32).reshape(8, 4)
    torch.testing.assert_close(fake_quant_ste(x, spec, clip), fake_quant(x, spec, clip), rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_ste_gradients(symmetric):
    spec = QSpec(4, symmetric, "channel")
    x = gaussian(8, 64, seed=10).requires_grad_(True)
    clip = torch.full((8, 1), 0.9, requires_grad=True)
    out = fake_quant_ste(x, spec, clip)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # elements strictly inside the clip range, away from the row's min/max, get d out/d x = 1
    lo = x.detach().amin(dim=1, keepdim=True) * 0.9
    hi = x.detach().amax(dim=1, keepdim=True) * 0.9
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    inside = (x.detach() > lo * 0.98) & (x.detach() < hi * 0.98)
    assert inside.sum() > 400
    torch.testing.assert_close(x.grad[inside], torch.ones(int(inside.sum())))
    # clipped elements get no gradient through the clamp (only through the scale, if extreme)
    assert clip.grad is not None and torch.isfinite(clip.grad).all() and float(clip.grad.abs().sum()) > 0
    # plain fake_quant has no gradient through round (it is not an STE): those elements get 0
    y = x.detach().clone().requires_grad_(True)
    fake_quant(y, spec, clip.detach()).sum().backward()
    assert float(y.grad[inside].abs().max()) == 0.0


def test_math_constants_documented():
    # symmetric 4-bit: scale = amax / 7, asymmetric: (max - min) / 15
    x = torch.tensor([[-3.5, 0.0, 7.0]])
    s, z = compute_qparams(x, QSpec(4, True, "channel"))
    assert float(s) == pytest.approx(1.0)
    s, z = compute_qparams(x, QSpec(4, False, "channel"))
    assert float(s) == pytest.approx(10.5 / 15)
    assert int(z) == round(3.5 / (10.5 / 15)) - 8
    assert math.isclose(
        float(
            dequantize(quantize(x, s, z, QSpec(4, False, "channel")), s, z, QSpec(4, False, "channel"))[0, 0]
        ),
        -3.5,
        rel_tol=1e-6,
    )


def test_half_range_grid_is_compressed_tensors_symmetric_convention():
    """``grid: half_range``: scale = amax / 7.5 at 4 bits, codes clamped to [-8, 7] (written out here
    as compressed-tensors computes it), for weights per group and activations per token alike."""
    from qtool.quant.scheme import ActScheme, WeightScheme

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    spec = WeightScheme(bits=4, group_size=64, grid="half_range").spec()
    scale, zero = compute_qparams(w, spec)
    codes = quantize(w, scale, zero, spec)
    wg = w.reshape(32, 2, 64)
    ref_scale = wg.abs().amax(-1) / 7.5
    ref_codes = torch.clamp(torch.round(wg / ref_scale[..., None]), -8, 7).reshape(32, 128)
    assert torch.equal(scale, ref_scale) and torch.equal(codes.float(), ref_codes)
    assert int(codes.min()) == -8 and int(codes.max()) == 7  # both ends of the grid are used
    x = torch.randn(16, 576, generator=g)
    a = ActScheme(bits=4, grid="half_range").spec()
    s = x.abs().amax(-1, keepdim=True) / 7.5
    assert torch.equal(fake_quant(x, a), torch.clamp(torch.round(x / s), -8, 7) * s)
    # the default grid puts amax on code 7 (and never reaches -8)
    q = quantize(w, *compute_qparams(w, WeightScheme(bits=4, group_size=64).spec()), spec)
    assert int(q.min()) >= -7


def test_half_range_grid_needs_symmetric_weights():
    from qtool.quant.scheme import WeightScheme

    with pytest.raises(ValueError, match="symmetric"):
        WeightScheme(bits=4, symmetric=False, grid="half_range")


@pytest.mark.parametrize(
    "bits,symmetric,group,width",
    [
        (4, True, None, 64),
        (4, False, 16, 48),
        (4, True, 8, 33),
        (3, True, None, 7),
        (2, False, None, 10),
        (8, True, None, 16),
    ],
)
def test_quantized_weight_codes_round_trip_exactly(bits, symmetric, group, width):
    """Codes of <= 4 bits are held two to a byte; what comes back is the same int8 tensor, and the
    dequantized weight is the same bits as from the unpacked codes."""
    from qtool.quant.quantizer import QuantizedWeight, quantize

    torch.manual_seed(bits * 100 + width)
    spec = QSpec(bits=bits, symmetric=symmetric, group_size=group)
    w = torch.randn(12, width)
    scale, zero = compute_qparams(w, spec)
    codes = quantize(w, scale, zero, spec)
    qw = QuantizedWeight(codes, scale, zero, spec)
    assert qw.codes.dtype == torch.int8 and torch.equal(qw.codes, codes)
    assert qw.shape == codes.shape
    assert torch.equal(qw.dequantize(), dequantize(codes, scale, zero, spec))
    packed = qw._packed is not None
    assert packed == (bits <= 4)
    if packed:  # half a byte per code (plus the odd column's padding)
        assert qw._packed.numel() == 12 * ((width + 1) // 2)


def test_quantized_weight_keeps_codes_off_its_grid_unpacked():
    """Codes outside the spec's range (not produced by qtool's quantizer) are kept as given, not
    wrapped around by packing."""
    from qtool.quant.quantizer import QuantizedWeight

    spec = QSpec(bits=4)
    codes = torch.tensor([[-8, 7, 9, 0]], dtype=torch.int8)
    qw = QuantizedWeight(codes, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int8), spec)
    assert qw._packed is None and torch.equal(qw.codes, codes)


@pytest.mark.parametrize(
    "spec",
    [
        QSpec(bits=4, granularity="token", symmetric=True),
        QSpec(bits=4, granularity="token", symmetric=False, clip_ratio=0.9),
        QSpec(bits=4, granularity="token", symmetric=True, half_range=True),
        QSpec(bits=8, granularity="token", symmetric=False),
        QSpec(bits=4, group_size=16, symmetric=False),
        QSpec(bits=3, granularity="channel", symmetric=True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_is_bitwise_dequantize_of_quantize(spec, dtype):
    """fake_quant works in place on one buffer; it must give the bits of the two-step definition,
    signed zeros included."""
    torch.manual_seed(0)
    x = (torch.randn(2, 9, 48) * torch.logspace(-3, 1, 48)).to(dtype)
    x[0, 0, :5] = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 0.0])
    scale, zero = compute_qparams(x, spec)
    ref = dequantize(quantize(x, scale, zero, spec), scale, zero, spec).to(dtype)
    got = fake_quant(x, spec)
    assert got.dtype == dtype
    assert torch.equal(
        got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
