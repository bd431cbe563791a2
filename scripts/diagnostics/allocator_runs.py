"""Peak memory and time of the same `qtool quantize` run under glibc's default allocator settings and
under the ones qtool's command line sets for itself (qtool/allocator.py), a few runs of each.

    python -m scripts.diagnostics.allocator_runs --runs 3

Each round starts two runs at the same time, one per core (``taskset``), one thread each: one with
``QTOOL_MALLOC=default`` (glibc's defaults), one as qtool starts by itself; the next round swaps the
cores. Every run is the whole process under ``/usr/bin/time -v`` (imports, load, calibration, export).
The recipe (default) is the side-by-side W4A4 rotate + GPTQ recipe of ``scripts.bench.vs_llmcompressor``
with its calibration tokenized by qtool itself. Writes ``results/<out>.{json,md}``. Run it with the
machine otherwise idle: the two runs of a round share nothing but the memory bus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.vs_llmcompressor import (
    RESULTS,
    allocator_env,
    parse_time_v,
    pinned_and_timed,
    qtool_recipe,
)

SETTINGS = ("default", "qtool")


def run(setting: str, core: int, recipe: Path, out: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "QTOOL_MALLOC")}
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", QTOOL_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false"
    )
    if setting == "default":
        env["QTOOL_MALLOC"] = "default"
    cmd = pinned_and_timed(
        core, sys.executable, "-m", "qtool", "quantize", str(recipe), "--output", str(out), "--overwrite"
    )
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def render(data: dict) -> str:
    md = [
        f"`qtool quantize` of {data['recipe_name']} ({data['model']}, calibration {data['calib']}), "
        f"{data['runs']} runs per setting, one thread each, two runs at a time (one per core); {data['machine']}.",
        "",
        "| setting | GLIBC_TUNABLES | peak RSS GiB per run | min / max | wall s per run | CPU s per run |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        rows = [r for r in data["rows"] if r["setting"] == s and r.get("peak_rss_gb")]
        if not rows:
            continue
        peaks = [r["peak_rss_gb"] for r in rows]
        md.append(
            f"| {s} | `{rows[0].get('glibc_tunables') or 'glibc defaults'}` | "
            + ", ".join(f"{p:.2f}" for p in peaks)
            + f" | {min(peaks):.2f} / {max(peaks):.2f} | "
            + ", ".join(f"{r['wall_seconds']:.0f}" for r in rows)
            + " | "
            + ", ".join(f"{r['cpu_seconds']:.0f}" for r in rows)
            + " |"
        )
    md += ["", f"Versions: {json.dumps(data['versions'])}.", f"Command: `{data['command']}`"]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w4a4-rot", help="a recipe name of scripts.bench.vs_llmcompressor")
    p.add_argument("--runs", type=int, default=3, help="runs per setting")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", default="allocator_runs")
    args = p.parse_args()

    from qtool.api import versions
    from qtool.models.loading import resolve_model_path
    from scripts.tables.common import command

    model_path = resolve_model_path(args.model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="qtool_alloc_") as tmp:
        root = Path(tmp)
        recipe = root / "recipe.yaml"
        recipe.write_text(
            qtool_recipe(args.recipe, model_path, args.calib_samples, args.calib_seq_len, 0, True)
        )
        for k in range(args.runs):
            pair = SETTINGS if k % 2 == 0 else SETTINGS[::-1]  # each setting on both cores
            procs = []
            for core, setting in enumerate(pair):
                log = root / f"{setting}-{k}.log"
                procs.append(
                    (setting, core, log, run(setting, core, recipe, root / f"out-{setting}-{k}", log))
                )
            for setting, core, log, proc in procs:
                code = proc.wait()
                text = log.read_text(errors="replace")
                row = {"setting": setting, "run": k, "core": core, "exit_status": code, **parse_time_v(text)}
                row["glibc_tunables"] = allocator_env(setting == "qtool").get("GLIBC_TUNABLES")
                if code != 0:
                    row["error_tail"] = [ln for ln in text.splitlines() if ln.strip()][-8:]
                rows.append(row)
                print(json.dumps(row), flush=True)
    data = {
        "model": args.model,
        "recipe_name": args.recipe,
        "calib": f"{args.calib_samples} x {args.calib_seq_len} WikiText-2",
        "runs": args.runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(),
        "command": command(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{args.out}.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
