"""Where does BiSup's lower block loss go? (issue 5 diagnostic)

    python -m scripts.diagnostics.diag_bisup_hidden     # writes results/diag_bisup_hidden.{json,md}

W4A4KV4 rotate + GPTQ on SmolLM2-135M, then BiSup on a copy. On held-out WikiText-2 windows (not
used in calibration) both models run a full forward next to the rotated full-precision model; per
decoder layer: the relative error of the residual stream (what BiSup's block loss measures, here
through the real forward), then the error after the final norm, the KL of the next-token
distribution and the NLL.
"""

from __future__ import annotations

import argparse
import json
import sys

from scripts.diagnostics.bisup_diag import gptq_base, train_bisup
from scripts.tables.common import RESULTS, command


def main() -> int:
    import torch
    import torch.nn.functional as F

    from qtool.algorithms.bisup import next_token_kl
    from qtool.api import versions
    from qtool.data.datasets import calibration_windows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", default="relative")
    p.add_argument("--heldout", type=int, default=4, help="held-out windows (seed 123)")
    p.add_argument("--out", default="diag_bisup_hidden")
    args = p.parse_args()

    bisup = {
        "samples": args.calib_samples,
        "epochs": args.epochs,
        "lr": args.lr,
        "rank": 8,
        "loss": args.loss,
    }
    base_q = gptq_base(args.model, args.calib_samples, args.calib_seq_len, bisup)
    held = calibration_windows(base_q.tok, "wikitext2", "auto", args.heldout, args.calib_seq_len, 123)
    base, fp_rot = base_q.model, base_q.fp_rot
    trained, tctx, _ = train_bisup(base_q, base_q.calib)

    @torch.no_grad()
    def forward(m, ids):
        out = m(ids, output_hidden_states=True)
        return out.hidden_states, out.logits.float()

    rows = {}
    with torch.no_grad():
        ref = [forward(fp_rot, w[None]) for w in held]
        final_norm = fp_rot.model.norm
        for label, m in (("W4A4KV4 rotate + GPTQ", base), ("+ bisup", trained)):
            per_layer = None
            normed, kl, nll = [], [], []
            for (h_ref, lg_ref), w in zip(ref, held, strict=True):
                h, lg = forward(m, w[None])
                errs = [
                    float(((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean())
                    for a, b in zip(h[1:], h_ref[1:], strict=True)
                ]
                per_layer = (
                    errs if per_layer is None else [x + y for x, y in zip(per_layer, errs, strict=True)]
                )
                a, b = final_norm(h[-1]), final_norm(h_ref[-1])
                normed.append(float(((a - b).pow(2).sum(-1) / b.pow(2).sum(-1)).mean()))
                lp, lq = F.log_softmax(lg_ref[0], -1), F.log_softmax(lg[0], -1)
                kl.append(float(next_token_kl(lp, lq)))
                nll.append(float(F.cross_entropy(lg[0, :-1], w[1:])))
            n = len(held)
            rows[label] = {
                "hidden_rel_err_per_layer": [x / n for x in per_layer],
                "final_normed_rel_err": sum(normed) / n,
                "kl_fp_to_quant": sum(kl) / n,
                "nll": sum(nll) / n,
            }
            print(
                label, {k: v for k, v in rows[label].items() if k != "hidden_rel_err_per_layer"}, flush=True
            )
    blocks = tctx.results["bisup"]["blocks"]
    meta = {
        "model": args.model,
        "calibration": f"{args.calib_samples} x {args.calib_seq_len} wikitext2 (train, else validation), seed 0",
        "held_out": f"{args.heldout} x {args.calib_seq_len} wikitext2 (train, else validation), seed 123",
        "bisup": bisup,
        "versions": versions(),
    }
    out = RESULTS
    (out / f"{args.out}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "bisup_blocks": blocks}, indent=2)
    )
    b, t = rows["W4A4KV4 rotate + GPTQ"], rows["+ bisup"]
    lines = [
        f"SmolLM2-135M W4A4KV4 rotate + GPTQ, then BiSup {bisup}; calibration {meta['calibration']}; "
        f"held out {meta['held_out']}; full forward vs the rotated FP model; cpu, torch {meta['versions']['torch']}. "
        f"Command: `{command()}`",
        "",
        "| quantity | rotate + GPTQ | + bisup | bisup's own block loss (runner, calibration) before -> after |",
        "|---|---:|---:|---:|",
    ]
    for i, (x, y) in enumerate(
        zip(b["hidden_rel_err_per_layer"], t["hidden_rel_err_per_layer"], strict=True)
    ):
        if i % 5 == 4 or i == 0:
            blk = blocks[f"layers.{i}"]
            lines.append(
                f"| residual rel. error after layer {i} | {x:.4f} | {y:.4f} | "
                f"{blk['loss_before']:.4f} -> {blk['loss_after']:.4f} |"
            )
    for k in ("final_normed_rel_err", "kl_fp_to_quant", "nll"):
        lines.append(f"| {k} | {b[k]:.4f} | {t[k]:.4f} | |")
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
