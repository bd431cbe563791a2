"""Benchmark qtool's CUDA kernels against 16-bit PyTorch and write JSON + a markdown table.

    .venv/bin/python -m scripts.bench.bench_kernels     # writes results/kernels.{json,md}
    .venv/bin/python -m scripts.bench.bench_kernels --only int4 --rows 1 16 --iters 20

Needs a CUDA device and the built extension (`make kernels`); the device, clocks, versions and
peak numbers used for "share of peak" are recorded next to the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qtool.bench import kernels as bench
from scripts.tables.common import RESULTS, command

log = logging.getLogger("bench_kernels")


def markdown(rows: list[dict]) -> str:
    """One markdown table for rows that share their keys (missing cells left empty)."""
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", choices=["int4", "w4a4", "decode"], nargs="*", help="benchmarks to run (default all)"
    )
    p.add_argument("--rows", type=int, nargs="*", default=list(bench.ROWS))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--hadamard", action="store_true", help="W4A4 with the in-kernel Hadamard")
    p.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384, 65536])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "kernels", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bench.require_cuda()
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    which = set(args.only or ["int4", "w4a4", "decode"])
    report: dict[str, object] = {"device": bench.device_info()}
    if "int4" in which:
        log.info("int4_matmul (W4A16, group %d) ...", args.group_size)
        report["int4_matmul"] = bench.bench_int4_matmul(
            rows=args.rows, group_size=args.group_size, warmup=args.warmup, iters=args.iters
        )
    if "w4a4" in which:
        log.info("w4a4 (activation quantize + int4 GEMM) ...")
        report["w4a4"] = bench.bench_w4a4(
            rows=args.rows, hadamard=args.hadamard, warmup=args.warmup, iters=args.iters
        )
    if "decode" in which:
        log.info("kv4 decode attention ...")
        report["kv4_decode"] = bench.bench_decode_attention(
            args.contexts, args.batches, warmup=max(2, args.warmup // 2), iters=max(5, args.iters // 2)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    dev = report["device"]
    parts = [
        f"# qtool kernel benchmarks\n\nDevice: {dev['device']} (sm_{str(dev['capability']).replace('.', '')}), "
        f"torch {dev['torch']}, CUDA {dev['cuda']}; median of {args.iters} runs after {args.warmup} warm-up "
        f"runs, CUDA events. Produced by `{command()}`.\n"
    ]
    for key in ("int4_matmul", "w4a4", "kv4_decode"):
        if key in report:
            parts.append(f"## {key}\n\n{markdown(report[key])}\n")
    md_path.write_text("\n".join(parts))
    sys.stdout.write("\n".join(parts) + "\n")
    log.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
