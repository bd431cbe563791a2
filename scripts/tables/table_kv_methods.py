"""KV-cache methods table (issue 4): WKVQuant (past-only, kv_smooth, cross-block learning),
IntactKV (plain, calibrated) and prompt mixed precision on SmolLM2-135M.

    python -m scripts.tables.table_kv_methods --limit 8      # writes results/table_kv_methods.{json,md}

Table 1: WikiText-2 perplexity, seq len 2048, the same first N windows and a BOS prefix in front
of every window for every row (so rows with and without the IntactKV pivot score the same
tokens). Rows that differ only in a run-time switch share one quantized model:

* "W4KV4 ... KV RTN" and "+ past-only" reuse the W4A16 GPTQ model (GPTQ calibrated with a 16-bit
  KV cache) with the 4-bit KV cache switched on;
* "+ IntactKV-B" rows attach the pivot to the model of the row above;
* "+ calibrated IntactKV" trains that pivot (intactkv ``calibrate``).

Table 2: a fixed multi-turn chat set (tests/data/chat_set.jsonl, written for qtool): mean NLL of
the assistant tokens, every token's KV quantized vs the system prompt's KV kept in 16 bits
(computed by the quantized model itself, BiSup's prompt mixed precision, or by the full-precision
model, IntactKV-P).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scripts.tables.common import REPO, RESULTS, command


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=8, help="first N WikiText-2 test windows")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--calib-samples", type=int, default=16, help="calibration windows (GPTQ, kv_smooth, IntactKV)"
    )
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--learn-epochs", type=int, default=1, help="kv_smooth cross-block learning epochs")
    p.add_argument("--intactkv-steps", type=int, default=16, help="calibrated IntactKV optimizer steps")
    p.add_argument("--intactkv-lr", type=float, default=1e-3)
    p.add_argument("--intactkv-samples", type=int, default=8, help="calibrated IntactKV windows")
    p.add_argument("--intactkv-seq-len", type=int, default=128)
    p.add_argument("--intactkv-batch", type=int, default=2)
    p.add_argument(
        "--gptq-one-pass",
        action="store_true",
        help="GPTQ without true-sequential groups (one Hessian pass per layer; faster on a busy CPU)",
    )
    p.add_argument(
        "--weights",
        choices=["gptq", "rtn"],
        default="gptq",
        help="weight step of every row: the recipes' GPTQ, or RTN with MSE clip search (same grid; "
        "for a CPU too busy for GPTQ's column loop)",
    )
    p.add_argument("--chat", default=str(REPO / "tests" / "data" / "chat_set.jsonl"))
    p.add_argument("--out", default="table_kv_methods", help="output stem under results/")
    return p.parse_args()


def recipe_from(path: str, args, edit=None):
    """A shipped recipe with the table's calibration size, on the CPU, without export."""
    import yaml

    from qtool.recipe import Recipe

    data = yaml.safe_load((REPO / path).read_text())
    data.update(model=args.model, device="cpu", output=None)
    data["calibration"] = {
        **data.get("calibration", {}),
        "samples": args.calib_samples,
        "seq_len": args.calib_seq_len,
    }
    data["steps"] = [s for s in data["steps"] if s != "export"]
    if args.weights == "rtn":
        data["steps"] = [
            {"rtn": {"mse_clip": True}} if isinstance(s, dict) and "gptq" in s else s for s in data["steps"]
        ]
    if args.gptq_one_pass:
        for s in data["steps"]:
            if isinstance(s, dict) and "gptq" in s:
                s["gptq"]["true_sequential"] = False
    if edit:
        edit(data)
    return Recipe.model_validate(data)


def set_kv(model, kv) -> None:
    """Switch the KV-cache quantization of an already quantized model (``kv``: a KVScheme or None)."""
    from qtool.models.adapters import get_adapter

    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        st = adapter.attention(layer).qtool
        st.k_spec = st.v_spec = kv.spec() if kv else None
        st.past_only = bool(kv and kv.past_only)


