"""Merge the runs of ``table_lowrank_bisup.py`` into results/table_lowrank_bisup.{json,md}.

    python scripts/merge_lowrank_runs.py

Rows come from results/table_lowrank_bisup_run1.json (FP, rotate + GPTQ, lowrank rows), the
plain-MSE BiSup run (results/table_lr_bisup_mse.json, relabelled) and the ``--reuse`` reruns
results/table_lr_{bisup,w3bisup,full}.json (their reused rows skipped); the gap closed is
recomputed against each row's baseline. No number is computed here.
"""

import json
import sys
from pathlib import Path

R = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(R / "scripts"))
from table_lowrank_bisup import markdown  # noqa: E402

base = json.loads((R / "results/table_lowrank_bisup_run1.json").read_text())
rows = list(base["rows"])


def add(path, labels, rename=None):
    d = json.loads(Path(path).read_text())
    for r in d["rows"]:
        if r["label"] in labels and not r.get("reused_from"):
            r = dict(r)
            if rename:
                r["label"] = rename(r["label"])
            r["run"] = Path(path).name
            rows.append(r)


add(R / "results/table_lr_bisup_mse.json", {"+ bisup"}, lambda label: label + " (plain-MSE loss, superseded)")
for stem in ("table_lr_bisup", "table_lr_w3bisup", "table_lr_full"):
    p = R / "results" / f"{stem}.json"
    if p.exists():
        add(p, {r["label"] for r in json.loads(p.read_text())["rows"]})
order = [
    "FP (bf16 weights)",
    "W4A4KV4 rotate + GPTQ",
    "+ lowrank 0.1 (1 it)",
    "+ lowrank 0.3 (1 it)",
    "+ bisup",
    "+ bisup (plain-MSE loss, superseded)",
    "W3A3-g128 rotate + GPTQ",
    "W3A3-g128 rotate + GPTQ + bisup",
]
rows.sort(key=lambda r: order.index(r["label"]) if r["label"] in order else 99)
fp = next(r["ppl"] for r in rows if r["baseline"] == "")
by = {r["label"]: r for r in rows}
for r in rows:
    b = by.get(r["baseline"])
    r["gap_closed"] = None
    if b is not None and r is not b and b["ppl"] != fp:
        r["gap_closed"] = (b["ppl"] - r["ppl"]) / (b["ppl"] - fp)
meta = base["meta"]
(R / "results/table_lowrank_bisup.json").write_text(
    json.dumps({"meta": meta, "rows": rows}, indent=2, default=str)
)
(R / "results/table_lowrank_bisup.md").write_text(markdown(meta, rows))
print(markdown(meta, rows))
