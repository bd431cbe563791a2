"""Kernel benchmarks: qtool's CUDA ops against the 16-bit PyTorch / cuBLAS baselines.

Every function times with CUDA events (warm-up, then the median of ``iters`` runs) and returns
one dict per configuration; :func:`device_info` records the device, clocks and the peak numbers
used for the "share of peak" columns. ``qtool bench matmul|w4a4|attention`` runs one of them
(through :func:`qtool.api.bench_kernels`); ``python -m scripts.bench.bench_kernels`` runs them all
and writes a JSON file and a markdown table. All of it needs a CUDA device and the built extension.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from qtool.ops import registry
from qtool.ops.int4_matmul import quantize_weight_int4

NEEDS = "needs a CUDA device and the qtool_cuda extension (make kernels)"
# (out_features, in_features) of Llama-2-7B / Llama-3-8B / Mistral linears
SHAPES: tuple[tuple[int, int], ...] = (
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),
    (14336, 4096),
    (4096, 14336),
)
ROWS: tuple[int, ...] = (1, 16, 256, 2048, 8192)
# dense vendor-datasheet peaks (GB/s, fp16 TFLOPS, int8 TOPS), matched on the device name in order;
# override with QTOOL_PEAK_GBS / QTOOL_PEAK_TFLOPS / QTOOL_PEAK_TOPS
PEAKS: tuple[tuple[str, float, float, float], ...] = (
    ("H200", 4800, 989, 1979),
    ("H100 NVL", 3900, 835, 1671),
    ("H100 PCIe", 2000, 756, 1513),
    ("H100", 3350, 989, 1979),
    ("A100-SXM4-80GB", 2039, 312, 624),
    ("A100 80GB PCIe", 1935, 312, 624),
    ("A100", 1555, 312, 624),
)


def require_cuda() -> None:
    """Raise a clear error unless CUDA tensors will run the qtool kernels."""
    if not torch.cuda.is_available() or registry.backend() != "cuda":
        raise RuntimeError(f"qtool kernel benchmarks {NEEDS}: {registry.backend_reason()}")


def time_ms(fn: Callable[[], object], warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, each timed by its own CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _nvidia_smi() -> dict[str, str]:
    if shutil.which("nvidia-smi") is None:
        return {}
    fields = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version"
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                f"--query-gpu={fields}",
                "--format=csv,noheader",
                f"--id={torch.cuda.current_device()}",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in out.split(",")), strict=False))


def device_info() -> dict[str, object]:
    """Device name, capability, SMs, memory, clocks (nvidia-smi when present), versions, peaks."""
    require_cuda()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = props.name
    peak = next((p for p in PEAKS if p[0] in name), (name, None, None, None))
    info: dict[str, object] = {
        "device": name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_gbs": float(os.environ.get("QTOOL_PEAK_GBS", peak[1] or 0)) or None,
        "peak_fp16_tflops": float(os.environ.get("QTOOL_PEAK_TFLOPS", peak[2] or 0)) or None,
        "peak_int8_tops": float(os.environ.get("QTOOL_PEAK_TOPS", peak[3] or 0)) or None,
    }
    for attr in ("clock_rate", "memory_clock_rate", "memory_bus_width", "L2_cache_size"):
        if hasattr(props, attr):
            info[attr] = getattr(props, attr)
    info.update({f"smi.{k}": v for k, v in _nvidia_smi().items()})
    return info


def _share(value: float, peak: float | None) -> float | None:
    return round(value / peak, 3) if peak else None


def bench_int4_matmul(
    shapes: Sequence[tuple[int, int]] = SHAPES,
    rows: Sequence[int] = ROWS,
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    warmup: int = 10,
    iters: int = 50,
) -> list[dict[str, object]]:
    """W4A16 ``int4_matmul`` (symmetric, ``group_size``) vs a 16-bit cuBLAS matmul."""
    require_cuda()
    info = device_info()
    out = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        wp, s, _ = quantize_weight_int4(w, group_size, True, scale_dtype=dtype)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            base = time_ms(partial(torch.matmul, x, w.t()), warmup, iters)
            ours = time_ms(partial(torch.ops.qtool.int4_matmul, x, wp, s, None, group_size), warmup, iters)
            moved = wp.numel() * 4 + s.numel() * s.element_size() + (m * k + m * n) * x.element_size()
            gbs, tflops = moved / ours / 1e6, 2 * m * n * k / ours / 1e9
            memory_bound = m <= 16
            out.append(
                {
                    "op": "int4_matmul",
                    "shape": f"{n}x{k}",
                    "rows": m,
                    "fp16_ms": round(base, 4),
                    "qtool_ms": round(ours, 4),
                    "speedup": round(base / ours, 2),
                    "GB/s": round(gbs, 1),
                    "TFLOPS": round(tflops, 1),
                    "bound": "memory" if memory_bound else "compute",
                    "share_of_peak": _share(gbs, info["peak_gbs"])
                    if memory_bound
                    else _share(tflops, info["peak_fp16_tflops"]),
                }
            )
    return out


def bench_w4a4(
    shapes: Sequence[tuple[int, int]] = SHAPES,
    rows: Sequence[int] = ROWS,
    hadamard: bool = False,
    dtype: torch.dtype = torch.float16,
    warmup: int = 10,
    iters: int = 50,
) -> list[dict[str, object]]:
    """W4A4: activation quantization + int4 GEMM vs a 16-bit cuBLAS matmul (times both parts)."""
    require_cuda()
    info = device_info()
    out = []
    for n, k in shapes:
        if hadamard and k & (k - 1):
            continue  # the in-kernel Hadamard covers power-of-two widths only
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        wp, sw, _ = quantize_weight_int4(w, -1, True, scale_dtype=dtype)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            codes, sx = torch.ops.qtool.quantize_act_int4(x, 0.9, hadamard, True)
            base = time_ms(partial(torch.matmul, x, w.t()), warmup, iters)
            quant = time_ms(partial(torch.ops.qtool.quantize_act_int4, x, 0.9, hadamard, True), warmup, iters)
            gemm = time_ms(
                partial(torch.ops.qtool.w4a4_matmul, codes, sx, wp, sw, None, None, None), warmup, iters
            )
            tops = 2 * m * n * k / gemm / 1e9
            out.append(
                {
                    "op": "w4a4",
                    "shape": f"{n}x{k}",
                    "rows": m,
                    "hadamard": hadamard,
                    "fp16_ms": round(base, 4),
                    "quant_ms": round(quant, 4),
                    "gemm_ms": round(gemm, 4),
                    "qtool_ms": round(quant + gemm, 4),
                    "speedup": round(base / (quant + gemm), 2),
                    "TOPS": round(tops, 1),
                    "share_of_peak": _share(tops, info["peak_int8_tops"]),
                }
            )
    return out


def _decode_row(ctx, b, hq, hkv, d, dtype, warmup, iters, peak_gbs) -> dict[str, object]:
    """Time one (context, batch) point; its tensors are freed when it returns."""
    kv_shape = (b, hkv, ctx, d)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
    k16 = torch.randn(kv_shape, device="cuda", dtype=dtype)
    v16 = torch.randn(kv_shape, device="cuda", dtype=dtype)
    base = time_ms(partial(F.scaled_dot_product_attention, q, k16, v16, enable_gqa=True), warmup, iters)
    bytes16 = 2 * k16.numel() * k16.element_size()
    del k16, v16
    # the kernel's speed does not depend on the values: random words and plausible scales
    k4 = torch.randint(-(2**31), 2**31 - 1, (b, hkv, ctx, d // 8), device="cuda", dtype=torch.int32)
    v4 = torch.randint_like(k4, -(2**31), 2**31 - 1)
    scale = torch.rand(b, hkv, ctx, 1, device="cuda") * 0.1 + 0.01
    zero = torch.randint(-8, 8, (b, hkv, ctx, 1), device="cuda").float()
    meta = torch.stack([scale, zero], -1).half()
    k_new = torch.randn(b, hkv, 1, d, device="cuda", dtype=dtype)
    lengths = torch.full((b,), ctx - 1, device="cuda", dtype=torch.int32)
    op = partial(
        torch.ops.qtool.kv4_attention_decode,
        q,
        k_new,
        k_new,
        k4,
        meta,
        v4,
        meta,
        lengths,
        None,
        None,
        -1,
        None,
    )
    ours = time_ms(op, warmup, iters)
    bytes4 = 2 * (k4.numel() * 4 + meta.numel() * 2)
    gbs = bytes4 / ours / 1e6
    return {
        "op": "kv4_decode",
        "context": ctx,
        "batch": b,
        "heads": f"{hq}/{hkv}",
        "head_dim": d,
        "sdpa_fp16_ms": round(base, 4),
        "qtool_ms": round(ours, 4),
        "speedup": round(base / ours, 2),
        "kv_memory_ratio": round(bytes16 / bytes4, 2),
        "GB/s": round(gbs, 1),
        "share_of_peak": _share(gbs, peak_gbs),
    }


def bench_decode_attention(
    contexts: Sequence[int] = (4096, 16384, 65536),
    batches: Sequence[int] = (1, 8, 32),
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.float16,
    warmup: int = 5,
    iters: int = 20,
) -> list[dict[str, object]]:
    """One decode step (``Tq = 1``) over a full cache: int4 + 16-bit self vs SDPA on a 16-bit cache."""
    require_cuda()
    peak = device_info()["peak_gbs"]
    out: list[dict[str, object]] = []
    for ctx in contexts:
        for b in batches:
            need = 2.6 * 2 * b * num_kv_heads * ctx * head_dim * 2  # both 16-bit caches, with margin
            if need > torch.cuda.mem_get_info()[0]:
                out.append(
                    {"op": "kv4_decode", "context": ctx, "batch": b, "skipped": "not enough GPU memory"}
                )
                continue
            out.append(_decode_row(ctx, b, num_heads, num_kv_heads, head_dim, dtype, warmup, iters, peak))
            torch.cuda.empty_cache()
    return out
