"""Merge runs of ``table_lowrank_bisup`` (split over processes with ``--only``) into one table.

    python -m scripts.tables.merge_lowrank_runs --out table_lowrank_bisup32 results/lr32_a.json results/lr32_b.json

Every input must have the same protocol (model, seq len, windows, calibration); rows copied from
another run (``reused_from``) are skipped, except the FP row (it does not calibrate; it keeps its
``reused_from`` mark), a label present twice is an error. Rows are ordered as
the table script lists them; the gap closed is recomputed against each row's baseline. No number
is computed here: every ppl comes from the input files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.tables.common import RESULTS
from scripts.tables.table_lowrank_bisup import markdown, set_gap_closed

ORDER = [
    "FP (bf16 weights)",
    "W4A4KV4 rotate + GPTQ",
    "+ lowrank 0.05 (1 it)",
    "+ lowrank 0.1 (1 it)",
    "+ lowrank 0.2 (1 it)",
    "+ lowrank 0.3 (1 it)",
    "+ lowrank 0.05 (3 it)",
    "+ lowrank 0.1 (3 it)",
    "+ lowrank 0.2 (3 it)",
    "+ lowrank 0.3 (3 it)",
    "+ bisup",
    "+ bisup + lowrank 0.3 + IntactKV",
    "W3A3-g128 rotate + GPTQ",
    "W3A3-g128 rotate + GPTQ + bisup",
]
# the W4A4 (16-bit KV) rows go right after FP
A4 = "W4A4 rotate + GPTQ"
ORDER[1:1] = [A4] + [f"{A4} + lowrank {f} ({it} it)" for it in (1, 3) for f in ("0.1", "0.3")]
PROTOCOL = ("model", "seq_len", "windows", "calibration", "prefix")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out", required=True, help="output stem under results/")
    args = p.parse_args()
    meta, rows, seen, bisup = None, [], {}, {}
    for path in args.inputs:
        d = json.loads(path.read_text())
        if meta is None:
            meta = dict(d["meta"])
        elif any(d["meta"].get(k) != meta.get(k) for k in PROTOCOL):
            raise SystemExit(f"{path}: a different protocol from {args.inputs[0]} ({PROTOCOL})")
        for r in d["rows"]:
            if r.get("reused_from") and r["steps"]:
                continue
            if any(isinstance(s, dict) and "bisup" in s for s in r["steps"]):
                bisup[path.name] = d["meta"]["bisup"]
            if r["label"] in seen:
                raise SystemExit(f"{r['label']!r} is in both {seen[r['label']]} and {path}")
            seen[r["label"]] = path
            rows.append({**r, "run": path.name})
    rows.sort(key=lambda r: ORDER.index(r["label"]) if r["label"] in ORDER else len(ORDER))
    set_gap_closed(rows)
    if len({json.dumps(b, sort_keys=True) for b in bisup.values()}) > 1:
        raise SystemExit(f"BiSup rows with different settings: {bisup}")
    if bisup:  # the settings of the runs that gave the BiSup rows
        meta["bisup"] = next(iter(bisup.values()))
    meta["merged_from"] = [p.name for p in args.inputs]
    out = RESULTS
    (out / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    (out / f"{args.out}.md").write_text(markdown(meta, rows))
    print((out / f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
