"""Effect of storing KV scales in float16 (as the int4 cache does) on the simulated perplexity.

    python -m scripts.diagnostics.kv_scale_dtype_effect --limit 4

Since the int4 KV cache landed in generation, qtool's fake-quant KV path rounds its per-token
scales to float16 (``qtool.models.attention.KV_SCALE_DTYPE``); tables measured before used float32
scales. This script evaluates the same quantized models both ways on the same windows and writes
``results/kv_scale_dtype_effect.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from scripts.tables.common import RESULTS, command

SCHEMES = {
    "W4KV4 RTN (g64 weights, KV per token/head asym)": {
        "scheme": {"weights": {"bits": 4, "group_size": 64}, "kv_cache": {"bits": 4}},
        "steps": ["rtn"],
    },
    "W4KV4 RTN + past-only": {
        "scheme": {"weights": {"bits": 4, "group_size": 64}, "kv_cache": {"bits": 4, "past_only": True}},
        "steps": ["rtn"],
    },
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--limit", type=int, default=4)
    args = p.parse_args()
    import torch

    import qtool.models.attention as attention
    from qtool.api import run_recipe, versions
    from qtool.eval.perplexity import perplexity
    from qtool.recipe import Recipe

    rows = []
    for label, body in SCHEMES.items():
        ctx = run_recipe(Recipe.model_validate({"model": args.model, "device": "cpu", **body}), export=False)
        res = {}
        for name, dt in (("float32", None), ("float16", torch.float16)):
            attention.KV_SCALE_DTYPE = dt
            res[name] = perplexity(ctx.model, ctx.tokenizer, "wikitext2", 2048, args.limit).ppl
        attention.KV_SCALE_DTYPE = torch.float16
        rows.append({"label": label, **res, "relative_change": res["float16"] / res["float32"] - 1})
        print(rows[-1], flush=True)
    meta = {
        "model": args.model,
        "data": "wikitext-2-raw-v1 test",
        "seq_len": 2048,
        "windows": f"first {args.limit}",
        "device": "cpu",
        "versions": versions(),
        "command": command(),
    }
    out = RESULTS
    (out / "kv_scale_dtype_effect.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| model | ppl, float32 KV scales | ppl, float16 KV scales | change |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['label']} | {r['float32']:.4f} | {r['float16']:.4f} | {100 * r['relative_change']:+.3f}% |"
        for r in rows
    ]
    lines += [
        "",
        f"{args.model}, WikiText-2 test, 2048, {meta['windows']} windows, cpu. Command: `{meta['command']}`",
    ]
    (out / "kv_scale_dtype_effect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
