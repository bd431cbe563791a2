"""CPU tests of the qtool op references against independent float64 computations.

The helpers here decode the int4 layout with their own bit arithmetic (not qtool.quant.packing)
and compute attention with an explicit per-query softmax loop, so a layout or masking mistake
in the references cannot cancel out.
"""

from __future__ import annotations

import math

import pytest
import torch

import qtool.ops as ops
from qtool.ops.int4_matmul import int4_matmul_ref, quantize_weight_int4
from qtool.ops.kv4_attention import kv4_append_ref, kv4_attention_decode_ref, kv4_quantize
from qtool.ops.w4a4 import quantize_act_int4_ref, w4a4_linear, w4a4_matmul_ref
from qtool.quant.packing import pack_int4, pack_int4_dim0, unpack_int4, unpack_int4_dim0
from qtool.quant.quantizer import QSpec, compute_qparams, dequantize, fake_quant, quantize, sqnr_db


def nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Signed codes of ``packed [rows, words]`` decoded bit by bit (int64)."""
    words = packed.long() & 0xFFFFFFFF
    c = torch.arange(cols)
    return ((words[:, c // 8] >> (4 * (c % 8))) & 0xF) - 8


def dense_weight(w_packed, scales, zeros, k, group_size) -> torch.Tensor:
    """float64 ``(q - z) * s`` expanded column by column."""
    n = w_packed.shape[0]
    q = nibbles(w_packed, k).double()
    g = torch.zeros(k, dtype=torch.long) if group_size <= 0 else torch.arange(k) // group_size
    s = scales.double()[:, g]
    z = torch.zeros(n, k, dtype=torch.float64)
    if zeros is not None:
        z = nibbles(zeros.t().contiguous(), n).t().double()[:, g]
    return (q - z) * s


def kv_dense(packed: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """float64 dequantization of cache rows ``[..., D/8]`` with ``meta [..., G, 2]``."""
    d = packed.shape[-1] * 8
    q = nibbles(packed.reshape(-1, packed.shape[-1]), d).double()
    m = meta.reshape(-1, meta.shape[-2], 2).double()
    g = torch.arange(d) // (d // meta.shape[-2])
    return ((q - m[:, g, 1]) * m[:, g, 0]).reshape(*packed.shape[:-1], d)


# --------------------------------------------------------------------------- packing / registry
@pytest.mark.parametrize("shape", [(5, 37), (1, 8), (9, 200)])
def test_pack_round_trips(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (shape[0], math.ceil(shape[1] / 8))
    assert torch.equal(unpack_int4(packed, shape[1]), q)
    assert torch.equal(nibbles(packed, shape[1]).to(torch.int8), q)
    assert torch.equal(unpack_int4_dim0(pack_int4_dim0(q.t().contiguous()), shape[1]), q.t())


def test_backend_reports_reference_without_extension(monkeypatch):
    from qtool.ops import registry

    name, reason = ops.backend_info()
    if registry.extension() is None:
        assert name == "reference" and "qtool_cuda" in reason
    monkeypatch.setenv("QTOOL_OPS_BACKEND", "reference")
    monkeypatch.setattr(registry, "_state", {"loaded": False, "module": None, "reason": ""})
    assert ops.backend() == "reference" and "QTOOL_OPS_BACKEND" in ops.backend_reason()
    assert "qtool ops: reference" in ops.describe()


def test_ops_are_registered_and_trace_on_meta():
    x = torch.randn(3, 64, dtype=torch.float16)
    wp, s, z = quantize_weight_int4(torch.randn(16, 64), 32, symmetric=False, scale_dtype=torch.float16)
    y = torch.ops.qtool.int4_matmul(x.to("meta"), wp.to("meta"), s.to("meta"), z.to("meta"), 32)
    assert y.shape == (3, 16) and y.device.type == "meta"
    codes, scales = torch.ops.qtool.quantize_act_int4(x.to("meta"), 0.9, False, True)
    assert codes.shape == (3, 8) and codes.dtype == torch.int32 and scales.shape == (3, 1)
    assert torch.equal(torch.ops.qtool.int4_matmul(x, wp, s, z, 32), int4_matmul_ref(x, wp, s, z, 32))


# --------------------------------------------------------------------------- W4A16
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows,k,n", [(1, 200, 24), (7, 264, 17), (17, 96, 9)])
def test_int4_matmul_ref_matches_dense_fp64(group_size, symmetric, rows, k, n):
    torch.manual_seed(rows * 1000 + k + n)
    w = torch.randn(n, k)
    wp, s, z = quantize_weight_int4(w, group_size, symmetric, scale_dtype=torch.float16)
    x = torch.randn(rows, k)
    want = x.double() @ dense_weight(wp, s, z, k, group_size).t()
    got = int4_matmul_ref(x, wp, s, z, group_size)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    half = int4_matmul_ref(x.half().reshape(1, rows, k), wp, s, z, group_size)
    assert half.dtype == torch.float16 and half.shape == (1, rows, n)
    torch.testing.assert_close(
        half[0].double(), x.half().double() @ dense_weight(wp, s, z, k, group_size).t(), rtol=2e-3, atol=2e-2
    )


@pytest.mark.parametrize("group_size,symmetric", [(32, True), (64, False), (-1, True)])
def test_packed_weight_equals_fake_quant(group_size, symmetric):
    w = torch.randn(12, 192)
    wp, s, z = quantize_weight_int4(w, group_size, symmetric, scale_dtype=torch.float32)
    spec = QSpec(
        bits=4,
        symmetric=symmetric,
        granularity="group" if group_size > 0 else "channel",
        group_size=group_size if group_size > 0 else None,
    )
    torch.testing.assert_close(ops.dequantize_int4_weight(wp, s, z, 192, group_size), fake_quant(w, spec))


def test_int4_matmul_rejects_bad_shapes():
    wp, s, _ = quantize_weight_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="words per row"):
        int4_matmul_ref(torch.randn(2, 72), wp, s, None, 32)
    with pytest.raises(ValueError, match="scales must be"):
        int4_matmul_ref(torch.randn(2, 64), wp, s, None, 64)


# --------------------------------------------------------------------------- W4A4
@pytest.mark.parametrize("k", [50, 256])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_quantize_act_ref_matches_formula(k, clip):
    x = torch.randn(2, 5, k, dtype=torch.bfloat16) * 3
    codes, scales = quantize_act_int4_ref(x, clip, pack=True)
    codes8, scales8 = quantize_act_int4_ref(x, clip, pack=False)
    assert codes.shape == (2, 5, math.ceil(k / 8)) and codes.dtype == torch.int32
    assert scales.shape == (2, 5, 1) and scales.dtype == torch.float32 and torch.equal(scales, scales8)
    xf = x.float()
    want_scale = (xf.abs().amax(-1, keepdim=True) * clip / 7).clamp(min=1e-8)
    torch.testing.assert_close(scales, want_scale, rtol=1e-6, atol=0)
    want = torch.clamp(torch.round(xf / want_scale), -8, 7)
    assert torch.equal(codes8.float(), want)
    assert torch.equal(nibbles(codes.reshape(10, -1), k).reshape(2, 5, k).to(torch.int8), codes8)


def test_quantize_act_hadamard_is_sylvester_rotation():
    from qtool.algorithms import hadamard

    assert hadamard.fast_hadamard_transform is not None
    k = 64
    idx = torch.arange(k)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    for b in range(6):
        parity ^= (bits >> b) & 1
    h = (1 - 2 * parity).double() / math.sqrt(k)  # the matrix the CUDA kernel applies
    x = torch.randn(6, k, dtype=torch.float16)
    codes, scales = quantize_act_int4_ref(x, 1.0, hadamard=True, pack=False)
    rotated = (x.double() @ h.t()).float()
    want_codes, want_scales = quantize_act_int4_ref(rotated, 1.0, hadamard=False, pack=False)
    torch.testing.assert_close(scales, want_scales, rtol=1e-5, atol=0)
    assert (codes.int() - want_codes.int()).abs().max() <= 1
    assert (codes != want_codes).float().mean() < 0.02


@pytest.mark.parametrize("m,n,k", [(7, 24, 200), (1, 5, 64), (16, 33, 129)])
def test_w4a4_matmul_ref_matches_dense_fp64(m, n, k):
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, dtype=torch.float16)
    codes, sx = quantize_act_int4_ref(x, 0.9)
    wp, sw, _ = quantize_weight_int4(torch.randn(n, k), -1, scale_dtype=torch.float16)
    qa, qw = nibbles(codes, k).double(), nibbles(wp, k).double()
    acc = qa @ qw.t()
    ones = w4a4_matmul_ref(codes, torch.ones(m, 1), wp, torch.ones(n, 1))
    assert torch.equal(ones.double(), acc)  # int32 accumulation is exact
    want = acc * sx.double() * sw.double().t()
    got = w4a4_matmul_ref(codes, sx, wp, sw)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=1e-2)
    r = 3
    u, v = torch.randn(n, r, dtype=torch.float16), torch.randn(k, r, dtype=torch.float16) / k
    got_lr = w4a4_matmul_ref(codes, sx, wp, sw, x, u, v)
    want_lr = want + (x.double() @ v.double()) @ u.double().t()
    torch.testing.assert_close(got_lr.double(), want_lr, rtol=2e-3, atol=1e-2)
    with pytest.raises(ValueError, match="low-rank"):
        w4a4_matmul_ref(codes, sx, wp, sw, x, u, None)


def test_w4a4_linear_tracks_float_matmul():
    torch.manual_seed(0)
    x, w = torch.randn(4, 9, 128), torch.randn(64, 128)
    wp, sw, _ = quantize_weight_int4(w, -1, scale_dtype=torch.float32)
    y = w4a4_linear(x, wp, sw)
    assert y.shape == (4, 9, 64)
    assert sqnr_db(x @ w.t(), y) > 12


# --------------------------------------------------------------------------- KV cache
def _cache(b, h, t_max, d, groups):
    return (
        torch.zeros(b, h, t_max, d // 8, dtype=torch.int32),
        torch.zeros(b, h, t_max, groups, 2, dtype=torch.float16),
    )


@pytest.mark.parametrize("d,group_size", [(64, -1), (64, 32), (128, 64), (128, -1)])
def test_kv4_quantize_within_half_step(d, group_size):
    x = torch.randn(3, 2, 5, d, dtype=torch.float16) * 4
    packed, meta = kv4_quantize(x, group_size)
    groups = 1 if group_size < 0 else d // group_size
    assert packed.shape == (3, 2, 5, d // 8) and meta.shape == (3, 2, 5, groups, 2)
    deq = kv_dense(packed, meta)
    step = meta[..., 0].double().repeat_interleave(d // groups, dim=-1)
    assert ((deq - x.double()).abs() <= step * 0.5 + 1e-3).all()
    assert torch.equal(ops.kv4_dequantize(packed, meta).double(), deq)


def test_kv4_append_writes_at_ragged_lengths():
    k, v = torch.randn(3, 2, 4, 64, dtype=torch.float16), torch.randn(3, 2, 4, 64, dtype=torch.float16)
    kc, km = _cache(3, 2, 16, 64, 1)
    vc, vm = _cache(3, 2, 16, 64, 1)
    lengths = torch.tensor([0, 5, 12], dtype=torch.int32)
    kv4_append_ref(k, v, kc, km, vc, vm, lengths, -1, 0.95)
    kp, kmeta = kv4_quantize(k, -1, 0.95)
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(kc[b, :, n : n + 4], kp[b]) and torch.equal(km[b, :, n : n + 4], kmeta[b])
        assert not kc[b, :, :n].any() and not kc[b, :, n + 4 :].any()
    with pytest.raises(ValueError, match="cache holds"):
        kv4_append_ref(k, v, kc, km, vc, vm, torch.tensor([0, 0, 13], dtype=torch.int32))


def attention_fp64(q, k_new, v_new, kc, km, vc, vm, lengths, k_piv=None, v_piv=None):
    """Explicit float64 per-(sequence, head, query) softmax: the decode contract."""
    bsz, hq, tq, d = q.shape
    rep = hq // k_new.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(bsz):
        n = int(lengths[b])
        for h in range(hq):
            g = h // rep
            for i in range(tq):
                keys = [kv_dense(kc[b, g, : n + i], km[b, g, : n + i]), k_new[b, g, i : i + 1].double()]
                vals = [kv_dense(vc[b, g, : n + i], vm[b, g, : n + i]), v_new[b, g, i : i + 1].double()]
                if k_piv is not None:
                    pb = 0 if k_piv.shape[0] == 1 else b
                    keys.insert(0, k_piv[pb, g].double())
                    vals.insert(0, v_piv[pb, g].double())
                kk, vv = torch.cat(keys), torch.cat(vals)
                p = torch.softmax(kk @ q[b, h, i].double() / math.sqrt(d), dim=0)
                out[b, h, i] = p @ vv
    return out


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("pivot", [None, "shared", "batched"])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_kv4_decode_ref_matches_explicit_softmax(tq, pivot, group_size):
    torch.manual_seed(tq * 7 + group_size)
    bsz, hq, hkv, d, t_max = 3, 8, 2, 64, 24
    lengths = torch.tensor([5, 0, 11], dtype=torch.int32)
    groups = 1 if group_size < 0 else d // group_size
    kc, km = _cache(bsz, hkv, t_max, d, groups)
    vc, vm = _cache(bsz, hkv, t_max, d, groups)
    past_k = torch.randn(bsz, hkv, 11, d)
    past_v = torch.randn(bsz, hkv, 11, d)
    kv4_append_ref(past_k, past_v, kc, km, vc, vm, torch.zeros(bsz, dtype=torch.int32), group_size)
    k_new, v_new = torch.randn(bsz, hkv, tq, d), torch.randn(bsz, hkv, tq, d)
    kv4_append_ref(k_new, v_new, kc, km, vc, vm, lengths, group_size)
    q = torch.randn(bsz, hq, tq, d)
    k_piv = v_piv = None
    if pivot:
        pb = 1 if pivot == "shared" else bsz
        k_piv, v_piv = torch.randn(pb, hkv, 4, d) * 2, torch.randn(pb, hkv, 4, d)
    got = kv4_attention_decode_ref(q, k_new, v_new, kc, km, vc, vm, lengths, k_piv, v_piv, group_size)
    want = attention_fp64(q, k_new, v_new, kc, km, vc, vm, lengths, k_piv, v_piv)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    op = torch.ops.qtool.kv4_attention_decode(
        q.half(),
        k_new.half(),
        v_new.half(),
        kc,
        km,
        vc,
        vm,
        lengths,
        None if k_piv is None else k_piv.half(),
        None if v_piv is None else v_piv.half(),
        group_size,
        None,
    )
    assert op.dtype == torch.float16
    torch.testing.assert_close(op.double(), want, rtol=1e-2, atol=1e-2)


def test_decode_diagonal_is_unquantized():
    """With no pivot and an empty past, a query can only see itself: the output is v_new exactly."""
    kc, km = _cache(1, 1, 4, 64, 1)
    vc, vm = _cache(1, 1, 4, 64, 1)
    k, v = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    kv4_append_ref(k, v, kc, km, vc, vm, torch.zeros(1, dtype=torch.int32))
    out = kv4_attention_decode_ref(
        torch.randn(1, 2, 1, 64), k, v, kc, km, vc, vm, torch.zeros(1, dtype=torch.int32)
    )
    assert torch.equal(out[0, 0, 0], v[0, 0, 0]) and torch.equal(out[0, 1, 0], v[0, 0, 0])
    assert not torch.equal(kv_dense(vc[0, 0, :1], vm[0, 0, :1]).float(), v[0, 0])  # the cache copy differs


def test_quantized_kv_cache_equals_fake_quant_attention():
    torch.manual_seed(3)
    bsz, hq, hkv, d, clip = 2, 4, 2, 64, 0.95
    k_piv, v_piv = (
        torch.randn(1, hkv, 2, d, dtype=torch.float16),
        torch.randn(1, hkv, 2, d, dtype=torch.float16),
    )
    cache = ops.QuantizedKVCache(bsz, hkv, d, max_len=32, clip_ratio=clip, k_pivot=k_piv, v_pivot=v_piv)
    prompt_k = torch.randn(bsz, hkv, 7, d, dtype=torch.float16)
    prompt_v = torch.randn(bsz, hkv, 7, d, dtype=torch.float16)
    cache.append(prompt_k, prompt_v, n_valid=[7, 4])  # ragged right-padded prefill
    assert cache.host_lengths() == [7, 4]
    q = torch.randn(bsz, hq, 1, d, dtype=torch.float16)
    k_cur, v_cur = (
        torch.randn(bsz, hkv, 1, d, dtype=torch.float16),
        torch.randn(bsz, hkv, 1, d, dtype=torch.float16),
    )
    out = cache.step(q, k_cur, v_cur)
    assert cache.host_lengths() == [8, 5] and out.shape == (bsz, hq, 1, d)

    # the fake-quant formula: per-(token, head) asymmetric int4 of the past (scale stored in
    # float16, codes taken with it), 16-bit pivot and 16-bit self
    spec = QSpec(bits=4, symmetric=False, granularity="token", clip_ratio=clip)

    def fq16(x):
        x2 = x.reshape(-1, d).float()
        scale, zero = compute_qparams(x2, spec)
        s16 = scale.clamp(min=2**-14).half().float()
        return dequantize(quantize(x2, s16, zero, spec), s16, zero, spec).reshape(x.shape)

    for b, n in enumerate([7, 4]):
        fk, fv = fq16(prompt_k[b, :, :n]), fq16(prompt_v[b, :, :n])
        ck, cv = cache.dequantized(b)
        assert torch.equal(ck[:, :n], fk) and torch.equal(cv[:, :n], fv)
        # against fake_quant's float32 scales: a code may flip where the fp16 scale rounds
        plain = fake_quant(prompt_k[b, :, :n].float(), spec)
        assert (ck[:, :n] - plain).abs().mean() < 1e-2
        keys = torch.cat([k_piv[0].float(), fk, k_cur[b].float()], dim=1).repeat_interleave(hq // hkv, 0)
        vals = torch.cat([v_piv[0].float(), fv, v_cur[b].float()], dim=1).repeat_interleave(hq // hkv, 0)
        p = torch.softmax(q[b].float() @ keys.transpose(1, 2) / math.sqrt(d), dim=-1)
        torch.testing.assert_close(out[b].float(), p @ vals, rtol=0, atol=4e-3)
    assert cache.memory_bytes() * 3 < 2 * bsz * hkv * 32 * d * 2  # < 1/3 of a 16-bit cache
    with pytest.raises(ValueError, match="overflows"):
        cache.append(
            torch.zeros(bsz, hkv, 30, d, dtype=torch.float16),
            torch.zeros(bsz, hkv, 30, d, dtype=torch.float16),
        )
