"""The Python API the CLI calls: quantize a recipe, load any model, evaluate perplexity."""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import qtool
from qtool import dist
from qtool.errors import QtoolError
from qtool.log import trim_heap
from qtool.models.loading import is_qtool_checkpoint, load_hf_model, resolve_device
from qtool.recipe import Recipe, load_recipe, step_name

logger = logging.getLogger("qtool")


def versions() -> dict[str, str]:
    import transformers

    return {
        "qtool": qtool.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        # the allocator settings the process ran with (qtool.allocator), where any were set
        **({"glibc_tunables": os.environ["GLIBC_TUNABLES"]} if os.environ.get("GLIBC_TUNABLES") else {}),
    }


def run_recipe(
    recipe: Recipe,
    output: str | Path | None = None,
    overwrite: bool = False,
    export: bool = True,
    stream: bool = False,
    stop_after: int | None = None,
    resume: bool = False,
):
    """Run every step of ``recipe``; export to ``output`` (or the recipe's) when ``export``.

    ``stream``: run layer by layer over the model's shards, exporting as it goes, resuming an
    interrupted run of the same command (:mod:`qtool.steps.streaming`); ``resume`` (implies
    ``stream``) insists on it: an error when there is no interrupted run; ``stop_after`` is its
    test hook (stop after that decoder layer, as a crash would). Returns the step
    :class:`~qtool.steps.base.Context` (model, tokenizer, results).
    """
    from qtool.export.writer import check_output
    from qtool.models.prepare import prepare_model
    from qtool.steps import parse_step
    from qtool.steps.base import Context

    torch.manual_seed(recipe.seed)
    steps = list(recipe.steps)
    names = [step_name(s) for s in steps]
    out = output or recipe.output
    if export:
        if out is None:
            raise QtoolError("no output folder: pass --output DIR or set `output:` in the recipe")
        check_output(out, overwrite)  # fail before hours of work, not after
        if resume:
            from qtool.steps.streaming import check_resumable

            stream = True
            check_resumable(out)
        if "export" not in names:
            steps.append(parse_step("export", len(steps)))
    else:
        if resume:
            raise QtoolError("--resume continues an interrupted export: it needs an output folder")
        steps = [s for s in steps if step_name(s) != "export"]
    device = dist.init(resolve_device(recipe.device))  # joins the process group under torchrun
    planted = os.environ.get("QTOOL_TEST_FAIL_RANK")  # test hook: a failure on one rank
    if planted is not None and int(planted) == dist.rank():
        raise QtoolError(f"planted failure on rank {dist.rank()} (QTOOL_TEST_FAIL_RANK)")
    if stream:
        if not export:
            raise QtoolError("--stream writes the checkpoint as it goes: it needs an output folder")
        from qtool.steps.streaming import run_streaming

        return run_streaming(recipe, steps, out, overwrite, stop_after=stop_after)
    model, tok = load_hf_model(recipe.model, recipe.dtype, str(device))
    prepare_model(model, recipe.scheme)
    ctx = Context(recipe=recipe, model=model, tokenizer=tok, device=device, output=out, overwrite=overwrite)
    start = time.perf_counter()
    for step in steps:
        t0 = time.perf_counter()
        logger.info("step %s", step_name(step))
        if dist.world() > 1 and not step.runs_data_parallel():
            logger.info(
                "step %s is not data-parallel yet: each of the %d ranks runs it on all calibration windows",
                step_name(step),
                dist.world(),
            )
        try:
            step.apply(ctx)
        except QtoolError as exc:  # a step's check of the recipe/model: the message says what to change
            raise QtoolError(f"step `{step_name(step)}`: {exc}") from None
        # any other exception is a bug: it propagates with its traceback
        ctx.record(step_name(step), {"seconds": round(time.perf_counter() - t0, 3)})
        trim_heap()  # a step's freed temporaries would otherwise stay resident (fragmentation)
    ctx.results["quantize_seconds"] = time.perf_counter() - start
    dist.barrier()  # every rank leaves together, after rank 0 wrote the checkpoint
    ctx.model.to(device)  # layer-wise steps may have left layers offloaded to the CPU
    if device.type == "cuda":
        ctx.results["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return ctx


def quantize(
    recipe: str | Path | Recipe,
    output=None,
    overwrite: bool = False,
    stream: bool = False,
    resume: bool = False,
):
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return run_recipe(recipe, output, overwrite, export=True, stream=stream, resume=resume)


def use_kernels(kernels: str, model) -> bool:
    """``auto``: packed kernels when the model is on CUDA and the extension is built; ``on``/``off``."""
    if kernels not in ("auto", "on", "off"):
        raise QtoolError(f"--kernels must be auto, on or off, got {kernels!r}")
    if kernels != "auto":
        return kernels == "on"
    from qtool.ops.registry import backend

    return next(model.parameters()).device.type == "cuda" and backend() == "cuda"


def load(target: str, dtype: str = "float32", device: str = "auto", kernels: str = "auto"):
    """Load a model for evaluation. ``target``: an embedded name, hub id or HF folder (unquantized),
    a qtool checkpoint folder, or a recipe ``.yaml`` (quantized in memory, not exported).

    Returns ``(model, tokenizer, info)``; ``info`` says what was loaded.
    """
    if str(target).endswith((".yaml", ".yml")):
        recipe = load_recipe(target)
        recipe.device = device if device != "auto" else recipe.device
        ctx = run_recipe(recipe, export=False)
        info = {"kind": "in-memory", "recipe": recipe.to_dict(), "scheme": recipe.scheme.label()}
        if use_kernels(kernels, ctx.model):
            from qtool.models.packed import pack_model

            info["kernels"] = pack_model(ctx.model)
        return ctx.model, ctx.tokenizer, info
    if is_qtool_checkpoint(target):
        from qtool.export.files import check_checkpoint_files
        from qtool.export.loader import load_checkpoint

        check_checkpoint_files(target)
        # the integer codes are only needed to pack for the kernels (CUDA); without them the loaded
        # model is the dequantized weights alone (a 7B model: 13.5 GB in bf16, not 20 GB)
        packing = kernels == "on" or (kernels == "auto" and resolve_device(device).type == "cuda")
        model, tok, meta = load_checkpoint(target, dtype, device, keep_codes=packing)
        info = {"kind": "checkpoint", "scheme": meta["scheme"], "format": meta["format"]}
        if use_kernels(kernels, model):
            from qtool.models.packed import pack_model

            info["kernels"] = pack_model(model)
        return model, tok, info
    model, tok = load_hf_model(target, dtype, device)
    return model, tok, {"kind": "unquantized", "dtype": dtype}


def ppl_protocol(res, dataset: str, seq_len: int) -> dict[str, Any]:
    """How a perplexity was measured (the papers' protocol, METHODS.md section 0), for the JSON."""
    return {
        "dataset": dataset,
        "split": "test",
        "join": "\\n\\n",
        "seq_len": seq_len,
        "windows": res.windows,
        "total_windows": res.total_windows,
        "first_windows": True,
        "tokens_scored": res.tokens_scored,
        "prefix": res.prefix,
        "ppl": "exp(mean window NLL)",
    }


def inspect_target(target: str) -> dict[str, Any]:
    """What evaluating ``target`` loads, read without its weights: ``kind``, ``config``, ``tokenizer``.

    Checks what can be checked before any long work: the recipe validates, a checkpoint folder
    holds every file it needs (a missing one is named), the architecture is supported.
    """
    from transformers import AutoConfig, AutoTokenizer

    from qtool.export.files import check_checkpoint_files, looks_like_checkpoint
    from qtool.models.adapters import get_adapter
    from qtool.models.loading import resolve_model_path

    if str(target).endswith((".yaml", ".yml")):
        kind, source = "recipe", resolve_model_path(load_recipe(target).model)
    elif looks_like_checkpoint(target):
        check_checkpoint_files(target)
        kind, source = "checkpoint", str(target)
    else:
        kind, source = "unquantized", resolve_model_path(target)
    try:
        config = AutoConfig.from_pretrained(source)
        get_adapter(config)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except QtoolError:
        raise
    except OSError as exc:
        raise QtoolError(
            f"could not load model {target!r}: {exc}. Offline? Use a local folder or the embedded smollm2-135m"
        ) from None
    folder = Path(source) if kind != "recipe" else None
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder and folder.is_dir() else None
    return {
        "target": str(target),
        "kind": kind,
        "config": config,
        "tokenizer": tokenizer,
        "weights_bytes": size,
    }


def _tokenizer_key(tok) -> str:
    """Two tokenizers with the same key produce the same ids (a fast tokenizer's full serialization)."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    extra = f"{type(tok).__name__}|{tok.bos_token_id}|{tok.eos_token_id}"
    return hashlib.sha256((extra + body).encode()).hexdigest()


def evaluate(
    targets: list[str],
    ppl: str | None = "wikitext2",
    tasks: list[str] | None = None,
    seq_len: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    prefix: str = "none",
    dtype: str = "float32",
    device: str = "auto",
    kernels: str = "auto",
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    gates: list | None = None,
) -> dict[str, Any]:
    """Evaluate several targets on the same windows and tasks; check ``gates`` (:mod:`qtool.eval.gates`).

    Every input is checked before the first model is loaded (targets, checkpoint files, sequence
    length against each model's positions, ``limit`` against the windows, task names and data,
    gates). The targets are then loaded one at a time. Returns ``{"rows": [one per target],
    "gates": [one per gate and target], "passed": bool}`` with the first row's keys also at the
    top level (the single-target JSON of earlier versions). ``ppl_ratio`` is each row's perplexity
    over the first row's.
    """
    import gc

    from qtool.eval.gates import check_gates_apply, evaluate_gates
    from qtool.eval.perplexity import (
        check_seq_len,
        eval_windows,
        max_positions,
        perplexity_of_windows,
        prefix_ids,
    )
    from qtool.models.loading import DTYPES

    targets = [str(t) for t in targets]
    tasks = list(tasks or [])
    gates = list(gates or [])
    if not targets:
        raise QtoolError("no target: give a checkpoint folder, model or recipe to evaluate")
    if dtype not in DTYPES:
        raise QtoolError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if batch_size < 1:
        raise QtoolError("--batch-size must be at least 1")
    if num_fewshot is not None and not tasks:
        raise QtoolError("--num-fewshot applies to --tasks; add --tasks a,b")
    if include_path is not None and not tasks:
        raise QtoolError("--include-path applies to --tasks; add --tasks a,b")
    if ppl is None and not tasks:
        ppl = "wikitext2"
    check_gates_apply(gates, len(targets), ppl is not None, tasks)
    spec = None
    if tasks:
        from qtool.eval.tasks import prepare_tasks

        spec = prepare_tasks(tasks, include_path)
    infos = [inspect_target(t) for t in targets]
    windows, total, pre = None, 0, []
    if ppl is not None:
        by_key: dict[str, tuple] = {}
        for info in infos:
            pre_i = prefix_ids(info["tokenizer"], prefix)
            check_seq_len(seq_len, max_positions(info["config"]), len(pre_i))
            key = _tokenizer_key(info["tokenizer"])
            if key not in by_key:
                by_key[key] = (*eval_windows(info["tokenizer"], ppl, seq_len, limit), pre_i, info["target"])
            w, t, p, first = by_key[key]
            if windows is None:
                windows, total, pre = w, t, p
            elif not torch.equal(w, windows) or p != pre:
                raise QtoolError(
                    f"{first!r} and {targets[0]!r} tokenize {ppl} differently: their perplexities would "
                    "score different tokens; compare targets that share a tokenizer"
                )
    rows: list[dict[str, Any]] = []
    for info in infos:
        target = info["target"]
        t0 = time.perf_counter()
        model, tok, loaded = load(target, dtype, device, kernels)
        row: dict[str, Any] = {"model": target, "loaded": loaded, "load_seconds": time.perf_counter() - t0}
        row["weights_bytes"] = info["weights_bytes"]  # the folder's safetensors files (None in memory)
        if windows is not None:
            res = perplexity_of_windows(model, windows, total, ppl, pre, prefix, batch_size)
            row["ppl"] = res.ppl
            row["protocol"] = ppl_protocol(res, ppl, seq_len)
            row["nll_per_window"] = res.nll_per_window
            row["eval_seconds"] = res.seconds
        if spec is not None:
            from qtool.eval.tasks import run_tasks

            t1 = time.perf_counter()
            out = run_tasks(model, tok, spec, num_fewshot, limit)
            row["tasks"] = out["tasks"]
            row["lm_eval"] = {k: v for k, v in out.items() if k != "tasks"}
            row["tasks_seconds"] = time.perf_counter() - t1
        row["dtype"] = dtype
        row["device"] = str(next(model.parameters()).device)
        row["versions"] = versions()
        rows.append(row)
        del model, tok
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if windows is not None:
        base = rows[0]["ppl"]
        for row in rows:
            row["ppl_ratio"] = row["ppl"] / base
    results = evaluate_gates(gates, rows)
    passed = all(r["passed"] for r in results)
    return {**rows[0], "rows": rows, "gates": results, "passed": passed}


def generate_text(
    target: str,
    prompt: str,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mixed_precision: bool = True,
    dtype: str = "float32",
    device: str = "auto",
    kernels: str = "auto",
) -> dict[str, Any]:
    """Load ``target`` (as :func:`load`) and decode a reply with its pivot and quantized KV cache.

    With the kernels in use (``auto`` on CUDA with the extension built, or ``on``), the linears
    are packed int4 and the KV cache is stored as packed int4 when its scheme allows it.
    """
    from qtool.generate import generate
    from qtool.models.kv4_runtime import packed_kv_reason

    model, tok, info = load(target, dtype, device, kernels)
    packed_kv = False
    if use_kernels(kernels, model):
        why = packed_kv_reason(model)
        packed_kv = why is None
        if why:
            logger.info("KV cache kept as 16-bit fake-quant values: %s", why)
    res = generate(
        model,
        tok,
        prompt,
        system,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        mixed_precision,
        packed_kv=packed_kv,
    )
    return {
        "model": str(target),
        "loaded": info,
        "prompt": prompt,
        "system": system,
        **res.to_dict(),
        "pivot": getattr(getattr(model, "qtool_pivot", None), "token_ids", None),
        "device": str(next(model.parameters()).device),
        "versions": versions(),
    }


BENCH_KERNELS = ("matmul", "w4a4", "attention")


def _require_cuda() -> None:
    """The kernel benchmarks' CUDA check as a user error (it says to run ``make kernels``)."""
    from qtool.bench.kernels import require_cuda

    try:
        require_cuda()
    except RuntimeError as exc:
        raise QtoolError(str(exc)) from None


def bench_kernels(kind: str, iters: int = 50) -> dict[str, Any]:
    """Time one kernel benchmark (``matmul``, ``w4a4`` or ``attention``) on the CUDA device.

    Returns ``{"bench": kind, "device": device_info(), "rows": [...]}``, one row per shape.
    """
    from qtool.bench import kernels

    fns = {
        "matmul": kernels.bench_int4_matmul,
        "w4a4": kernels.bench_w4a4,
        "attention": kernels.bench_decode_attention,
    }
    if kind not in fns:
        raise QtoolError(f"unknown kernel benchmark {kind!r}; choose from {', '.join(BENCH_KERNELS)}")
    _require_cuda()
    rows = fns[kind](iters=iters)
    return {"bench": kind, "device": kernels.device_info(), "rows": rows}


def bench_generate(
    shape: str = "llama-2-7b",
    batches: tuple[int, ...] = (1, 16),
    context: int = 4096,
    new_tokens: int = 64,
    max_context: int = 32768,
    group_size: int = 128,
    device: str = "cuda",
) -> dict[str, Any]:
    """Decode tokens/s of a random-initialized model of ``shape``: 16-bit vs W4A16 + int4 KV.

    Returns :func:`qtool.bench.generate.bench_generate`'s result with ``bench`` and ``device``
    (the CUDA device's :func:`~qtool.bench.kernels.device_info`, or ``{"device": "cpu"}``) added.
    """
    from qtool.bench.generate import bench_generate as run

    on_cuda = device.startswith("cuda")
    if on_cuda:
        _require_cuda()
    res = run(shape, tuple(batches), context, new_tokens, max_context, group_size, device=device)
    if on_cuda:
        from qtool.bench.kernels import device_info

        info = device_info()
    else:
        info = {"device": "cpu"}
    return {"bench": "generate", "device": info, **res}