def chat_nll(model, convs, tok, mode: str, fp=None) -> float:
    """Mean NLL of the assistant tokens; ``mode``: quantized | mixed (own 16-bit system KV) | intactkv-p."""
    from qtool.generate import chat_tokens
    from qtool.models.pivot import compute_prefix_cache

    total, count = 0.0, 0
    for conv in convs:
        ids, n_sys, mask = chat_tokens(tok, conv["messages"])
        with torch.no_grad():
            if mode == "quantized":
                logits, start = model(input_ids=torch.tensor([ids])).logits[0], 0
            else:
                pre = compute_prefix_cache(fp if mode == "intactkv-p" else model, ids[:n_sys])
                cache = pre.as_cache(1, next(model.parameters()).dtype, "cpu")
                logits, start = (
                    model(input_ids=torch.tensor([ids[n_sys:]]), cache=cache, use_cache=True).logits[0],
                    n_sys,
                )
        for pos in range(max(start, 1), len(ids)):
            if mask[pos]:
                lp = torch.log_softmax(logits[pos - 1 - start].float(), -1)[ids[pos]]
                total, count = total - float(lp), count + 1
    return total / count


def main() -> None:
    args = parse_args()
    from qtool.api import run_recipe
    from qtool.eval.perplexity import perplexity
    from qtool.log import setup_logging
    from qtool.models.loading import load_hf_model
    from qtool.recipe import KVScheme
    from qtool.steps.intactkv import CalibrateOptions, IntactKV

    setup_logging()
    wq = "GPTQ" if args.weights == "gptq" else "RTN-mse"
    convs = [json.loads(line) for line in Path(args.chat).read_text().splitlines() if line.strip()]
    rows: list[dict] = []
    chat: list[dict] = []
    t_start = time.perf_counter()
    out = RESULTS
    out.mkdir(exist_ok=True)

    def ppl_row(label: str, model, tok, note: str = "", quantize_s: float = 0.0, group: str = "") -> float:
        res = perplexity(model, tok, "wikitext2", args.seq_len, args.limit, 1, "bos")
        rows.append(
            {
                "label": label,
                "ppl": res.ppl,
                "nll_per_window": res.nll_per_window,
                "eval_s": res.seconds,
                "quantize_s": quantize_s,
                "note": note,
                "group": group,
                "pivot": getattr(getattr(model, "qtool_pivot", None), "token_ids", None),
            }
        )
        print(
            f"{label:<60} ppl {res.ppl:9.4f}  eval {res.seconds:6.0f}s  total {time.perf_counter() - t_start:6.0f}s",
            flush=True,
        )
        write(args, rows, chat, out)
        return res.ppl

    def chat_rows(name: str, model, tok, fp) -> None:
        saved = getattr(model, "qtool_pivot", None)
        model.qtool_pivot = None
        rec = {"model": name}
        for mode in ("quantized", "mixed", "intactkv-p"):
            rec[mode] = chat_nll(model, convs, tok, mode, fp)
        model.qtool_pivot = saved
        chat.append(rec)
        print(f"chat {name}: {rec}", flush=True)
        write(args, rows, chat, out)

    # FP
    fp_model, tok = load_hf_model(args.model, "float32", "cpu")
    ppl_row("FP (float32)", fp_model, tok, group="fp")
    chat.append({"model": "FP (float32)", "quantized": chat_nll(fp_model, convs, tok, "quantized")})
    del fp_model

    # W4A16 GPTQ-g64, then the same weights with a 4-bit KV cache
    t0 = time.perf_counter()
    ctx = run_recipe(recipe_from("recipes/smollm2-w4a16-gptq.yaml", args), export=False)
    q = time.perf_counter() - t0
    ppl_row(
        f"W4A16 {wq}-g64 (reference, 16-bit KV)",
        ctx.model,
        ctx.tokenizer,
        "recipes/smollm2-w4a16-gptq.yaml",
        q,
        "w4a16",
    )
    set_kv(ctx.model, KVScheme(bits=4))
    ppl_row(
        f"W4KV4: {wq}-g64 weights, KV4 RTN (per token/head, asym)",
        ctx.model,
        ctx.tokenizer,
        "same weights as W4A16",
        group="w4kv4",
    )
    set_kv(ctx.model, KVScheme(bits=4, past_only=True))
    ppl_row("W4KV4 + past-only", ctx.model, ctx.tokenizer, "same weights as W4A16", group="w4kv4")
    del ctx

    # + kv_smooth from statistics (GPTQ after the fold)
    def no_learn(d):
        d["steps"] = [("kv_smooth" if isinstance(s, dict) and "kv_smooth" in s else s) for s in d["steps"]]

    t0 = time.perf_counter()
    ctx = run_recipe(recipe_from("recipes/smollm2-w4kv4-wkvquant.yaml", args, no_learn), export=False)
    ppl_row(
        "W4KV4 + past-only + kv_smooth (statistics)",
        ctx.model,
        ctx.tokenizer,
        "kv_smooth without learn",
        time.perf_counter() - t0,
        "w4kv4",
    )
    del ctx

    # full WKVQuant recipe: + learned smoothing with the cross-block loss, then IntactKV-B
    def learn(d):
        for s in d["steps"]:
            if isinstance(s, dict) and "kv_smooth" in s:
                s["kv_smooth"]["learn"].update(
                    samples=args.calib_samples, seq_len=args.calib_seq_len, epochs=args.learn_epochs
                )

    t0 = time.perf_counter()
    ctx = run_recipe(recipe_from("recipes/smollm2-w4kv4-wkvquant.yaml", args, learn), export=False)
    ppl_row(
        "W4KV4 + past-only + kv_smooth learned, cross-block (WKVQuant recipe)",
        ctx.model,
        ctx.tokenizer,
        "recipes/smollm2-w4kv4-wkvquant.yaml",
        time.perf_counter() - t0,
        "w4kv4",
    )
    t0 = time.perf_counter()
    IntactKV().apply(ctx)
    ppl_row(
        "  + IntactKV-B",
        ctx.model,
        ctx.tokenizer,
        "pivot [BOS] from the FP model",
        time.perf_counter() - t0,
        "w4kv4",
    )
    chat_rows("W4KV4 WKVQuant recipe", ctx.model, ctx.tokenizer, ctx.fp_reference())
    del ctx

    # W4A4KV4 rotate + GPTQ, with and without IntactKV-B, calibrated IntactKV
    t0 = time.perf_counter()
    ctx = run_recipe(recipe_from("recipes/smollm2-w4a4kv4-intactkv.yaml", args), export=False)
    q = time.perf_counter() - t0
    pivot = ctx.model.qtool_pivot
    ctx.model.qtool_pivot = None
    ppl_row(
        f"W4A4KV4 rotate + {wq} (BOS recomputed by the quantized model)",
        ctx.model,
        ctx.tokenizer,
        "recipes/smollm2-w4a4kv4-intactkv.yaml without its pivot",
        q,
        "w4a4kv4",
    )
    ctx.model.qtool_pivot = pivot
    ppl_row(
        "  + IntactKV-B", ctx.model, ctx.tokenizer, "recipes/smollm2-w4a4kv4-intactkv.yaml", group="w4a4kv4"
    )
    chat_rows(f"W4A4KV4 rotate + {wq}", ctx.model, ctx.tokenizer, ctx.fp_reference())
    t0 = time.perf_counter()
    cal = CalibrateOptions(
        steps=args.intactkv_steps,
        lr=args.intactkv_lr,
        samples=args.intactkv_samples,
        seq_len=args.intactkv_seq_len,
        batch_size=args.intactkv_batch,
    )
    IntactKV(calibrate=cal).apply(ctx)
    ppl_row(
        "  + calibrated IntactKV-B",
        ctx.model,
        ctx.tokenizer,
        f"{cal.steps} steps, lr {cal.lr}, {cal.samples} x {cal.seq_len}",
        time.perf_counter() - t0,
        "w4a4kv4",
    )
    write(args, rows, chat, out, done=True, seconds=time.perf_counter() - t_start)


