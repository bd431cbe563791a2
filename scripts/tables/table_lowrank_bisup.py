"""Low-rank correction and BiSup table (issue 5) on SmolLM2-135M.

    python -m scripts.tables.table_lowrank_bisup --limit 32    # writes results/table_lowrank_bisup32.{json,md}

Split over processes with ``--only`` (each with its own ``--out``), then
``python -m scripts.tables.merge_lowrank_runs --out table_lowrank_bisup32 results/<run>.json ...``.

WikiText-2 test perplexity, seq len 2048, the same first N windows for every row and a BOS in
front of every window (unscored; it is the IntactKV pivot of the full recipe, so every row scores
the same tokens). Every row is quantized from the same model with the same calibration windows
(WikiText-2, seeded), exported to a temporary folder to measure the checkpoint size (weights +
LoRA adapter + pivot sidecars), and evaluated in memory.

Columns: ppl; share of the FP gap closed relative to the row's baseline (W4A4KV4 rows: rotate +
GPTQ; W3A3 rows: W3A3 rotate + GPTQ); extra parameters (low-rank factors kept in full precision;
BiSup's trained parameters fold away and add none); checkpoint size; solve time (the quantizing
steps, wall clock, this machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from scripts.tables.common import RESULTS

W4A4KV4 = {
    "preset": "W4A4KV4",
    "weights": {"bits": 4, "group_size": None},
    "activations": {"bits": 4, "clip_ratio": 0.9},
    "kv_cache": {"bits": 4, "symmetric": False, "clip_ratio": 0.95},
}
# low-rank correction acts on activation error, not on the KV cache: the paper reports it on W4A4
W4A4 = {k: v for k, v in W4A4KV4.items() if k != "kv_cache"} | {"preset": "W4A4"}
# g128 as in BiSup's W3A3 rows (Atom / QuaRot group setting): weights and activations both in groups
# of 128 input channels; 576 = 4.5 x 128, so the last group of the hidden-size inputs is 64 wide
W3A3 = {
    "preset": "W3A3",
    "weights": {"bits": 3, "group_size": 128, "ragged": True},
    "activations": {"bits": 3, "clip_ratio": 0.9, "group_size": 128, "ragged": True},
}
GPTQ = {"gptq": {"act_order": True, "mse_clip": True}}


def lrc(fraction: float, iterations: int) -> dict:
    return {"lowrank": {"rank_fraction": fraction, "iterations": iterations, "act_order": True}}


def rows(args) -> list[tuple[str, str, dict | None, list]]:
    """(label, baseline label, scheme, steps)."""
    bisup = {
        "bisup": {
            "samples": args.bisup_samples,
            "epochs": args.bisup_epochs,
            "lr": args.bisup_lr,
            "rank": args.bisup_rank,
        }
    }
    base = "W4A4KV4 rotate + GPTQ"
    a4 = "W4A4 rotate + GPTQ"
    out: list[tuple[str, str, dict | None, list]] = [
        ("FP (bf16 weights)", "", None, []),
        (a4, a4, W4A4, ["rotate", GPTQ]),
        (f"{a4} + lowrank 0.1 (1 it)", a4, W4A4, ["rotate", lrc(0.1, 1)]),
        (f"{a4} + lowrank 0.3 (1 it)", a4, W4A4, ["rotate", lrc(0.3, 1)]),
        (base, base, W4A4KV4, ["rotate", GPTQ]),
    ]
    # the rows the targets are about first (a CPU run may be cut short), the sweep after
    lowrank_rows = [
        (f"+ lowrank {f:g} ({it} it)", base, W4A4KV4, ["rotate", lrc(f, it)])
        for f, it in ((0.1, 1), (0.3, 1), (0.1, 3), (0.3, 3), (0.05, 1), (0.2, 1), (0.05, 3), (0.2, 3))
    ]
    out += lowrank_rows[:2]
    out.append(("+ bisup", base, W4A4KV4, ["rotate", GPTQ, bisup]))
    bisup_q = {"bisup": {**bisup["bisup"], "start": "quantized"}}
    out.append(("+ bisup (start: quantized)", base, W4A4KV4, ["rotate", GPTQ, bisup_q]))
    w3 = "W3A3-g128 rotate + GPTQ"
    out.append((w3, w3, W3A3, ["rotate", GPTQ]))
    out.append((w3 + " + bisup", w3, W3A3, ["rotate", GPTQ, bisup]))
    out.append(
        (
            f"+ bisup + lowrank {args.full_fraction:g} + IntactKV",
            base,
            W4A4KV4,
            ["rotate", lrc(args.full_fraction, 1), bisup, {"intactkv": {"pivot": "bos"}}],
        )
    )
    out += lowrank_rows[2:]
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=32, help="first N WikiText-2 test windows")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--bisup-samples", type=int, default=16)
    p.add_argument("--bisup-epochs", type=int, default=4)
    p.add_argument("--bisup-lr", type=float, default=1e-3)
    p.add_argument("--bisup-rank", type=int, default=8)
    p.add_argument(
        "--full-fraction", type=float, default=0.3, help="lowrank rank_fraction of the full recipe"
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: run only rows whose label matches (an entry starting with '=' "
        "must equal the label)",
    )
    p.add_argument("--out", default="table_lowrank_bisup32", help="output stem under results/")
    p.add_argument(
        "--reuse",
        default=None,
        help="a results JSON of an earlier run with the same protocol: rows with the same label and "
        "steps are copied from it instead of recomputed (marked reused_from)",
    )
    return p.parse_args()


def main() -> int:
    import torch

    from qtool.api import versions
    from qtool.data.datasets import calibration_windows
    from qtool.eval.perplexity import eval_token_ids, prefix_ids, window_nll
    from qtool.export.writer import write_checkpoint
    from qtool.models.loading import load_hf_model, resolve_model_path
    from qtool.models.prepare import prepare_model
    from qtool.recipe import Recipe
    from qtool.steps.base import Context

    args = parse_args()
    torch.manual_seed(0)
    base_model, tok = load_hf_model(args.model, "float32", "cpu")
    calib = calibration_windows(tok, "wikitext2", "auto", args.calib_samples, args.calib_seq_len, 0)
    ids = eval_token_ids(tok, "wikitext2", "test")
    total = ids.numel() // args.seq_len
    windows = ids[: total * args.seq_len].view(total, args.seq_len)[: args.limit]
    prefix = prefix_ids(tok, "bos")
    fp_bytes = (Path(resolve_model_path(args.model)) / "model.safetensors").stat().st_size

    def ppl(model) -> float:
        with torch.no_grad():
            nll = [float(window_nll(model, w[None], prefix)[0]) for w in windows]
        return math.exp(sum(nll) / len(nll))

    def write() -> None:
        set_gap_closed(results)
        meta = {
            "model": args.model,
            "data": "wikitext-2-raw-v1 test, rows joined with \\n\\n",
            "seq_len": args.seq_len,
            "windows": len(windows),
            "first_windows": True,
            "prefix": "BOS (unscored) before every window",
            "calibration": f"{args.calib_samples} x {args.calib_seq_len} wikitext2 (train, else validation), seed 0",
            "bisup": {
                "samples": args.bisup_samples,
                "epochs": args.bisup_epochs,
                "lr": args.bisup_lr,
                "rank": args.bisup_rank,
            },
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "versions": versions(),
        }
        out = RESULTS
        out.mkdir(exist_ok=True)
        (out / f"{args.out}.json").write_text(
            json.dumps({"meta": meta, "rows": results}, indent=2, default=str)
        )
        (out / f"{args.out}.md").write_text(markdown(meta, results))

    results = []
    wanted = [s for s in args.only.split(",") if s]
    reuse = {}
    if args.reuse:
        old = json.loads(Path(args.reuse).read_text())
        probe = {
            "model": args.model,
            "seq_len": args.seq_len,
            "windows": args.limit,
            "calibration": f"{args.calib_samples} x {args.calib_seq_len} wikitext2 (train, else validation), seed 0",
        }
        if all(old["meta"].get(k) == v for k, v in probe.items()):
            reuse = {r["label"]: r for r in old["rows"]}
        elif all(old["meta"].get(k) == v for k, v in probe.items() if k != "calibration"):
            # the FP row does not calibrate: same model, windows and seq len are enough
            reuse = {r["label"]: r for r in old["rows"] if not r["steps"]}
            print(f"--reuse {args.reuse}: other calibration, only the FP row reused", file=sys.stderr)
        else:
            print(f"--reuse {args.reuse}: different protocol, nothing reused", file=sys.stderr)
    for label, baseline, scheme, steps in rows(args):
        if label in reuse and json.dumps(reuse[label]["steps"], sort_keys=True) == json.dumps(
            steps, sort_keys=True
        ):
            results.append({**reuse[label], "reused_from": Path(args.reuse).name})
            print(f"{label}: reused from {args.reuse}", file=sys.stderr, flush=True)
            continue
        if wanted and not any(label == s[1:] if s.startswith("=") else s in label for s in wanted):
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(base_model)
        row = {"label": label, "baseline": baseline, "steps": steps, "extra_parameters": 0}
        if scheme is None:
            row.update(checkpoint_bytes=fp_bytes, solve_seconds=0.0)
        else:
            recipe = Recipe.model_validate(
                {
                    "model": args.model,
                    "device": "cpu",
                    "scheme": scheme,
                    "steps": steps,
                    "calibration": {"samples": args.calib_samples, "seq_len": args.calib_seq_len},
                }
            )
            prepare_model(model, recipe.scheme)
            ctx = Context(recipe=recipe, model=model, tokenizer=tok, device=torch.device("cpu"))
            ctx._calibration = calib
            for step in recipe.steps:
                step.apply(ctx)
            row["solve_seconds"] = time.perf_counter() - t0
            row["extra_parameters"] = ctx.results.get("lowrank", {}).get("extra_parameters", 0)
            with tempfile.TemporaryDirectory() as tmp:
                size = write_checkpoint(ctx, Path(tmp) / "ckpt")
            from qtool.export.writer import round_unquantized_

            round_unquantized_(model, ctx.scale_dtype)  # evaluate what the checkpoint holds
            row["checkpoint_bytes"] = size["bytes"]
            row["details"] = {k: v for k, v in ctx.results.items() if k in ("bisup", "lowrank")}
            for d in row["details"].values():
                d.pop("linears", None)
        t1 = time.perf_counter()
        row["ppl"] = ppl(model)
        row["eval_seconds"] = time.perf_counter() - t1
        results.append(row)
        write()
        print(
            f"{label}: ppl {row['ppl']:.3f} ({row['solve_seconds']:.0f}s solve)", file=sys.stderr, flush=True
        )
        del model

    write()
    print((RESULTS / f"{args.out}.md").read_text())
    return 0


def set_gap_closed(rows: list[dict]) -> None:
    """``gap_closed``: the share of the FP gap of each row's baseline that the row closes."""
    fp = next((r["ppl"] for r in rows if r["baseline"] == ""), None)
    by_label = {r["label"]: r for r in rows}
    for r in rows:
        b = by_label.get(r["baseline"])
        r["gap_closed"] = None
        if fp is not None and b is not None and r is not b and b["ppl"] != fp:
            r["gap_closed"] = (b["ppl"] - r["ppl"]) / (b["ppl"] - fp)


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"SmolLM2-135M ({meta['model']}), WikiText-2 test, seq len {meta['seq_len']}, first {meta['windows']} windows, "
        f"{meta['prefix']}; calibration {meta['calibration']}; BiSup on the first "
        f"{meta['bisup']['samples']} calibration windows, {meta['bisup']['epochs']} epochs, lr {meta['bisup']['lr']:g}, "
        f"rank {meta['bisup']['rank']}, other options the step's defaults (holdout 0.25, accept: model, head_loss); "
        f"device {meta['device']} "
        f"({meta['threads']} threads); torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, "
        f"qtool {meta['versions']['qtool']}.",
        "",
        "| recipe | ppl | FP gap closed | extra params | checkpoint | solve time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        extra = f"{r['extra_parameters'] / 1e6:.2f} M" if r["extra_parameters"] else "0"
        lines.append(
            f"| {r['label']} | {r['ppl']:.2f} | {gap} | {extra} | {r['checkpoint_bytes'] / 1e6:.1f} MB | "
            f"{r['solve_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
