"""Shared machinery of the README table scripts: run rows (recipes or FP models), evaluate the
same first N WikiText-2 windows, and write JSON + a markdown table with the full provenance.

A row is ``{"label": str, "recipe": dict}`` (quantized with qtool.api.run_recipe, exported to a
temporary folder to measure its size) or ``{"label": str, "fp": "float32" | "bfloat16"}``.

Also what every script shares: the repository root (:data:`REPO`), the ``results/`` folder they
write to (:data:`RESULTS`), the environment defaults (data folder, no progress bars) set when this
module is imported, and :func:`command`, the command line recorded in each table. Scripts run as
modules from the repository root: ``python -m scripts.tables.table_foundation --limit 16``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results"
os.environ.setdefault("QTOOL_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("QTOOL_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def command() -> str:
    """This process's command line as a reader reruns it from the repository root
    (``python -m scripts.tables.table_foundation --limit 16``)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    target = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return " ".join(["python", *target, *sys.argv[1:]])


def parse_args(description: str, default_limit: int = 16) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=default_limit, help="first N windows of the test set")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--prefix", default="none", help="none | bos | text, the same for every row")
    p.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    p.add_argument("--no-cache", action="store_true", help="re-measure rows already in results/*.json")
    p.add_argument("--out", default=None, help="output stem under results/ (default: the script name)")
    return p.parse_args()


def _fp_size_bytes(model) -> int:
    return sum(p.numel() * 2 for p in model.parameters())  # bf16 checkpoint of the same tensors


def _cached(row: dict, args, results_dir: Path) -> dict | None:
    """A row with the same recipe (or FP dtype) and protocol measured by an earlier run."""
    want = {
        k: v
        for k, v in provenance(args).items()
        if k in ("model", "seq_len", "windows", "prefix", "calibration")
    }
    for f in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        prov = data.get("provenance", {})
        if any(prov.get(k) != v for k, v in want.items()):
            continue
        for rec in data.get("rows", []):
            if rec.get("recipe") == row.get("recipe") and rec.get("fp_dtype") == row.get("fp"):
                return {**rec, "label": row["label"], "reused_from": f.name}
    return None


def run_rows(rows: list[dict], args, name: str) -> list[dict]:
    from qtool import api
    from qtool.eval.perplexity import perplexity
    from qtool.log import setup_logging
    from qtool.models.loading import load_hf_model
    from qtool.recipe import Recipe

    setup_logging()
    wanted = None if args.only is None else set(args.only.split(","))
    out: list[dict] = []
    results_dir = RESULTS
    results_dir.mkdir(exist_ok=True)
    stem = args.out or name
    for row in rows:
        if wanted is not None and row["label"] not in wanted:
            continue
        t0 = time.perf_counter()
        hit = None if args.no_cache else _cached(row, args, results_dir)
        if hit is not None:
            out.append(hit)
            print(f"{row['label']:<40} ppl {hit['ppl']:9.3f}  (reused from {hit['reused_from']})", flush=True)
            _write(out, args, results_dir / stem)
            continue
        if "fp" in row:
            model, tok = load_hf_model(args.model, row["fp"], "cpu")
            size, qsec, extra = _fp_size_bytes(model), 0.0, {}
        else:
            data = {"model": args.model, **row["recipe"]}
            data.setdefault("calibration", {"samples": args.calib_samples, "seq_len": args.calib_seq_len})
            recipe = Recipe.model_validate(data)
            with tempfile.TemporaryDirectory() as tmp:
                ctx = api.run_recipe(recipe, output=Path(tmp) / "ckpt", overwrite=True, export=True)
            model, tok = ctx.model, ctx.tokenizer
            qsec = ctx.results["quantize_seconds"]
            size = ctx.results["export"]["bytes"]
            extra = {
                k: v
                for k, v in ctx.results.items()
                if k in ("gptq", "lowrank", "bisup", "intactkv", "kv_smooth")
            }
            extra = {k: {kk: vv for kk, vv in v.items() if kk != "layer_errors"} for k, v in extra.items()}
        res = perplexity(model, tok, "wikitext2", args.seq_len, args.limit, 1, args.prefix)
        rec = {
            "label": row["label"],
            "ppl": res.ppl,
            "checkpoint_mb": size / 1e6,
            "quantize_s": qsec,
            "eval_s": res.seconds,
            "recipe": row.get("recipe"),
            "fp_dtype": row.get("fp"),
            "details": extra,
        }
        out.append(rec)
        print(
            f"{row['label']:<40} ppl {res.ppl:9.3f}  size {size / 1e6:7.1f} MB  quantize {qsec:6.1f}s  eval {res.seconds:6.1f}s  ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        del model
        _write(out, args, results_dir / stem)
    return out


def provenance(args) -> dict:
    from qtool.api import versions

    return {
        "model": args.model,
        "data": "wikitext-2-raw-v1 test (rows joined with \\n\\n, tokenized once)",
        "seq_len": args.seq_len,
        "windows": f"first {args.limit}",
        "prefix": args.prefix,
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens, wikitext2 (mirror: validation split), seed 0",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "command": command(),
    }


def _write(rows: list[dict], args, stem: Path) -> None:
    fp = next((r["ppl"] for r in rows if r.get("fp_dtype") == "float32"), None)
    stem.with_suffix(".json").write_text(
        json.dumps({"provenance": provenance(args), "rows": rows}, indent=2, default=str)
    )
    lines = [
        "| scheme | ppl | ppl / FP32 | checkpoint MB | quantize s | eval s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['ppl'] / fp:.3f}" if fp else "-"
        lines.append(
            f"| {r['label']} | {r['ppl']:.3f} | {ratio} | {r['checkpoint_mb']:.1f} | {r['quantize_s']:.1f} | {r['eval_s']:.1f} |"
        )
    p = provenance(args)
    lines.append("")
    lines.append(
        f"{p['model']}, {p['data']}, seq len {p['seq_len']}, {p['windows']} windows, prefix {p['prefix']}, "
        f"calibration {p['calibration']}, {p['device']} ({p['threads']} threads), torch {p['versions']['torch']}, "
        f"transformers {p['versions']['transformers']}, qtool {p['versions']['qtool']}. Command: `{p['command']}`"
    )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
