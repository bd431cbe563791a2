"""The ``qtool`` command line: parses arguments, calls :mod:`qtool.api`, renders with rich."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from qtool.errors import QtoolError
from qtool.log import console, setup_logging

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Post-training quantization of Llama-family LLMs: W4A4KV4, rotation, GPTQ, IntactKV, WKVQuant, BiSup, LRC.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="Work with recipe files.")
app.add_typer(recipe_app, name="recipe")
logger = logging.getLogger("qtool")


def _print_versions(value: bool) -> None:
    if not value:
        return
    from qtool.api import versions

    typer.echo(json.dumps(versions(), indent=2))
    raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging"),
    version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_versions,
        help="print the versions of qtool, torch, transformers, python, the device and the allocator "
        "settings (JSON), and exit",
    ),
) -> None:
    setup_logging(verbose)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 logs, the others only errors
        logging.getLogger("qtool").setLevel(logging.WARNING)
        os.environ["QTOOL_NO_PROGRESS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _launch(nproc: int) -> None:
    """Re-run this very command under torch.distributed.run with ``nproc`` processes; exit with
    its status (torchrun ends every rank when one fails)."""
    import subprocess
    import sys

    args = sys.argv[1:]
    i = next(k for k, a in enumerate(args) if a == "--nproc" or a.startswith("--nproc="))
    del args[i : i + (1 if "=" in args[i] else 2)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    raise typer.Exit(code=subprocess.call([*cmd, "-m", "qtool", *args]))


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}")  # the message is text, not markup
    raise typer.Exit(code=1)


def _write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    console.print(f"wrote {path}")


def _error_table(errors: dict[str, float], title: str) -> Table:
    """Per-linear-type summary (mean, max over layers) and the worst layer of each type."""
    by_type: dict[str, list[tuple[float, str]]] = {}
    for name, err in errors.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append((err, name))
    table = Table(title=title)
    for col in ("linear", "layers", "mean error", "max error", "worst layer"):
        table.add_column(col, justify="right" if "error" in col or col == "layers" else "left")
    for kind, items in by_type.items():
        worst = max(items)
        mean = sum(e for e, _ in items) / len(items)
        table.add_row(kind, str(len(items)), f"{mean:.4g}", f"{worst[0]:.4g}", worst[1])
    return table


@app.command()
def quantize(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="checkpoint folder (default: the recipe's output)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output folder"),
    device: str | None = typer.Option(None, "--device", help="override the recipe's device (cpu, cuda, ...)"),
    json_out: Path | None = typer.Option(
        None, "--json", help="write step results (errors, times, sizes) as JSON"
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="data-parallel calibration over N processes on this machine (torchrun, gloo on CPU, nccl "
        "on CUDA); the same as `torchrun --nproc-per-node N -m qtool quantize ...`",
    ),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="read one decoder layer at a time from the model's safetensors shards and export as it goes "
        "(models larger than host memory); re-running an interrupted --stream command resumes it",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="continue an interrupted --stream run of the same recipe, model and calibration after its "
        "last finished layer (implies --stream); an error when there is none",
    ),
) -> None:
    """Run a recipe and export the quantized checkpoint."""
    from qtool import api
    from qtool.recipe import load_recipe

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch(nproc)
    try:
        r = load_recipe(recipe)
        if device:
            r.device = device
        ctx = api.quantize(r, output, overwrite, stream=stream, resume=resume)
    except QtoolError as exc:
        _fail(exc)
    from qtool import dist

    if not dist.is_main():  # rank 0 reports; the checkpoint and the JSON are its own
        return
    res = {k: v for k, v in ctx.results.items() if not k.startswith("_")}
    for step, data in res.items():
        if isinstance(data, dict) and data.get("layer_errors"):
            console.print(_error_table(data["layer_errors"], f"{step}: per-layer quantization error"))
    summary = Table(title=f"qtool quantize {recipe}")
    summary.add_column("step")
    summary.add_column("seconds", justify="right")
    for step, data in res.items():
        if isinstance(data, dict) and "seconds" in data:
            summary.add_row(step, f"{data['seconds']:.1f}")
    console.print(summary)
    exp = res.get("export", {})
    if exp:
        console.print(
            f"checkpoint: {exp['path']} ({exp['bytes'] / 1e6:.1f} MB, decoder linears {exp['decoder_linear_bytes'] / 1e6:.1f} MB)"
        )
    if "peak_gpu_memory_gb" in res:
        console.print(f"peak GPU memory: {res['peak_gpu_memory_gb']:.2f} GiB")
    _write_json(json_out, {"recipe": r.to_dict(), "results": res, "versions": api.versions()})


def _short_labels(targets: list[str]) -> list[str]:
    """Table labels: a path's last part when that tells the targets apart (the JSON keeps the full one)."""
    names = [Path(t).name or t for t in targets]
    return names if len(set(names)) == len(names) else targets


