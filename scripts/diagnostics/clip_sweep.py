"""Activation / KV clip-ratio sensitivity of a quantized checkpoint (issue 3).

    python -m scripts.diagnostics.clip_sweep CHECKPOINT --limit 4 --act 0.8,0.85,0.9,0.95,1.0 --kv 0.9,0.95,1.0

The clip ratios of dynamic per-token activation and KV quantization are run-time settings (the
weights do not depend on them), so one GPTQ run can be evaluated at several. Rows vary the
activation clip at the checkpoint's KV clip, then the KV clip at the best activation clip.
Writes ``results/clip_sweep.{json,md}``. WikiText-2 test, seq len 2048, the first N windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from scripts.tables.common import RESULTS, command


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--act", default="0.8,0.85,0.9,0.95,1.0")
    p.add_argument("--kv", default="0.9,0.95,1.0")
    p.add_argument("--out", default="clip_sweep")
    args = p.parse_args()

    import torch

    from qtool.api import load, versions
    from qtool.eval.perplexity import perplexity
    from qtool.models.adapters import get_adapter
    from qtool.models.prepare import iter_qlinears

    model, tok, info = load(args.checkpoint, "float32", "cpu", "off")
    adapter = get_adapter(model.config)
    states = [adapter.attention(layer).qtool for layer in adapter.layers(model)]
    lins = [lin for _, _, lin in iter_qlinears(model) if lin.act_spec is not None]
    base_act = lins[0].act_spec.clip_ratio if lins else None
    base_kv = states[0].k_spec.clip_ratio if states[0].k_spec is not None else None

    def set_clips(act: float | None, kv: float | None) -> None:
        for lin in lins:
            lin.act_spec = dataclasses.replace(lin.act_spec, clip_ratio=act)
        for st in states:
            if st.k_spec is not None:
                st.k_spec = dataclasses.replace(st.k_spec, clip_ratio=kv)
                st.v_spec = dataclasses.replace(st.v_spec, clip_ratio=kv)

    rows: list[dict] = []

    def run(act, kv) -> float:
        set_clips(act, kv)
        res = perplexity(model, tok, "wikitext2", args.seq_len, args.limit, 1, "none")
        rows.append({"act_clip": act, "kv_clip": kv, "ppl": res.ppl, "eval_s": res.seconds})
        print(f"act {act} kv {kv}: ppl {res.ppl:.3f}", flush=True)
        return res.ppl

    if lins:
        for a in (float(x) for x in args.act.split(",")):
            run(a, base_kv)
        best_act = min(rows, key=lambda r: r["ppl"])["act_clip"]
    else:
        best_act = None
    if base_kv is not None:
        for k in (float(x) for x in args.kv.split(",")):
            if k != base_kv or not lins:
                run(best_act, k)
    meta = {
        "checkpoint": args.checkpoint,
        "scheme": info.get("scheme"),
        "checkpoint_clips": {"act": base_act, "kv": base_kv},
        "data": "wikitext-2-raw-v1 test",
        "seq_len": args.seq_len,
        "windows": f"first {args.limit}",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "command": command(),
    }
    out = RESULTS
    out.mkdir(exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = ["| activation clip | KV clip | ppl |", "|---:|---:|---:|"]
    lines += [f"| {r['act_clip']} | {r['kv_clip']} | {r['ppl']:.3f} |" for r in rows]
    lines += [
        "",
        f"{meta['checkpoint']} ({meta['scheme']}), WikiText-2 test, seq len {args.seq_len}, "
        f"{meta['windows']} windows, cpu, torch {meta['versions']['torch']}. Command: `{meta['command']}`",
    ]
    (out / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
