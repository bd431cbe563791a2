"""Does BiSup's block-wise training transfer to the evaluation protocol? (issue 5 diagnostic)

    python -m scripts.diagnostics.diag_bisup_protocol     # writes results/diag_bisup_protocol.{json,md}

One W4A4KV4 rotate + GPTQ model (SmolLM2-135M, calibration N x L WikiText-2 windows), then BiSup on
copies of it: trained on the plain calibration windows, and on the same windows with a BOS in front
(BOS + L-1 tokens, as the evaluation's BOS prefix and every chat prompt start). Each model is scored
under four protocols, on the first windows of the WikiText-2 test split: seq len 2048 and 512, with
and without an unscored BOS prefix. A training objective that transfers lowers every column.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from scripts.diagnostics.bisup_diag import gptq_base, train_bisup
from scripts.tables.common import RESULTS, command


def main() -> int:
    import torch

    from qtool.api import versions
    from qtool.eval.perplexity import eval_token_ids, prefix_ids, window_nll
    from qtool.export.writer import round_unquantized_

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--windows-512", type=int, default=8)
    p.add_argument("--out", default="diag_bisup_protocol")
    args = p.parse_args()

    bisup = {"samples": args.calib_samples, "epochs": args.epochs, "lr": args.lr, "rank": 8}
    t0 = time.perf_counter()
    base = gptq_base(args.model, args.calib_samples, args.calib_seq_len, bisup)
    tok, calib = base.tok, base.calib
    bos = torch.full((calib.shape[0], 1), tok.bos_token_id, dtype=calib.dtype)
    calib_bos = torch.cat([bos, calib[:, :-1]], dim=1)
    models = {"W4A4KV4 rotate + GPTQ": (base.model, base.ctx, base.seconds)}
    for label, windows in (("+ bisup (plain windows)", calib), ("+ bisup (BOS-first windows)", calib_bos)):
        models[label] = train_bisup(base, windows)
        print(f"{label}: trained in {models[label][2]:.0f}s", file=sys.stderr, flush=True)

    ids = eval_token_ids(tok, "wikitext2", "test")
    protocols = [(2048, "none", args.windows_2048), (2048, "bos", args.windows_2048)]
    protocols += [(512, "none", args.windows_512), (512, "bos", args.windows_512)]
    rows = []
    for label, (m, ctx, secs) in models.items():
        round_unquantized_(m, ctx.scale_dtype)
        row = {"label": label, "solve_seconds": secs, "ppl": {}}
        for L, prefix, n in protocols:
            w = ids[: (ids.numel() // L) * L].view(-1, L)[:n]
            with torch.no_grad():
                nll = [float(window_nll(m, x[None], prefix_ids(tok, prefix))[0]) for x in w]
            row["ppl"][f"{L}/{prefix}/{n}"] = math.exp(sum(nll) / len(nll))
        if "bisup" in ctx.results:
            blocks = ctx.results["bisup"]["blocks"]
            row["holdout_loss_before_after_last_block"] = [
                blocks[max(blocks, key=lambda k: int(k.split(".")[1]))][k]
                for k in ("holdout_before", "holdout_after")
            ]
        rows.append(row)
        print(label, row["ppl"], file=sys.stderr, flush=True)

    meta = {
        "model": args.model,
        "data": "wikitext-2-raw-v1 test, rows joined with \\n\\n; first windows of each length",
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} wikitext2 (train, else validation), seed 0",
        "bisup": bisup,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "wall_seconds": time.perf_counter() - t0,
    }
    out = RESULTS
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = list(rows[0]["ppl"])
    lines = [
        f"SmolLM2-135M W4A4KV4 (rotate + GPTQ, per-channel W4, A4 per token clip 0.9, KV4 asym clip 0.95); "
        f"calibration {meta['calibration']}; BiSup {bisup}; WikiText-2 test ppl, column = "
        f"seq len / prefix / first windows; cpu, torch {meta['versions']['torch']}. "
        f"Command: `{command()}`",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['ppl'][k]:.2f}" for k in keys) + " |")
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
