"""The CI-users table (issue 16): SmolLM2 FP / W4A16 GPTQ / W4A4KV4 QuaRot through `qtool eval`.

    python -m scripts.tables.table_ci_eval          # writes results/table_ci_eval.{json,md}

Quantizes the shipped recipes `recipes/smollm2-w4a16-gptq.yaml` and
`recipes/smollm2-w4a4kv4-quarot.yaml` with `qtool quantize` (checkpoints under `--work`, outside the
repository; an existing checkpoint there is reused, so a cut run continues), then runs the real CLI
twice on the three targets, as a CI job would:

* `qtool eval smollm2-135m W4A16 QUAROT --ppl wikitext2 --limit 32 --json ...`: WikiText-2 test,
  seq len 2048, the first 32 windows, the same windows for every row;
* `qtool eval smollm2-135m W4A16 QUAROT --tasks qtool_mc --include-path tests/data/lm_eval_tasks
  --json ...`: the local 40-question multiple-choice task (every document), through lm-eval.

Both JSON reports are kept beside the table (`results/table_ci_eval.ppl.json`, `.tasks.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scripts.tables.common import REPO, RESULTS, command

RECIPES = {
    "W4A16 GPTQ-g64": "recipes/smollm2-w4a16-gptq.yaml",
    "W4A4KV4 QuaRot (rotate + GPTQ)": "recipes/smollm2-w4a4kv4-quarot.yaml",
}


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "QTOOL_NO_PROGRESS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env)
    if res.returncode != 0:
        raise SystemExit(f"command failed with status {res.returncode}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", default="/tmp/qtool-ci-eval", help="folder for the checkpoints (outside the repo)"
    )
    p.add_argument("--limit", type=int, default=32, help="WikiText-2 windows")
    p.add_argument("--out", default="table_ci_eval", help="output stem under results/")
    args = p.parse_args()
    qtool = [sys.executable, "-m", "qtool"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    targets, quantize_s = ["smollm2-135m"], {}
    for label, recipe in RECIPES.items():
        out = work / Path(recipe).stem
        if not (out / "qtool.json").is_file():
            quantize_s[label] = run([*qtool, "quantize", recipe, "--output", str(out), "--overwrite"])
        targets.append(str(out))
    ppl_json, task_json = RESULTS / f"{args.out}.ppl.json", RESULTS / f"{args.out}.tasks.json"
    run([*qtool, "eval", *targets, "--ppl", "wikitext2", "--limit", str(args.limit), "--json", str(ppl_json)])
    run(
        [
            *qtool,
            "eval",
            *targets,
            "--tasks",
            "qtool_mc",
            "--include-path",
            "tests/data/lm_eval_tasks",
            "--json",
            str(task_json),
        ]
    )
    ppl_rows = json.loads(ppl_json.read_text())["rows"]
    task_rows = json.loads(task_json.read_text())["rows"]
    labels = ["FP (float32)", *RECIPES]
    lines = [
        "| model | WikiText-2 ppl | ppl / FP | qtool_mc acc | weights on disk |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, pr, tr in zip(labels, ppl_rows, task_rows, strict=True):
        task = tr["tasks"]["qtool_mc"]
        acc = f"{task['metrics']['acc']:.3f} ± {task['stderr']['acc']:.3f}"
        size = pr.get("weights_bytes")
        size_s = f"{size / 1e6:.1f} MB" if size else "-"
        lines.append(
            f"| {label} | {pr['ppl']:.3f} | {pr['ppl'] / ppl_rows[0]['ppl']:.3f} | {acc} | {size_s} |"
        )
    v = ppl_rows[0].get("versions", {})
    lines += [
        "",
        f"SmolLM2-135M-Instruct; WikiText-2 test (rows joined with \\n\\n), seq len 2048, first {args.limit} "
        "windows, no prefix; qtool_mc: tests/data/lm_eval_tasks (40 questions, 0-shot, every document), "
        f"lm-eval {task_rows[0].get('lm_eval', {}).get('lm_eval', '?')}; recipes as shipped (calibration 128 x 512, seed 0); "
        f"cpu, torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}. Command: `{command()}`",
    ]
    if quantize_s:
        lines.append(
            "Quantize wall time this run: " + ", ".join(f"{k} {s:.0f} s" for k, s in quantize_s.items())
        )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
