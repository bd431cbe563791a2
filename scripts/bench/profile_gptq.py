"""Where a qtool GPTQ run spends its time: py-spy samples of `qtool quantize`, summed per function.

    python -m scripts.bench.profile_gptq                       # W4A16 g64 GPTQ, 16 x 512 calibration
    python -m scripts.bench.profile_gptq --samples 64 --act-order off

Runs ``py-spy record --function --format raw`` (installed in ``.venv`` by the ``dev`` extra's
environment; ``pip install py-spy`` otherwise) on one ``qtool quantize`` process pinned to one core
with one thread, then sums the collapsed stacks two ways: **self** time (the innermost Python
function of each sample: where the interpreter was, C calls such as torch ops count to the Python
function that made them) and **inclusive** time (every function on the stack, once per sample).
Writes ``results/<out>.{json,md}`` (top ``--top`` of each) and keeps the raw profile in
``out/<out>.raw.txt`` (not committed; flamegraph.pl input). Nothing in qtool changes: this only observes.
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
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def recipe_text(args) -> str:
    return (
        f"model: {args.model}\ndtype: float32\ndevice: cpu\nseed: 0\n"
        f"calibration: {{dataset: wikitext2, split: auto, samples: {args.samples}, seq_len: {args.seq_len}, seed: 0}}\n"
        f"scheme: {{preset: W4A16, weights: {{bits: 4, symmetric: true, group_size: {args.group_size}}}}}\n"
        "steps:\n"
        f"  - gptq: {{block_size: 128, damp: 0.01, act_order: {str(args.act_order == 'on').lower()}, "
        "mse_clip: false}\n"
        "  - export: {format: compressed-tensors}\n"
    )


def short(frame: str) -> str:
    """``func (path/to/file.py:line)`` -> ``file.py:func``, with the package folder for qtool files."""
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    parts = path.split("/")
    where = path if path.startswith("qtool/") else "/".join(parts[-2:])
    return f"{where}:{m.group('func')}"


def summarize(raw: str) -> dict:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return {"samples": total, "self": self_t, "inclusive": incl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", choices=["on", "off"], default="on")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--core", type=int, default=0, help="taskset core")
    p.add_argument("--out", default="profile_gptq_w4a16")
    args = p.parse_args()
    pyspy = Path(sys.executable).with_name("py-spy")
    if not pyspy.is_file():
        p.error(f"{pyspy} not found: `{sys.executable} -m pip install py-spy`")
    mirror = REPO.parent / "shared" / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QTOOL_NO_PROGRESS": "1"}
    if "QTOOL_DATA_DIR" not in env and mirror.is_dir():
        env["QTOOL_DATA_DIR"] = str(mirror)
    RESULTS.mkdir(exist_ok=True)
    raw_path = REPO / "out" / f"{args.out}.raw.txt"
    raw_path.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        recipe = Path(tmp) / "gptq.yaml"
        recipe.write_text(recipe_text(args))
        cmd = [
            "taskset",
            "-c",
            str(args.core),
            str(pyspy),
            "record",
            "--function",
            "--format",
            "raw",
            "--rate",
            str(args.rate),
            "-o",
            str(raw_path),
            "--",
            str(Path(sys.executable).with_name("qtool")),
            "quantize",
            str(recipe),
            "--output",
            str(Path(tmp) / "out"),
            "--overwrite",
            "--json",
            str(Path(tmp) / "q.json"),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(
                f"profiled run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        qjson = json.loads((Path(tmp) / "q.json").read_text())
    s = summarize(raw_path.read_text())
    n = s["samples"]
    results = qjson.get("results", {})
    steps = {k: v["seconds"] for k, v in results.items() if isinstance(v, dict) and "seconds" in v}
    cmdline = "python -m scripts.bench.profile_gptq " + " ".join(sys.argv[1:])
    data = {
        "recipe": recipe_text(args),
        "wall_seconds": wall,
        "samples": n,
        "rate": args.rate,
        "steps": steps,
        "self_top": [[f, c, c / n] for f, c in s["self"].most_common(args.top)],
        # qtool's own frames below the CLI and the recipe driver: which stage the time is in
        "inclusive_top": [
            [f, c, c / n]
            for f, c in s["inclusive"].most_common()
            if f.startswith("qtool/") and not f.startswith(("qtool/cli.py", "qtool/api.py"))
        ][: args.top + 5],
        "command": cmdline.strip(),
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(data, indent=2))
    md = [
        f"py-spy ({args.rate} Hz, {n} samples, {wall:.0f} s wall incl. start-up) of `qtool quantize`: "
        f"{args.model}, W4A16 g{args.group_size} GPTQ (damp 0.01, block 128, act-order {args.act_order}, "
        f"min-max), calibration {args.samples} x {args.seq_len}, float32, CPU, one core, one thread; steps "
        + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
        + f". Command: `{data['command']}`",
        "",
        f"Top {args.top} functions by self time (innermost Python frame; torch ops count to their caller):",
        "",
        "| function | self s | share |",
        "|---|---:|---:|",
    ]
    md += [f"| `{f}` | {c / args.rate:.1f} | {share:.1%} |" for f, c, share in data["self_top"]]
    md += [
        "",
        "qtool functions by inclusive time (on the stack at all):",
        "",
        "| function | inclusive s | share |",
        "|---|---:|---:|",
    ]
    md += [f"| `{f}` | {c / args.rate:.1f} | {share:.1%} |" for f, c, share in data["inclusive_top"]]
    (RESULTS / f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
