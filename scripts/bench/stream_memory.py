"""Peak host memory and wall time of `qtool quantize`, streamed vs in memory, under /usr/bin/time -v.

    python -m scripts.bench.make_random_checkpoint --shape llama-2-7b --out /tmp/llama2-7b-random
    python -m scripts.bench.stream_memory --model /tmp/llama2-7b-random --rows rtn-stream,rtn-memory

Each row runs one `qtool quantize` command in its own process under `/usr/bin/time -v` and reads
its "Maximum resident set size" and wall time; a row that fails (e.g. the in-memory path running out
of memory under `--mem-limit-gb`, an address-space limit set with `ulimit -v` so the failure is a
clean allocation error instead of the kernel's OOM killer) is recorded with its exit status and the
last line it printed. Results go to results/<out>.{json,md}. Recipes: W4A16 g128 RTN and W4A16
g128 GPTQ with calibration 16 x 256 (enough to measure memory, not a quality setting).

A streamed 7B GPTQ row takes hours of one core. With `--workdir DIR` the recipe and the output stay
in DIR, so a row that was interrupted (session end, preemption) continues where it stopped when the
same command is run again: `qtool quantize --stream` resumes from its `.<output>.partial` folder by
itself. Each run of a row is one segment (its peak RSS, wall time and the decoder layer it started
at, kept in DIR/<row>.segments.json); the finished row's peak RSS is the largest of its segments and
its wall time their sum. `--load-check-only` re-runs only the `qtool eval` load check of rows whose
output is already in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from scripts.tables.common import REPO, RESULTS, command

RECIPES = {
    "rtn": "steps: [rtn]",
    "gptq": "steps: [{gptq: {act_order: true, mse_clip: false, batch_size: 4}}]",
}


def recipe_text(model: str, kind: str) -> str:
    return (
        f"model: {model}\ndevice: cpu\ndtype: float32\n"
        "calibration: {samples: 16, seq_len: 256}\n"
        "scheme: {preset: W4A16, weights: {bits: 4, group_size: 128}}\n" + RECIPES[kind] + "\n"
    )


def last_line(text: str) -> str:
    """What a command printed last, without /usr/bin/time's own report."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("\t", "Command "))]
    return lines[-1] if lines else ""


def resume_layer(out: Path) -> int:
    """The decoder layer an interrupted streamed run of `out` continues at (0: starts afresh)."""
    state = out.parent / f".{out.name}.partial" / ".qtool-state" / "state.json"
    if not state.is_file():
        return 0
    return int(json.loads(state.read_text()).get("next_layer", 0))


def peak_rss_gib(report: str) -> float | None:
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    return int(rss.group(1)) / 2**20 if rss else None  # kbytes / 2**20: GiB


