"""Data-parallel calibration speed (issue 15): one process vs N processes on this machine.

    python -m scripts.bench.ranks_speed                  # writes results/ranks_speed.{json,md}

Quantizes the SmolLM2 QuaRot recipe (`recipes/smollm2-w4a4kv4-quarot.yaml`, rotate + GPTQ) with its
calibration set to `--calib-samples` x 512 (64 by default), first with one process and one thread,
then with `--nproc N` processes of one thread each (`qtool quantize --nproc N`, i.e. torchrun, gloo),
one after the other, each under `/usr/bin/time -v` (wall time, peak RSS of the launcher's process
tree as time(1) reports it: the largest single process). Then both checkpoints are scored on the
same first `--limit` WikiText-2 test windows (seq len 2048) by `qtool eval`. Run it on an otherwise
idle machine: the N-process run needs N free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from scripts.tables.common import REPO, RESULTS, command


def timed(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"wall_seconds": round(wall, 1), "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--out", default="ranks_speed")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QTOOL_NO_PROGRESS": "1"}
    data = yaml.safe_load((REPO / "recipes/smollm2-w4a4kv4-quarot.yaml").read_text())
    data["calibration"] = {**data["calibration"], "samples": args.calib_samples, "seq_len": 512}
    data.pop("output", None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "quarot.yaml"
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        for n in (1, args.nproc):
            out = Path(tmp) / f"out-{n}"
            cmd = [sys.executable, "-m", "qtool", "quantize", str(recipe), "--output", str(out)]
            if n > 1:
                cmd += ["--nproc", str(n)]
            row = {"processes": n, "threads_per_process": 1, **timed(cmd, env)}
            ev = Path(tmp) / f"eval-{n}.json"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "qtool",
                    "eval",
                    str(out),
                    "--limit",
                    str(args.limit),
                    "--json",
                    str(ev),
                ],
                check=True,
                env=env,
                cwd=REPO,
                capture_output=True,
            )
            row["ppl"] = json.loads(ev.read_text())["rows"][0]["ppl"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    one = rows[0]["wall_seconds"]
    for r in rows:
        r["time_ratio"] = r["wall_seconds"] / one
    from qtool.api import versions

    v = versions()
    meta = {
        "recipe": "recipes/smollm2-w4a4kv4-quarot.yaml",
        "calibration": f"{args.calib_samples} x 512",
        "eval": f"WikiText-2 test, seq len 2048, first {args.limit} windows",
        "machine": f"{os.cpu_count()} cores",
        "versions": v,
        "command": command(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| processes x threads | quantize wall | ratio to 1 process | peak RSS (largest process) | ppl |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} x 1 | {r['wall_seconds']:.0f} s | {r['time_ratio']:.2f} | "
            f"{r['peak_rss_gib']:.2f} GiB | {r['ppl']:.3f} |"
        )
    lines += [
        "",
        f"SmolLM2-135M, {meta['recipe']} (rotate + GPTQ) at calibration {meta['calibration']}; {meta['eval']}; "
        f"CPU ({meta['machine']}), gloo, torch {v['torch']}, transformers {v['transformers']}. Command: `{meta['command']}`",
    ]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