@app.command("eval")
def eval_cmd(
    targets: list[str] = typer.Argument(
        ...,
        help="one or more: checkpoint folder, HF folder, hub id, smollm2-135m, or a recipe .yaml (in memory); "
        "the first is the baseline of the ratio column and of --max-ppl-ratio",
    ),
    ppl: str | None = typer.Option(
        None,
        "--ppl",
        help="perplexity dataset: wikitext2, c4 or a local file (default wikitext2 unless --tasks is given)",
    ),
    tasks: str | None = typer.Option(
        None, "--tasks", help="lm-eval tasks, comma-separated (e.g. arc_easy,piqa); needs qtool[eval]"
    ),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="few-shot examples per task"),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="a folder of your own lm-eval task YAMLs"
    ),
    seq_len: int = typer.Option(2048, "--seq-len", help="window length in tokens"),
    limit: int | None = typer.Option(
        None, "--limit", help="the first N windows (and the first N documents of each task) only"
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="windows per forward pass"),
    prefix: str = typer.Option(
        "none", "--prefix", help="unscored prefix before every window: none, bos or a text"
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    kernels: str = typer.Option(
        "auto", "--kernels", help="packed int4 ops for checkpoints: auto (CUDA + extension), on, off"
    ),
    max_ppl_ratio: float | None = typer.Option(
        None, "--max-ppl-ratio", help="gate: every target's ppl / the first target's at most R"
    ),
    max_ppl: float | None = typer.Option(None, "--max-ppl", help="gate: every target's ppl at most P"),
    min_acc: list[str] = typer.Option(
        [], "--min-acc", help="gate TASK=A or TASK:METRIC=A: every target's accuracy at least A (repeatable)"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write every row and gate as JSON"),
) -> None:
    """Perplexity (the papers' protocol) and lm-eval tasks of one or more targets, with CI gates.

    Exit status: 0 all gates passed (or none given), 1 a user error, 2 a usage error,
    3 a gate failed (the JSON is written first).
    """
    from qtool import api
    from qtool.eval.gates import GATE_FAILED, make_gates
    from qtool.eval.tasks import parse_task_list

    try:
        gates = make_gates(max_ppl_ratio, max_ppl, min_acc)
        res = api.evaluate(
            targets,
            ppl,
            parse_task_list(tasks),
            seq_len,
            limit,
            batch_size,
            prefix,
            dtype,
            device,
            kernels,
            num_fewshot,
            include_path,
            gates,
        )
    except QtoolError as exc:
        _fail(exc)
    rows = res["rows"]
    has_ppl = "ppl" in rows[0]
    task_names = list(rows[0].get("tasks", {}))
    title = f"{rows[0]['protocol']['dataset']} perplexity" if has_ppl else "lm-eval tasks"
    if has_ppl and task_names:
        title += " and lm-eval tasks"
    table = Table(title=title)
    table.add_column("model")
    if has_ppl:
        for col in ("ppl", "ppl / first", "tokens", "windows"):
            table.add_column(col, justify="right")
    for name in task_names:
        table.add_column(f"{name} acc", justify="right")
    table.add_column("weights MB", justify="right")
    table.add_column("eval s", justify="right")
    for row, label in zip(rows, _short_labels([r["model"] for r in rows]), strict=True):
        cells = [label]
        if has_ppl:
            p = row["protocol"]
            cells += [
                f"{row['ppl']:.4f}",
                f"{row['ppl_ratio']:.4f}",
                str(p["tokens_scored"]),
                f"{p['windows']}/{p['total_windows']}",
            ]
        for name in task_names:
            t = row["tasks"].get(name, {})
            acc, err = t.get("metrics", {}).get("acc"), t.get("stderr", {}).get("acc")
            cells.append("-" if acc is None else f"{acc:.4f}" + ("" if err is None else f" ± {err:.4f}"))
        size = row.get("weights_bytes")
        cells.append("-" if size is None else f"{size / 1e6:.1f}")
        cells.append(f"{row.get('eval_seconds', 0) + row.get('tasks_seconds', 0):.1f}")
        table.add_row(*cells)
    console.print(table)
    if has_ppl:
        p = rows[0]["protocol"]
        console.print(f"seq len {p['seq_len']}, prefix {p['prefix']}, device {rows[0]['device']}")
    if task_names:
        t0 = rows[0]["tasks"]
        versions = ", ".join(f"{n} v{t0[n]['version']}" for n in task_names)
        info = rows[0]["lm_eval"]
        console.print(
            f"lm-eval {info['lm_eval']}, {versions}; num_fewshot {info['num_fewshot'] or 0}, "
            f"{t0[task_names[0]]['samples']} documents per task"
        )
    for row in rows:
        if "kernels" in row["loaded"]:
            k = row["loaded"]["kernels"]
            console.print(
                f"{row['model']}: packed linears: {k['packed']} via {k['backend']} ops ({k['reason']})"
            )
    if has_ppl:
        for row in rows:
            typer.echo(f"ppl={row['ppl']:.6f}" + (f" {row['model']}" if len(rows) > 1 else ""))
    for g in res["gates"]:
        value = "missing" if g["value"] is None else f"{g['value']:.4f}"
        mark = "[green]PASS[/]" if g["passed"] else "[bold red]FAIL[/]"
        console.print(f"{mark} {g['gate']}: {g['target']} = {value}")
    _write_json(json_out, res)
    if not res["passed"]:
        failed = sum(not g["passed"] for g in res["gates"])
        console.print(
            f"[bold red]gate failed:[/] {failed} of {len(res['gates'])} checks (exit status {GATE_FAILED})"
        )
        raise typer.Exit(code=GATE_FAILED)


@app.command("generate")
def generate_cmd(
    target: str = typer.Argument(
        ..., help="checkpoint folder, HF folder, hub id, smollm2-135m, or a recipe .yaml"
    ),
    prompt: str = typer.Option(..., "--prompt", "-p", help="the user message"),
    system: str | None = typer.Option(
        None, "--system", help="system prompt (chat template; its KV stays 16-bit)"
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy, else sampling temperature"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    mixed_precision: bool = typer.Option(
        True,
        "--prompt-mixed-precision/--no-prompt-mixed-precision",
        help="keep the system prompt's KV in 16 bits",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    kernels: str = typer.Option(
        "auto",
        "--kernels",
        help="packed int4 linears and int4 KV cache: auto (CUDA + extension), on, off",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the result as JSON"),
) -> None:
    """Decode a reply with the quantized KV cache and the 16-bit pivot / system-prompt cache."""
    from qtool import api

    try:
        res = api.generate_text(
            target,
            prompt,
            system,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            mixed_precision,
            dtype,
            device,
            kernels,
        )
    except QtoolError as exc:
        _fail(exc)
    console.print(res["text"], markup=False, highlight=False)
    console.print(
        f"[dim]{len(res['new_token_ids'])} tokens, {res['tokens_per_second']:.1f} tokens/s "
        f"(decode {res['decode_tokens_per_second']:.1f} tokens/s), 16-bit prefix {res['prefix_tokens']} tokens, "
        f"KV cache {res['kv_cache']}, device {res['device']}[/]"
    )
    _write_json(json_out, res)


@recipe_app.command("check")
def recipe_check(recipes: list[Path] = typer.Argument(..., help="recipe files")) -> None:
    """Validate recipes without running them."""
    from qtool.recipe import load_recipe, step_name

    failed = 0
    for path in recipes:
        try:
            r = load_recipe(path)
        except QtoolError as exc:
            console.print(f"[red]FAIL[/] {exc}")
            failed += 1
            continue
        steps = " -> ".join(step_name(s) for s in r.steps)
        console.print(f"[green]ok[/]   {path}: {r.model}, {r.scheme.label()}, steps: {steps}")
    if failed:
        raise typer.Exit(code=1)


@recipe_app.command("show")
def recipe_show(recipe: Path) -> None:
    """Print the resolved recipe (defaults filled in)."""
    from qtool.recipe import load_recipe

    try:
        typer.echo(load_recipe(recipe).to_yaml())
    except QtoolError as exc:
        _fail(exc)


bench_app = typer.Typer(
    no_args_is_help=True, help="Kernel benchmarks (need a CUDA device and `make kernels`)."
)
app.add_typer(bench_app, name="bench")


def _bench(kind: str, json_out: Path | None, iters: int) -> None:
    from qtool import api

    try:
        res = api.bench_kernels(kind, iters=iters)
    except QtoolError as exc:
        _fail(exc)
    rows = res["rows"]
    table = Table(title=f"qtool bench {kind} ({res['device'].get('device', '?')})")
    cols = list(dict.fromkeys(c for r in rows for c in r))
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in cols))
    console.print(table)
    _write_json(json_out, res)


@bench_app.command("matmul")
def bench_matmul(
    json_out: Path | None = typer.Option(None, "--json"), iters: int = typer.Option(50, "--iters")
) -> None:
    """W4A16 int4_matmul vs FP16 cuBLAS on Llama-2-7B / Llama-3-8B decoder shapes."""
    _bench("matmul", json_out, iters)


@bench_app.command("w4a4")
def bench_w4a4(
    json_out: Path | None = typer.Option(None, "--json"), iters: int = typer.Option(50, "--iters")
) -> None:
    """W4A4 (activation quantization + INT8-MMA int4 GEMM) vs FP16 cuBLAS."""
    _bench("w4a4", json_out, iters)


@bench_app.command("attention")
def bench_attention(
    json_out: Path | None = typer.Option(None, "--json"), iters: int = typer.Option(20, "--iters")
) -> None:
    """INT4-KV decode attention vs PyTorch SDPA over a 16-bit cache."""
    _bench("attention", json_out, iters)


@bench_app.command("generate")
def bench_generate_cmd(
    shape: str = typer.Option(
        "llama-2-7b", "--shape", help="llama-2-7b, llama-3-8b or tiny (random weights)"
    ),
    batch: list[int] = typer.Option([1, 16], "--batch", help="batch sizes (repeat the option)"),
    context: int = typer.Option(4096, "--context", help="prompt tokens per sequence before decoding"),
    new_tokens: int = typer.Option(64, "--new-tokens", help="timed decode steps"),
    max_context: int = typer.Option(32768, "--max-context", help="context for the max-batch estimate"),
    group_size: int = typer.Option(128, "--group-size", help="W4A16 weight group size"),
    device: str = typer.Option("cuda", "--device", help="cuda (cpu runs the op references: slow)"),
    json_out: Path | None = typer.Option(None, "--json"),
) -> None:
    """Decode tokens/s: 16-bit model vs W4A16 + int4 KV cache, same random-initialized shapes."""
    from qtool import api

    try:
        res = api.bench_generate(
            shape, tuple(batch), context, new_tokens, max_context, group_size, device=device
        )
    except QtoolError as exc:
        _fail(exc)
    title = f"qtool bench generate: {shape}, context {context}, {new_tokens} decode steps ({device})"
    table = Table(title=title)
    cols = list(dict.fromkeys(c for r in res["rows"] for c in r))
    for c in cols:
        table.add_column(c)
    for r in res["rows"]:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    console.print(table)
    for key, label in (("fp16_max_batch", "16-bit"), ("w4kv4_max_batch", "W4A16 + KV4")):
        m = res[key]
        console.print(
            f"{label}: max batch at {m['context']} tokens = {m['max_batch']} "
            f"({m['kv_gib_per_sequence']} GiB KV per sequence; estimate from free memory)"
        )
    _write_json(json_out, res)


if __name__ == "__main__":  # pragma: no cover
    app()