def run_row(
    model: str,
    row: str,
    workdir: Path,
    mem_limit_gb: float | None,
    load_check: bool,
    check_only: bool = False,
) -> dict:
    kind, mode = row.split("-")
    recipe = workdir / f"{kind}.yaml"
    out = workdir / f"out-{row}"
    seg_file = workdir / f"{row}.segments.json"
    segments = json.loads(seg_file.read_text()) if seg_file.is_file() else []
    env = {**os.environ, "QTOOL_NO_PROGRESS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if check_only:
        if not (out / "qtool.json").is_file() or not segments or segments[-1]["exit_status"] != 0:
            raise SystemExit(
                f"--load-check-only: {row} has no finished output in {workdir}; run the row first"
            )
    else:
        if recipe.is_file() and recipe.read_text() != recipe_text(model, kind):
            segments = []  # another model or recipe: the saved segments are not this row's
        recipe.write_text(recipe_text(model, kind))
        start_layer = resume_layer(out) if mode == "stream" else 0
        if start_layer == 0:
            segments = []  # a fresh run: earlier segments belonged to a finished or abandoned one
        qtool = [str(REPO / ".venv/bin/qtool"), "quantize", str(recipe), "--output", str(out), "--overwrite"]
        if mode == "stream":
            qtool.append("--stream")  # re-running the command resumes an interrupted streamed run
        cmd = " ".join(shlex.quote(c) for c in ["/usr/bin/time", "-v", *qtool])
        if mem_limit_gb:
            cmd = f"ulimit -v {int(mem_limit_gb * 2**20)}; {cmd}"
        print(f"{row}: starting at decoder layer {start_layer}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env)
        (workdir / f"{row}.segment{len(segments)}.log").write_text(proc.stdout + proc.stderr)
        segments.append(
            {
                "start_layer": start_layer,
                "exit_status": proc.returncode,
                "peak_rss_gb": peak_rss_gib(proc.stderr),
                "wall_seconds": round(time.perf_counter() - start, 1),
                "last_line": last_line(proc.stdout + proc.stderr)[:300],
            }
        )
        seg_file.write_text(json.dumps(segments, indent=2))
    last = segments[-1]
    peaks = [s["peak_rss_gb"] for s in segments if s["peak_rss_gb"] is not None]
    res = {
        "row": row,
        "recipe": recipe_text(model, kind),
        "stream": mode == "stream",
        "exit_status": last["exit_status"],
        "peak_rss_gb": max(peaks) if peaks else None,  # GiB (the key keeps its old name)
        "wall_seconds": round(sum(s["wall_seconds"] for s in segments), 1),
        "mem_limit_gb": mem_limit_gb,
        "last_line": last["last_line"],
        "segments": segments,
    }
    if last["exit_status"] == 0 and not load_check:
        res["checkpoint_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        res["load_check"] = "not run (--no-load-check)"
    elif last["exit_status"] == 0:
        res["checkpoint_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        t_ev = time.perf_counter()
        ev = subprocess.run(
            [
                "/usr/bin/time",
                "-v",
                str(REPO / ".venv/bin/qtool"),
                "eval",
                str(out),
                "--ppl",
                "wikitext2",
                "--limit",
                "1",
                "--seq-len",
                "256",
                "--dtype",
                "bfloat16",  # a 7B model dequantized in float32 (27 GB) does not fit this machine
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        res["load_check"] = (
            "ok"
            if ev.returncode == 0
            else f"failed (exit {ev.returncode}{', killed' if ev.returncode < 0 else ''}): "
            f"{last_line(ev.stderr)}"
        )
        res["load_check_peak_rss_gb"] = peak_rss_gib(ev.stderr)  # GiB
        res["load_check_wall_seconds"] = round(time.perf_counter() - t_ev, 1)
        ppl = re.search(r"ppl[^0-9]*([0-9.]+)", ev.stdout)
        res["load_check_ppl"] = float(ppl.group(1)) if ppl else None
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local safetensors model folder")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only re-render: rows of these result files replace --out's rows of the same name",
    )
    p.add_argument("--rows", default="rtn-stream,rtn-memory", help="comma list of {rtn,gptq}-{stream,memory}")
    p.add_argument("--mem-limit-gb", type=float, default=None, help="address-space limit of the memory rows")
    p.add_argument("--out", default="stream_memory")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep recipes and outputs here (outside the repo) so an interrupted row resumes when re-run; "
        "default: a temporary folder removed at the end",
    )
    p.add_argument(
        "--load-check-only", action="store_true", help="only the load check of finished rows in --workdir"
    )
    p.add_argument(
        "--no-load-check",
        action="store_true",
        help="skip `qtool eval` on the output (it loads the whole checkpoint, in bfloat16: 13.5 GB for 7B)",
    )
    args = p.parse_args()
    path = RESULTS / f"{args.out}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if args.merge:  # no runs: rows of other result files replace this file's rows of the same name
        data = old or json.loads(Path(args.merge[0]).read_text())
        for r in data["rows"]:
            r.setdefault("command", data.get("command", ""))
        for other in args.merge:
            src = json.loads(Path(other).read_text())
            new = [{"command": src.get("command", ""), **r} for r in src["rows"]]
            names = {r["row"] for r in new}
            data["rows"] = [r for r in data["rows"] if r["row"] not in names] + new
        path.write_text(json.dumps(data, indent=2))
        render(data, RESULTS / f"{args.out}.md")
        return
    if args.model is None:
        p.error("--model is needed (or --merge)")
    if args.load_check_only and (args.workdir is None or args.no_load_check):
        p.error("--load-check-only needs --workdir (where the finished rows are) and no --no-load-check")
    size = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    config = json.loads((Path(args.model) / "config.json").read_text())
    rows = [r for r in old.get("rows", []) if r["row"] not in args.rows.split(",")]
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for row in args.rows.split(","):
            limit = args.mem_limit_gb if row.endswith("memory") else None
            res = run_row(args.model, row, workdir, limit, not args.no_load_check, args.load_check_only)
            res["command"] = command()  # rows of one table may come from several runs
            print(json.dumps(res), flush=True)
            rows.append(res)
            data = {
                "model": args.model,
                "model_bytes": size,
                "config": {
                    k: config[k]
                    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
                },
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                "command": command(),
                "rows": rows,
            }
            path.write_text(json.dumps(data, indent=2))
    print(render(data, RESULTS / f"{args.out}.md"))


def render(data: dict, out: Path) -> str:
    config, size, rows = data["config"], data["model_bytes"], data["rows"]
    md = [
        f"Model: random-initialized {config['num_hidden_layers']} x {config['hidden_size']} "
        f"(intermediate {config['intermediate_size']}, vocab {config['vocab_size']}), {size / 1e9:.2f} GB bf16 "
        f"safetensors; {data['machine']}; calibration 16 x 256 tokens.",
        "",
        "| recipe | path | peak RSS | wall | exit | load check | note |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        kind = r["row"].split("-")[0].upper()
        gib = r["peak_rss_gb"]  # kbytes / 2**20: GiB
        rss = f"{gib:.2f} GiB ({gib * 2**30 / 1e9:.2f} GB)" if gib is not None else "-"
        note = "" if r["exit_status"] == 0 else r["last_line"].replace("|", "/")
        if len(r.get("segments", [])) > 1:
            note = (
                f"{len(r['segments'])} runs (resumed at layers "
                + ", ".join(str(s["start_layer"]) for s in r["segments"][1:])
                + "): peak = largest, wall = sum"
                + (f"; {note}" if note else "")
            )
        limit = f" (ulimit -v {r['mem_limit_gb']:g} GiB)" if r.get("mem_limit_gb") else ""
        md.append(
            f"| W4A16 g128 {kind} | {'--stream' if r['stream'] else 'in memory'}{limit} | {rss} | "
            f"{r['wall_seconds']:.0f} s | {r['exit_status']} | {r.get('load_check', '-')}"
            + (f" (ppl {r['load_check_ppl']:.4g})" if r.get("load_check_ppl") else "")
            + (
                f", eval peak RSS {r['load_check_peak_rss_gb']:.2f} GiB, {r['load_check_wall_seconds']:.0f} s"
                if r.get("load_check_peak_rss_gb")
                else ""
            )
            + f" | {note} |"
        )
    commands = list(dict.fromkeys(r.get("command", data.get("command", "")) for r in rows))
    md += ["", "Commands (in the order of the rows): " + "; ".join(f"`{c}`" for c in commands if c)]
    text = "\n".join(md) + "\n"
    out.write_text(text)
    return text


if __name__ == "__main__":
    main()
