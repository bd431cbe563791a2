"""Does a layer's low-rank correction generalize? Train vs held-out output error (issue 5).

    python -m scripts.diagnostics.lowrank_heldout --layer 5     # writes results/lowrank_heldout.{json,md}
    python -m scripts.diagnostics.lowrank_heldout --calib 8x512,32x512,128x512   # the README's run

SmolLM2-135M, rotated (``rotate``, W4A4KV4 scheme: weights 4-bit per channel, activations
per-token 4-bit clip 0.9); the full-precision model up to the layer (no earlier layer quantized,
to isolate one solve). For ``q_proj`` and ``down_proj`` of one decoder layer the statistics of
the inputs are collected on calibration windows (seed 0) of two sizes and on held-out windows
(seed 123, validation split: independent random windows, not guaranteed disjoint), and :func:`qtool.algorithms.lowrank.lowrank_solve`
is run at several rank fractions, for each solver variant (``--variants``, ``init/cross_shrink``:
``zero/1.0`` is the solver before issue 13, bit for bit; ``closed_form/auto`` the default now; a third part ``/3`` sets ``iterations``, default 1),
next to plain GPTQ (rank 0, no cross term: what the W4A4 rotate + GPTQ row does). The table
reports the output error ``|W X - W^ Q(X) - U V^T X|^2 / |W X|^2`` on the calibration windows
(what the solver minimizes) and on the held-out ones (what the model sees), and the held-out
reduction against plain GPTQ.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from scripts.tables.common import RESULTS, command
from scripts.tables.table_lowrank_bisup import W4A4KV4  # the same scheme as the table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--linears", default="q_proj,down_proj")
    p.add_argument("--calib", default="8x256,32x512", help="calibration sizes, samples x seq_len")
    p.add_argument("--heldout", default="8x512")
    p.add_argument("--fractions", default="0,0.1,0.3")
    p.add_argument(
        "--variants",
        default="zero/1.0,closed_form/auto",
        help="comma-separated init/cross_shrink[/iterations] of lowrank_solve (iterations default 1)",
    )
    p.add_argument("--out", default="lowrank_heldout", help="output stem under results/")
    args = p.parse_args()

    from qtool.algorithms.lowrank import LowRankStats, lowrank_objective, lowrank_solve, rank_for_fraction
    from qtool.api import versions
    from qtool.data.datasets import calibration_windows
    from qtool.models.adapters import get_adapter
    from qtool.models.loading import load_hf_model
    from qtool.models.prepare import prepare_model
    from qtool.recipe import Recipe
    from qtool.steps.base import Context

    model, tok = load_hf_model(args.model, "float32", "cpu")
    recipe = Recipe.model_validate(
        {"model": args.model, "device": "cpu", "scheme": W4A4KV4, "steps": ["rotate", "rtn"]}
    )
    prepare_model(model, recipe.scheme)
    ctx = Context(recipe=recipe, model=model, tokenizer=tok, device=torch.device("cpu"))
    recipe.steps[0].apply(ctx)  # rotate only: weights stay full precision
    adapter = get_adapter(model.config)
    layer = adapter.layers(model)[args.layer]
    names = args.linears.split(",")
    spec = recipe.scheme.weights.spec()

    def size(s: str) -> tuple[int, int]:
        n, L = s.split("x")
        return int(n), int(L)

    @torch.no_grad()
    def stats_for(ids: torch.Tensor) -> dict[str, LowRankStats]:
        st = {n: LowRankStats() for n in names}
        hooks = []
        for n in names:
            lin = adapter.linear(layer, n)

            def hook(mod, a, n=n, lin=lin):
                x = lin.prepare_input(a[0])
                st[n].add(x, lin.quantize_input(x))

            hooks.append(lin.register_forward_pre_hook(hook))
        for i in range(0, ids.shape[0], 8):
            model(input_ids=ids[i : i + 8], logits_to_keep=1)
        for h in hooks:
            h.remove()
        return st

    def rel(W, Wq, U, V, st) -> float:
        zero = lowrank_objective(W, torch.zeros_like(W), U[:, :0], V[:, :0], st)
        return lowrank_objective(W, Wq, U, V, st) / zero

    hn, hl = size(args.heldout)
    held = stats_for(calibration_windows(tok, "wikitext2", "auto", hn, hl, 123))
    rows = []
    for c in args.calib.split(","):
        n, L = size(c)
        cal = stats_for(calibration_windows(tok, "wikitext2", "auto", n, L, 0))
        for name in names:
            W = adapter.linear(layer, name).weight.data.float()
            gptq_kwargs = {"act_order": True, "mse_clip": True}
            # plain GPTQ: rank 0 and no cross term, i.e. GPTQ on W with the Hessian of Q(X)
            plain = lowrank_solve(W, cal[name], spec, 0, cross_shrink=0.0, gptq_kwargs=gptq_kwargs)
            plain_held = rel(W, plain.weight, plain.U, plain.V, held[name])
            runs = [("plain GPTQ", 0.0, "zero", 0.0, "1")] + [
                (v, float(f), *(v.split("/") + ["1"])[:3])
                for v in args.variants.split(",")
                for f in args.fractions.split(",")
            ]
            for variant, f, init, shrink, its in runs:
                k = rank_for_fraction(*W.shape, f)
                shrink = shrink if shrink == "auto" else float(shrink)
                res = (
                    plain
                    if variant == "plain GPTQ"
                    else lowrank_solve(
                        W,
                        cal[name],
                        spec,
                        k,
                        iterations=int(its),
                        init=init,
                        cross_shrink=shrink,
                        gptq_kwargs=gptq_kwargs,
                    )
                )
                held_err = rel(W, res.weight, res.U, res.V, held[name])
                row = {
                    "calibration": c,
                    "tokens": n * L,
                    "linear": name,
                    "width": W.shape[1],
                    "variant": variant,
                    "rank_fraction": f,
                    "rank": k,
                    "train_rel_error": rel(W, res.weight, res.U, res.V, cal[name]),
                    "heldout_rel_error": held_err,
                    "heldout_reduction_vs_gptq": 1.0 - held_err / plain_held,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    meta = {
        "model": args.model,
        "layer": args.layer,
        "scheme": "rotate, W4 per-channel sym (GPTQ act-order, MSE clip), A4 per-token clip 0.9",
        "heldout": f"{args.heldout} wikitext2 (mirror: validation), seed 123",
        "calibration_seed": 0,
        "device": "cpu",
        "versions": versions(),
        "command": command(),
    }
    out = RESULTS
    out.mkdir(exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = [
        "| calibration | linear (width) | solver (init/cross_shrink[/iterations]) | rank fraction (rank) | error on calibration "
        "| error held out | held-out reduction vs GPTQ |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['calibration']} ({r['tokens']} tokens) | {r['linear']} ({r['width']}) | {r['variant']} | "
            f"{r['rank_fraction']:g} ({r['rank']}) | {r['train_rel_error']:.4f} | {r['heldout_rel_error']:.4f} | "
            f"{100 * r['heldout_reduction_vs_gptq']:.1f}% |"
        )
    lines += [
        "",
        f"{meta['model']} layer {meta['layer']}, {meta['scheme']}; relative output error "
        f"|WX - W^Q(X) - UV^T X|^2 / |WX|^2; held out: {meta['heldout']}; {meta['device']}, torch "
        f"{meta['versions']['torch']}. Command: `{meta['command']}`",
    ]
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