def write(args, rows, chat, out: Path, done: bool = False, seconds: float | None = None) -> None:
    from qtool.api import versions

    prov = {
        "model": args.model,
        "data": "wikitext-2-raw-v1 test (rows joined with \\n\\n, tokenized once)",
        "seq_len": args.seq_len,
        "windows": f"first {args.limit}",
        "prefix": "bos (the same tokens scored in every row)",
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens, wikitext2 (mirror: validation split), seed 0",
        "kv_smooth_learn_epochs": args.learn_epochs,
        "gptq_true_sequential": not args.gptq_one_pass,
        "weight_step": "gptq (as in the recipes)"
        if args.weights == "gptq"
        else "rtn with MSE clip search instead of gptq",
        "intactkv_calibration": {
            "steps": args.intactkv_steps,
            "lr": args.intactkv_lr,
            "samples": args.intactkv_samples,
            "seq_len": args.intactkv_seq_len,
            "batch_size": args.intactkv_batch,
        },
        "chat_set": str(Path(args.chat).relative_to(REPO))
        if Path(args.chat).is_relative_to(REPO)
        else args.chat,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "command": command(),
        "complete": done,
        "seconds": seconds,
    }
    by = {r["label"]: r["ppl"] for r in rows}
    fp = by.get("FP (float32)")
    ref = next((v for k, v in by.items() if k.startswith("W4A16 ")), None)
    lines = ["| configuration | ppl | ppl / FP | ppl / W4A16 | notes |", "|---|---:|---:|---:|---|"]
    for r in rows:
        a = f"{r['ppl'] / fp:.3f}" if fp else "-"
        b = f"{r['ppl'] / ref:.3f}" if ref else "-"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {a} | {b} | {r['note']} |")
    checks = []
    for i, r in enumerate(rows):
        if "IntactKV" in r["label"] and i > 0:
            prev = rows[i - 1]
            verdict = "lower" if r["ppl"] < prev["ppl"] else "NOT lower"
            checks.append(
                f"{r['label'].strip()} vs {prev['label'].strip()}: {prev['ppl']:.3f} -> {r['ppl']:.3f} ({verdict})"
            )
    wkv = by.get("W4KV4 + past-only + kv_smooth learned, cross-block (WKVQuant recipe)")
    if wkv and ref:
        checks.append(f"WKVQuant recipe / W4A16 = {wkv / ref:.4f} (target <= 1.03)")
    lines += ["", *[f"- {c}" for c in checks]]
    if chat:
        lines += [
            "",
            "| model (chat set: assistant-token NLL) | all KV quantized | system KV 16-bit (own, BiSup) |"
            " system KV 16-bit (FP model, IntactKV-P) |",
            "|---|---:|---:|---:|",
        ]
        for c in chat:
            f = [f"{c[m]:.4f}" if m in c else "-" for m in ("quantized", "mixed", "intactkv-p")]
            lines.append(f"| {c['model']} | {' | '.join(f)} |")
    lines += [
        "",
        f"{prov['model']}, {prov['data']}, seq len {prov['seq_len']}, {prov['windows']} windows, prefix "
        f"{prov['prefix']}, weights {prov['weight_step']}, calibration {prov['calibration']}, chat set {prov['chat_set']}, {prov['device']} "
        f"({prov['threads']} threads), torch {prov['versions']['torch']}, transformers "
        f"{prov['versions']['transformers']}, qtool {prov['versions']['qtool']}. Command: `{prov['command']}`"
        + ("" if done else " (incomplete: still running or interrupted)"),
    ]
    stem = out / args.out
    stem.with_suffix(".json").write_text(
        json.dumps({"provenance": prov, "rows": rows, "chat": chat, "checks": checks}, indent=2, default=str)
    )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
