"""CUDA kernels against their references, bounded by PyTorch's own error in the same dtype:

    err(kernel, fp32_ref) <= 2 * err(torch_same_dtype, fp32_ref) + atol

(max absolute error). Skipped without a CUDA device or without the built ``qtool_cuda``.
"""

from __future__ import annotations

import math

import pytest
import torch

import qtool.ops as ops
from qtool.ops.int4_matmul import dequantize_int4_weight, quantize_weight_int4
from qtool.ops.kv4_attention import kv4_append_ref, kv4_attention_decode_ref, kv4_dequantize
from qtool.ops.w4a4 import quantize_act_int4_ref, w4a4_matmul_ref
from qtool.quant.packing import unpack_int4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(ops.backend() != "cuda", reason="needs the qtool_cuda extension (make kernels)"),
]

DTYPES = [torch.float16, torch.bfloat16]
DEV = "cuda"


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def assert_bounded(kernel, ref32, same_dtype, atol):
    e_kernel, e_torch = err(kernel, ref32), err(same_dtype, ref32)
    assert e_kernel <= 2 * e_torch + atol, f"kernel error {e_kernel:.3g} vs torch {e_torch:.3g} (+{atol})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 100])
@pytest.mark.parametrize("n,k", [(136, 512), (75, 200), (64, 4096)])
def test_int4_matmul(dtype, group_size, symmetric, rows, n, k):
    torch.manual_seed(rows + n + k)
    w = torch.randn(n, k, device=DEV)
    wp, s, z = quantize_weight_int4(w, group_size, symmetric, scale_dtype=dtype)
    x = torch.randn(rows, k, device=DEV, dtype=dtype)
    wdq = dequantize_int4_weight(wp, s, z, k, group_size)
    ref32 = x.float() @ wdq.t()
    same = x @ wdq.to(dtype).t()
    got = torch.ops.qtool.int4_matmul(x, wp, s, z, group_size)
    assert got.dtype == dtype and got.shape == (rows, n)
    assert_bounded(got, ref32, same, atol=1e-2 * math.sqrt(k / 128))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_matmul_batched_input(dtype):
    x = torch.randn(2, 5, 256, device=DEV, dtype=dtype)
    wp, s, z = quantize_weight_int4(torch.randn(48, 256, device=DEV), 128, False, scale_dtype=dtype)
    got = torch.ops.qtool.int4_matmul(x, wp, s, z, 128)
    ref = ops.int4_matmul_ref(x.float(), wp, s, z, 128)
    assert got.shape == (2, 5, 48)
    assert err(got, ref) < 5e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [200, 4096, 11008])
@pytest.mark.parametrize("pack", [True, False])
def test_quantize_act(dtype, k, pack):
    x = torch.randn(37, k, device=DEV, dtype=dtype) * 2
    codes, scales = torch.ops.qtool.quantize_act_int4(x, 0.9, False, pack)
    want_codes, want_scales = quantize_act_int4_ref(x, 0.9, False, pack)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)
    a = unpack_int4(codes, k) if pack else codes
    b = unpack_int4(want_codes, k) if pack else want_codes
    assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 4096, 16384])
def test_quantize_act_hadamard(dtype, k):
    x = torch.randn(9, k, device=DEV, dtype=dtype)
    codes, scales = torch.ops.qtool.quantize_act_int4(x, 1.0, True, True)
    want_codes, want_scales = quantize_act_int4_ref(x, 1.0, True, True)
    torch.testing.assert_close(scales, want_scales, rtol=1e-5, atol=0)
    a, b = unpack_int4(codes, k), unpack_int4(want_codes, k)
    assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 64, 4096), (7, 75, 200), (64, 128, 512), (300, 96, 1000)])
@pytest.mark.parametrize("low_rank", [False, True])
def test_w4a4_matmul(dtype, m, n, k, low_rank):
    torch.manual_seed(m + n + k)
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    codes, sx = quantize_act_int4_ref(x, 0.9)
    wp, sw, _ = quantize_weight_int4(torch.randn(n, k, device=DEV), -1, scale_dtype=dtype)
    u = v = xin = None
    if low_rank:
        u = torch.randn(n, 8, device=DEV, dtype=dtype)
        v = torch.randn(k, 8, device=DEV, dtype=dtype) / math.sqrt(k)
        xin = x
    got = torch.ops.qtool.w4a4_matmul(codes, sx, wp, sw, xin, u, v)
    ref32 = w4a4_matmul_ref(codes, sx, wp, sw.float(), xin, u, v)
    # plain PyTorch in the same dtype: dequantize both operands, one 16-bit matmul
    xa = (unpack_int4(codes, k).float() * sx).to(dtype)
    wd = (unpack_int4(wp, k).float() * sw.float()).to(dtype)
    same = xa @ wd.t()
    if low_rank:
        same = same + (x @ v) @ u.t()
    assert got.dtype == dtype
    assert_bounded(got, ref32, same, atol=1e-2)


def _caches(b, h, t_max, d, groups):
    c = torch.zeros(b, h, t_max, d // 8, dtype=torch.int32, device=DEV)
    m = torch.zeros(b, h, t_max, groups, 2, dtype=torch.float16, device=DEV)
    return c, m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,group_size", [(64, -1), (128, -1), (128, 32), (64, 16)])
def test_kv4_append(dtype, d, group_size):
    groups = 1 if group_size < 0 else d // group_size
    k = torch.randn(3, 4, 5, d, device=DEV, dtype=dtype) * 3
    v = torch.randn(3, 4, 5, d, device=DEV, dtype=dtype)
    lengths = torch.tensor([0, 7, 30], dtype=torch.int32, device=DEV)
    got = [*_caches(3, 4, 40, d, groups), *_caches(3, 4, 40, d, groups)]
    want = [t.clone() for t in got]
    torch.ops.qtool.kv4_append(k, v, *got, lengths, group_size, 0.95)
    kv4_append_ref(k, v, *want, lengths, group_size, 0.95)
    for g, w in zip(got, want, strict=True):
        assert (g != w).float().mean() < 1e-3
    torch.testing.assert_close(
        kv4_dequantize(got[0], got[1]), kv4_dequantize(want[0], want[1]), rtol=0, atol=0.5
    )


def attention_same_dtype(q, k_new, v_new, kc, km, vc, vm, lengths, k_piv, v_piv):
    """The decode contract computed by plain PyTorch in q's dtype (per query, explicit keys)."""
    bsz, hq, tq, d = q.shape
    rep = hq // k_new.shape[1]
    out = torch.empty_like(q)
    for b in range(bsz):
        n = int(lengths[b])
        keys = kv4_dequantize(kc[b, :, : n + tq], km[b, :, : n + tq]).to(q.dtype)
        vals = kv4_dequantize(vc[b, :, : n + tq], vm[b, :, : n + tq]).to(q.dtype)
        if k_piv is not None:
            pb = 0 if k_piv.shape[0] == 1 else b
            keys, vals = torch.cat([k_piv[pb], keys], 1), torch.cat([v_piv[pb], vals], 1)
        p_len = 0 if k_piv is None else k_piv.shape[2]
        for i in range(tq):
            kk = torch.cat([keys[:, : p_len + n + i], k_new[b, :, i : i + 1]], 1).repeat_interleave(rep, 0)
            vv = torch.cat([vals[:, : p_len + n + i], v_new[b, :, i : i + 1]], 1).repeat_interleave(rep, 0)
            s = (q[b, :, i : i + 1] @ kk.transpose(1, 2)) * (1 / math.sqrt(d))
            out[b, :, i : i + 1] = torch.softmax(s, dim=-1) @ vv
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (32, 8)])
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("pivot", [None, "shared", "batched"])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_kv4_attention_decode(dtype, d, hq, hkv, tq, pivot, group_size):
    torch.manual_seed(d + hq + tq)
    bsz, t_max = 3, 2048
    groups = 1 if group_size < 0 else d // group_size
    lengths = torch.tensor([0, 37, 1900], dtype=torch.int32, device=DEV)
    caches = [*_caches(bsz, hkv, t_max, d, groups), *_caches(bsz, hkv, t_max, d, groups)]
    past = torch.randn(bsz, hkv, 1900, d, device=DEV, dtype=dtype)
    kv4_append_ref(past, past.flip(-1), *caches, torch.zeros(bsz, dtype=torch.int32, device=DEV), group_size)
    k_new = torch.randn(bsz, hkv, tq, d, device=DEV, dtype=dtype)
    v_new = torch.randn(bsz, hkv, tq, d, device=DEV, dtype=dtype)
    torch.ops.qtool.kv4_append(k_new, v_new, *caches, lengths, group_size, 1.0)
    q = torch.randn(bsz, hq, tq, d, device=DEV, dtype=dtype)
    k_piv = v_piv = None
    if pivot:
        pb = 1 if pivot == "shared" else bsz
        k_piv = torch.randn(pb, hkv, 5, d, device=DEV, dtype=dtype) * 3
        v_piv = torch.randn(pb, hkv, 5, d, device=DEV, dtype=dtype)
    got = torch.ops.qtool.kv4_attention_decode(
        q, k_new, v_new, *caches, lengths, k_piv, v_piv, group_size, None
    )
    k32, v32 = (None, None) if pivot is None else (k_piv.float(), v_piv.float())
    ref32 = kv4_attention_decode_ref(
        q.float(), k_new.float(), v_new.float(), *caches, lengths, k32, v32, group_size
    )
    same = attention_same_dtype(q, k_new, v_new, *caches, lengths, k_piv, v_piv)
    assert got.dtype == dtype and got.shape == q.shape
    assert_bounded(got, ref32, same, atol=2e-3)


def test_quantized_kv_cache_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cache_gpu = ops.QuantizedKVCache(2, 8, 128, 64, device=DEV)
    cache_cpu = ops.QuantizedKVCache(2, 8, 128, 64, device="cpu")
    k, v = torch.randn(2, 8, 9, 128, dtype=torch.float16), torch.randn(2, 8, 9, 128, dtype=torch.float16)
    cache_gpu.append(k.to(DEV), v.to(DEV), n_valid=[9, 4])
    cache_cpu.append(k, v, n_valid=[9, 4])
    q = torch.randn(2, 32, 1, 128, dtype=torch.float16)
    kc, vc = (torch.randn(2, 8, 1, 128, dtype=torch.float16) for _ in range(2))
    got = cache_gpu.step(q.to(DEV), kc.to(DEV), vc.to(DEV)).cpu()
    want = cache_cpu.step(q, kc, vc)
    assert err(got, want) < 1e-2
