"""qtool and llm-compressor side by side: same model, same calibration windows, same settings.

    make peer-venv                                  # once: .peer-venv with llm-compressor (its own transformers)
    python -m scripts.bench.vs_llmcompressor        # full comparison (see README for the duration)
    python -m scripts.bench.vs_llmcompressor --smoke   # tiny sizes: proves only that the harness works

What it does, per calibration seed and per recipe (``--recipes``):

1. Here (qtool's ``.venv``): the model folder comes from ``qtool.models.loading.resolve_model_path``
   (default: the embedded SmolLM2-135M, a local Hugging Face folder both tools read); the
   calibration windows are drawn once with ``qtool.data.datasets.calibration_windows`` and the
   evaluation windows once with ``qtool.eval.perplexity.eval_windows`` (WikiText-2 test, first
   ``--limit`` windows of ``--seq-len`` tokens). Both go to one ``data.safetensors`` file.
2. Quantize: two processes started at the same time, qtool pinned to core 0 (``taskset -c 0``,
   ``.venv``) and llm-compressor to core 1 (``taskset -c 1``, ``.peer-venv``), one thread each,
   each under ``/usr/bin/time -v`` (wall time, user + system CPU seconds, peak RSS of the whole
   process: imports, model load, calibration, quantization, export). qtool gets the very same
   token ids (its calibration draw is replaced by the saved tensor), llm-compressor gets them as a
   pre-tokenized ``datasets.Dataset`` (not shuffled). Both export their checkpoint.
3. Evaluate: again two pinned processes at the same time, each reloading its tool's exported
   checkpoint (qtool's loader; plain transformers + compressed-tensors in the peer venv) and
   scoring the saved windows with the same function, ``qtool.eval.perplexity.perplexity_of_windows``
   (imported from this repository in the peer venv too).

Results: ``results/<out>.json`` (every measurement, per-window NLLs, recipes, versions) and
``results/<out>.md`` (a table with the ratios qtool / llm-compressor). ``--smoke`` writes
``vs_llmcompressor_smoke.*``. The same module is also the worker both processes run
(``python -m scripts.bench.vs_llmcompressor _worker KIND SPEC`` from the repository root), so it
imports nothing from qtool at module level: the peer venv has no qtool installed and takes
``qtool.eval.perplexity`` from this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "results"

# --- the comparisons ------------------------------------------------------------------------------
# compressed-tensors' symmetric grid: scale = amax / ((qmax - qmin) / 2) = amax / 7.5 at 4 bits, codes
# clamped to [-8, 7]; qtool's default is amax / 7 (the largest magnitude lands on a code). qtool's
# `grid: half_range` is the peer's grid, for weights and activations alike.
# Each comparison is one setting written for both tools: qtool_recipe() turns it into qtool's YAML,
# peer_settings() into llm-compressor's modifiers (built in the peer worker).
RECIPES: dict[str, dict] = {
    "w4a16-g64": {
        "label": "W4A16 g64 GPTQ, act-order (static groups)",
        "scheme": "scheme: {preset: W4A16, weights: {bits: 4, symmetric: true, group_size: 64, "
        "grid: half_range}}",
        "rotate": False,
        "act_order": True,
        "weights": {"strategy": "group", "group_size": 64},
        "act4": False,
        "qtool_defaults": False,
    },
    "w4a4-rot": {
        "label": "W4A4 rotate (residual, down_proj, per-head V/O) + GPTQ per-channel, A4 per token, no act-order",
        "scheme": "scheme: {preset: W4A4, weights: {bits: 4, symmetric: true, group_size: null, "
        "grid: half_range}, activations: {bits: 4, clip_ratio: 1.0, grid: half_range}}",
        "rotate": True,
        "act_order": False,
        "weights": {"strategy": "channel"},
        "act4": True,
        "qtool_defaults": False,
    },
    "w4a4-rot-ao": {
        "label": "W4A4 rotate + GPTQ per-channel, A4 per token, act-order (the peer's default)",
        "scheme": "scheme: {preset: W4A4, weights: {bits: 4, symmetric: true, group_size: null, "
        "grid: half_range}, activations: {bits: 4, clip_ratio: 1.0, grid: half_range}}",
        "rotate": True,
        "act_order": True,
        "weights": {"strategy": "channel"},
        "act4": True,
        "qtool_defaults": False,
    },
    "w4a4-defaults": {
        "label": "W4A4 rotate + GPTQ, each tool's own defaults (qtool: MSE weight clip, act clip 0.9; "
        "peer: min-max, act-order)",
        "scheme": "scheme: {preset: W4A4, weights: {bits: 4, symmetric: true, group_size: null}, "
        "activations: {bits: 4, clip_ratio: 0.9}}",
        "rotate": True,
        "act_order": None,  # each tool's default
        "weights": {"strategy": "channel"},
        "act4": True,
        "qtool_defaults": True,
    },
}
DEFAULT_RECIPES = "w4a16-g64,w4a4-rot,w4a4-rot-ao,w4a4-defaults"
GPTQ_DAMP = 0.01
GPTQ_BLOCK = 128


def qtool_recipe(name: str, model: str, samples: int, seq_len: int, seed: int, true_sequential: bool) -> str:
    r = RECIPES[name]
    steps = []
    if r["rotate"]:
        steps.append(
            "  - rotate: {kind: hadamard, seed: 0, residual: true, down_proj: true, attention_vo: true}"
        )
    if r["qtool_defaults"]:
        steps.append(f"  - gptq: {{block_size: {GPTQ_BLOCK}, damp: {GPTQ_DAMP}}}")
        ckpt = ""
    else:
        steps.append(
            f"  - gptq: {{block_size: {GPTQ_BLOCK}, damp: {GPTQ_DAMP}, act_order: {str(r['act_order']).lower()}, "
            f"mse_clip: false, true_sequential: {str(true_sequential).lower()}}}"
        )
        ckpt = "checkpoint_dtype: float32\n"  # the peer saves the float32 model's tensors as they are
    steps.append("  - export: {format: compressed-tensors}")
    return (
        f"model: {model}\ndtype: float32\n{ckpt}device: cpu\nseed: 0\n"
        f"calibration: {{dataset: wikitext2, split: auto, samples: {samples}, seq_len: {seq_len}, seed: {seed}}}\n"
        f"{r['scheme']}\nsteps:\n" + "\n".join(steps) + "\n"
    )


def peer_settings(name: str) -> dict:
    """What the peer worker builds (JSON-able, recorded in the results)."""
    r = RECIPES[name]
    weights = {"num_bits": 4, "type": "int", "symmetric": True, **r["weights"]}
    if not r["qtool_defaults"]:
        weights["observer"] = "minmax"
    group = {"targets": ["Linear"], "weights": weights}
    if r["act4"]:
        group["input_activations"] = {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        }
    gptq = {
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "block_size": GPTQ_BLOCK,
        "dampening_frac": GPTQ_DAMP,
    }
    if r["act_order"] is not None:
        gptq["actorder"] = "static" if r["act_order"] else None
    return {
        # "hadamard" is Sylvester-only (powers of 2; SmolLM2's 576 is 36 x 16): "random-hadamard" is the
        # peer's randomized Hadamard from its stored orders, as qtool's `kind: hadamard`
        "spinquant": {"rotations": ["R1", "R2", "R4"], "transform_type": "random-hadamard"}
        if r["rotate"]
        else None,
        "gptq": gptq,
    }


# --- workers (run in their own process, in their own venv) -------------------------------------------


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def worker_qtool_quantize(spec: dict) -> dict:
    _one_thread()
    import torch
    from safetensors.torch import load_file

    ids = load_file(spec["data"])["calibration"]

    import qtool.steps.base as base

    calls = []

    def same_windows(tokenizer, dataset, split, samples, seq_len, seed):
        if (samples, seq_len) != tuple(ids.shape):
            raise RuntimeError(f"recipe asks {samples} x {seq_len}, data holds {tuple(ids.shape)}")
        calls.append((samples, seq_len))
        return ids.clone()

    base.calibration_windows = same_windows  # qtool calibrates on exactly the ids the peer gets
    from qtool.api import quantize, versions
    from qtool.log import setup_logging

    setup_logging()  # the log (in the harness's working folder) shows each step and layer with its peak RSS
    from qtool.recipe import load_recipe

    t0 = time.perf_counter()
    ctx = quantize(load_recipe(spec["recipe_path"]), output=spec["out"], overwrite=True)
    total = time.perf_counter() - t0
    if not calls:
        raise RuntimeError("qtool never asked for calibration windows: the shared ids were not used")
    steps = {k: v.get("seconds") for k, v in ctx.results.items() if isinstance(v, dict) and "seconds" in v}
    return {
        "seconds_in_process": total,
        "steps_seconds": steps,
        "quantize_seconds": ctx.results.get("quantize_seconds"),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
    }


def worker_peer_quantize(spec: dict) -> dict:
    _one_thread()
    import torch
    from safetensors.torch import load_file

    ids = load_file(spec["data"])["calibration"]
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    load_s = time.perf_counter() - t0
    n, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n})
    settings = spec["peer"]
    recipe = []
    if settings["spinquant"]:
        recipe.append(SpinQuantModifier(**settings["spinquant"]))
    recipe.append(GPTQModifier(**settings["gptq"]))
    t1 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        output_dir=spec["out"],
    )
    oneshot_s = time.perf_counter() - t1
    res = {
        "seconds_in_process": time.perf_counter() - t0,
        "load_seconds": load_s,
        "oneshot_seconds_with_save": oneshot_s,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
    }
    if spec.get("check_in_memory"):
        # the in-memory model right after oneshot, on the same windows (checks the reload path)
        res["in_memory_ppl"] = _ppl(model.eval(), spec)["ppl"]
    return res


def _ppl(model, spec: dict) -> dict:
    # the peer venv has no qtool installed: the worker runs as `python -m scripts.bench...` from the
    # repository root, so `qtool` is this repository's package there
    import torch
    from safetensors.torch import load_file

    from qtool.eval.perplexity import perplexity_of_windows

    windows = load_file(spec["data"])["eval"]
    with torch.no_grad():
        res = perplexity_of_windows(model, windows, spec["total_windows"], "wikitext2", [], "none", 1)
    return {"ppl": res.ppl, "nll_per_window": res.nll_per_window, "eval_seconds": res.seconds}


def worker_eval(spec: dict) -> dict:
    _one_thread()
    import torch

    t0 = time.perf_counter()
    if spec["side"] == "qtool":
        from qtool.api import load

        model, _, info = load(spec["out"], "float32", "cpu", kernels="off")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            spec["out"], dtype=torch.float32, attn_implementation="sdpa"
        )
        model.eval().requires_grad_(False)
        info = {
            "kind": "transformers + compressed-tensors",
            "online_transforms": _peer_online_transforms(model, spec["out"]),
        }
    load_s = time.perf_counter() - t0
    return {**_ppl(model, spec), "load_seconds": load_s, "loaded": info}


def _peer_online_transforms(model, folder: str) -> list[str]:
    """Re-attach the checkpoint's online rotations (SpinQuant R4 before ``down_proj``).

    transformers' compressed-tensors loader restores the quantized linears (weights dequantized,
    dynamic per-token activation quantization in their forward) but not the transforms of the
    ``transform_config``: the offline ones (R1, R2, R4's weight side) are already fused into the
    saved weights, the online ones must run at inference. Attach only the online parts with
    compressed-tensors' own ``apply_transform_config`` and give them the matrices the checkpoint
    stores (random Hadamard matrices are drawn at quantization time; one tensor per transform,
    shared by every layer).
    """
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    tcfg = config.get("quantization_config", {}).get("transform_config")
    if not tcfg:
        return []
    online = {}
    for name, scheme in tcfg["config_groups"].items():
        keep = [a for a in scheme["apply"] if a["location"] in ("input", "output", "q_attn", "k_cache")]
        if keep:
            online[name] = {**scheme, "apply": keep}
    if not online:
        return []
    apply_transform_config(model, TransformConfig(config_groups=online))
    saved = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                for name, scheme in online.items():
                    for a in scheme["apply"]:
                        suffix = f".{name}_{a['location']}.weight"
                        if key.endswith(suffix):
                            saved[suffix] = st.get_tensor(key)
    attached = []
    for mod_name, module in model.named_modules():
        for suffix, tensor in saved.items():
            if (mod_name + ".weight").endswith(suffix):
                if tuple(module.weight.shape) != tuple(tensor.shape):
                    raise RuntimeError(
                        f"{mod_name}: saved transform {tuple(tensor.shape)}, built {tuple(module.weight.shape)}"
                    )
                module.weight.data = tensor.to(module.weight.dtype)
                attached.append(mod_name)
    missing = [
        s
        for s in {f".{n}_{a['location']}.weight" for n, s_ in online.items() for a in s_["apply"]}
        if s not in saved
    ]
    if missing:
        raise RuntimeError(f"online transforms without a saved matrix: {missing}")
    return sorted({a.rsplit(".", 1)[-1] for a in attached}) + [f"{len(attached)} modules"]


WORKERS = {
    "qtool-quantize": worker_qtool_quantize,
    "peer-quantize": worker_peer_quantize,
    "eval": worker_eval,
}


# --- the orchestrator (qtool's venv) ------------------------------------------------------------------


def parse_time_v(text: str) -> dict:
    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1) if m else None

    wall = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)")
    seconds = None
    if wall:
        seconds = 0.0
        for part in wall.split(":"):
            seconds = seconds * 60 + float(part)
    user, system, rss = (
        grab(r"User time \(seconds\): ([0-9.]+)"),
        grab(r"System time \(seconds\): ([0-9.]+)"),
        grab(r"Maximum resident set size \(kbytes\): (\d+)"),
    )
    share = grab(r"Percent of CPU this job got: (\d+)%")
    return {
        "wall_seconds": seconds,
        "cpu_seconds": float(user) + float(system) if user and system else None,
        "user_seconds": float(user) if user else None,
        "system_seconds": float(system) if system else None,
        "peak_rss_gb": int(rss) / 2**20 if rss else None,
        "cpu_share": int(share) / 100 if share else None,
    }


def allocator_env(tuned: bool) -> dict[str, str]:
    """The allocator settings a process runs with: qtool's (:mod:`qtool.allocator`, what its command
    line sets for itself) when ``tuned``, else none (glibc's defaults)."""
    if not tuned:
        return {}
    from qtool.allocator import tuned_env

    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env = tuned_env(base)
    return {} if env is None else {"GLIBC_TUNABLES": env["GLIBC_TUNABLES"]}


def pinned_and_timed(core: int, *argv: str) -> list[str]:
    """``argv`` on one core (``taskset``) under ``/usr/bin/time -v`` (peak RSS, wall and CPU seconds:
    :func:`parse_time_v`)."""
    return ["taskset", "-c", str(core), "/usr/bin/time", "-v", *argv]


def launch(
    python: str, core: int, kind: str, spec: dict, workdir: Path, tag: str, tuned: bool = False
) -> tuple[subprocess.Popen, Path]:
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = workdir / f"{tag}.log"
    # from the repository root: `qtool` imports from here in the peer venv too
    cmd = pinned_and_timed(
        core, python, "-m", "scripts.bench.vs_llmcompressor", "_worker", kind, str(spec_path)
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "QTOOL_NO_PROGRESS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("GLIBC_TUNABLES", None)
    env.update(allocator_env(tuned))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, log


def collect(proc: subprocess.Popen, log: Path, spec_path: Path) -> dict:
    code = proc.wait()
    text = log.read_text(errors="replace")
    out = {"exit_status": code, **parse_time_v(text)}
    result = Path(str(spec_path).replace(".spec.json", ".result.json"))
    if result.is_file():
        out.update(json.loads(result.read_text()))
    if code != 0:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("\t")]
        out["error_tail"] = lines[-8:]
    return out


def run_pair(
    kind_q: str, spec_q: dict, kind_p: str, spec_p: dict, args, workdir: Path, tag: str
) -> tuple[dict, dict]:
    """Both tools' processes, started at the same time, qtool on core 0 and the peer on core 1."""
    # qtool's worker runs with the allocator settings its command line gives itself; the peer with
    # glibc's defaults, or the same settings with --peer-allocator qtool
    pq, lq = launch(sys.executable, 0, kind_q, spec_q, workdir, f"{tag}-qtool", tuned=True)
    pp, lp = launch(
        args.peer_python, 1, kind_p, spec_p, workdir, f"{tag}-peer", tuned=args.peer_allocator == "qtool"
    )
    rq = collect(pq, lq, workdir / f"{tag}-qtool.spec.json")
    rp = collect(pp, lp, workdir / f"{tag}-peer.spec.json")
    return rq, rp


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def fmt(x, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def render(data: dict) -> str:
    s = data["settings"]
    smoke = (
        " **SMOKE RUN: tiny sizes, proves only that the harness works; no speed, memory or quality claim.**"
        if s["smoke"]
        else ""
    )
    md = [
        f"qtool vs llm-compressor {data['peer_versions'].get('llmcompressor', '?')}: {s['model']}, float32, "
        f"calibration {s['calib_samples']} x {s['calib_seq_len']} WikiText-2 ({s['calib_split']}), seeds "
        f"{','.join(map(str, s['seeds']))}; GPTQ damp {GPTQ_DAMP}, block {GPTQ_BLOCK}; ppl on the first "
        f"{s['limit']} WikiText-2 test windows of {s['seq_len']} tokens (qtool's protocol for both checkpoints); "
        f"quantize = whole process under /usr/bin/time -v (imports, load, calibration, export), qtool on core 0 "
        f"and llm-compressor on core 1 at the same time, one thread each; {data['machine']}.{smoke}",
        "",
        "| recipe | seed | time s (qtool / peer / ratio) | CPU s (qtool / peer / ratio) | peak RSS GiB (qtool / peer / ratio) | ppl qtool | ppl peer | ppl ratio |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for r in data["rows"]:
        q, p = r["qtool"], r["peer"]
        qe, pe = r.get("qtool_eval", {}), r.get("peer_eval", {})
        md.append(
            f"| {r['recipe']} | {r['seed']} | {fmt(q.get('wall_seconds'), '.1f')} / {fmt(p.get('wall_seconds'), '.1f')} / "
            f"{fmt(r['ratios']['wall'], '.2f')} | {fmt(q.get('cpu_seconds'), '.1f')} / {fmt(p.get('cpu_seconds'), '.1f')} / "
            f"{fmt(r['ratios']['cpu'], '.2f')} | {fmt(q.get('peak_rss_gb'), '.2f')} / {fmt(p.get('peak_rss_gb'), '.2f')} / "
            f"{fmt(r['ratios']['rss'], '.2f')} | {fmt(qe.get('ppl'), '.3f')} | {fmt(pe.get('ppl'), '.3f')} | "
            f"{fmt(r['ratios']['ppl'], '.3f')} |"
        )
    if len(s["seeds"]) > 1:
        md += [
            "",
            "Mean over seeds:",
            "",
            "| recipe | seeds | time ratio | CPU ratio | RSS ratio | ppl qtool | ppl peer | ppl ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in s["recipes"]:
            rs = [r for r in data["rows"] if r["recipe"] == name]
            pq = _mean([r.get("qtool_eval", {}).get("ppl") for r in rs])
            pp = _mean([r.get("peer_eval", {}).get("ppl") for r in rs])
            means = [fmt(_mean([r["ratios"][k] for r in rs])) for k in ("wall", "cpu", "rss")]
            md.append(
                f"| {name} | {','.join(str(r['seed']) for r in rs)} | {' | '.join(means)} | "
                f"{fmt(pq, '.3f')} | {fmt(pp, '.3f')} | "
                f"{fmt(ratio(pq, pp), '.3f')} |"
            )
    shares = [x for r in data["rows"] for x in (r["qtool"].get("cpu_share"), r["peer"].get("cpu_share")) if x]
    if shares:
        md += [
            "",
            f"CPU share each quantize process got (CPU s / wall s, from /usr/bin/time): {min(shares):.0%} to "
            f"{max(shares):.0%}; below 100% other jobs shared the cores and wall times are pessimistic: "
            "CPU seconds are the steadier comparison.",
        ]
    checks = [r for r in data["rows"] if "in_memory_ppl" in r["peer"]]
    for r in checks:
        md += [
            "",
            f"Peer reload check ({r['recipe']}, seed {r['seed']}): in-memory model right after oneshot ppl "
            f"{r['peer']['in_memory_ppl']:.6f}, reloaded checkpoint {fmt(r.get('peer_eval', {}).get('ppl'), '.6f')} "
            "(the peer's time and RSS above then include that extra evaluation).",
        ]
    md += ["", "Recipes:"]
    for name in s["recipes"]:
        md.append(f"- `{name}`: {RECIPES[name]['label']}")
    md += [
        "",
        f"Settings not shared by both tools: qtool `true_sequential: {str(s['true_sequential']).lower()}`, GPTQ "
        "forward batch 8 (qtool's default); llm-compressor's sequential pipeline, calibration batch 1 (its default). "
        "qtool's rotation mixes the 9 heads with a random orthogonal 9 x 9 (no Hadamard of order 9); "
        "llm-compressor's R1/R2/R4 Hadamard does not mix heads.",
    ]
    if "allocator" in s:  # runs before the allocator settings existed ran both with glibc's defaults
        md.append(
            f"Allocator (GLIBC_TUNABLES): qtool `{s['allocator']['qtool']}` (what its command line sets for "
            f"itself, qtool/allocator.py); peer `{s['allocator']['peer']}`."
        )
    md += [
        f"Versions: qtool side {json.dumps(data['qtool_versions'])}; peer side {json.dumps(data['peer_versions'])}.",
        f"Command: `{data['command']}`",
    ]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", help="embedded name, local HF folder (both tools read it)"
    )
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma list of {', '.join(RECIPES)}")
    p.add_argument("--limit", type=int, default=16, help="first N WikiText-2 test windows")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window length")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument(
        "--seeds", default="0", help="calibration seeds, comma list (each: a fresh draw of windows)"
    )
    p.add_argument(
        "--true-sequential",
        choices=["on", "off"],
        default="on",
        help="qtool's gptq true_sequential (llm-compressor has no such option: one solve per layer)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="4 x 128 calibration, 1 window of 2048, w4a16-g64,w4a4-rot"
    )
    p.add_argument(
        "--check-peer-in-memory",
        action="store_true",
        help="also score the peer's in-memory model right after oneshot (checks its reload path; "
        "its time and RSS then include that evaluation)",
    )
    p.add_argument("--peer-python", default=str(REPO / ".peer-venv/bin/python"))
    p.add_argument(
        "--peer-allocator",
        choices=["default", "qtool"],
        default="default",
        help="the peer's process with glibc's default allocator settings (as it runs), or with the ones "
        "qtool's command line sets for itself (qtool.allocator), to see what they do for it",
    )
    p.add_argument(
        "--keep", default=None, help="keep checkpoints and logs in this folder (default: a temp folder)"
    )
    p.add_argument("--out", default=None, help="results/<out>.{json,md} (default vs_llmcompressor[_smoke])")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="no run: merge result files of separate runs (e.g. one per seed) into results/<out>.{json,md}",
    )
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out or "vs_llmcompressor")
        return
    if args.smoke:
        args.calib_samples, args.calib_seq_len, args.limit = 4, 128, 1
        if args.recipes == DEFAULT_RECIPES:
            args.recipes = "w4a16-g64,w4a4-rot"
    out_name = args.out or ("vs_llmcompressor_smoke" if args.smoke else "vs_llmcompressor")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    if not Path(args.peer_python).is_file():
        p.error(f"{args.peer_python} not found: run `make peer-venv` first")
    if os.cpu_count() < 2:
        p.error("needs 2 cores (one per tool)")
    seeds = [int(s) for s in args.seeds.split(",")]
    mirror = REPO.parent / "shared" / "data"
    if "QTOOL_DATA_DIR" not in os.environ and mirror.is_dir():
        os.environ["QTOOL_DATA_DIR"] = str(mirror)  # as the Makefile sets it; the workers inherit it

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qtool.api import versions
    from qtool.data.datasets import calibration_windows, resolve_calibration_split
    from qtool.eval.perplexity import eval_windows
    from qtool.models.loading import resolve_model_path
    from scripts.tables.common import command

    model_path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    windows, total = eval_windows(tok, "wikitext2", args.seq_len, args.limit)
    calib_split = resolve_calibration_split("wikitext2", "auto")
    keep = Path(args.keep) if args.keep else None
    tmp = tempfile.TemporaryDirectory(dir="/tmp", prefix="vs_llmc_") if keep is None else None
    root = keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    data: dict = {}
    started = time.time()
    for seed in seeds:
        workdir = root / f"seed{seed}"
        workdir.mkdir(exist_ok=True)
        calib = calibration_windows(tok, "wikitext2", "auto", args.calib_samples, args.calib_seq_len, seed)
        data_path = workdir / "data.safetensors"
        save_file({"calibration": calib.contiguous(), "eval": windows.contiguous()}, str(data_path))
        for name in recipes:
            tag = f"{name}-s{seed}"
            recipe_text = qtool_recipe(
                name, model_path, args.calib_samples, args.calib_seq_len, seed, args.true_sequential == "on"
            )
            recipe_path = workdir / f"{name}.yaml"
            recipe_path.write_text(recipe_text)
            common = {"data": str(data_path), "total_windows": total, "model": model_path}
            spec_q = {**common, "recipe_path": str(recipe_path), "out": str(workdir / f"{name}-qtool")}
            spec_p = {
                **common,
                "peer": peer_settings(name),
                "out": str(workdir / f"{name}-peer"),
                "check_in_memory": args.check_peer_in_memory,
            }
            print(
                f"[{time.time() - started:7.0f} s] {tag}: quantize (qtool core 0, llm-compressor core 1)",
                flush=True,
            )
            rq, rp = run_pair(
                "qtool-quantize", spec_q, "peer-quantize", spec_p, args, workdir, f"{tag}-quantize"
            )
            row = {
                "recipe": name,
                "seed": seed,
                "qtool_recipe": recipe_text,
                "peer_settings": spec_p["peer"],
                "qtool": rq,
                "peer": rp,
            }
            if rq["exit_status"] == 0 and rp["exit_status"] == 0:
                print(f"[{time.time() - started:7.0f} s] {tag}: evaluate both checkpoints", flush=True)
                eq, ep = run_pair(
                    "eval",
                    {**spec_q, "side": "qtool"},
                    "eval",
                    {**spec_p, "side": "peer"},
                    args,
                    workdir,
                    f"{tag}-eval",
                )
                row["qtool_eval"], row["peer_eval"] = eq, ep
            else:
                print(f"  failed: qtool {rq.get('error_tail')}, peer {rp.get('error_tail')}", flush=True)
            qe, pe = row.get("qtool_eval", {}), row.get("peer_eval", {})
            row["ratios"] = {
                "wall": ratio(rq.get("wall_seconds"), rp.get("wall_seconds")),
                "cpu": ratio(rq.get("cpu_seconds"), rp.get("cpu_seconds")),
                "rss": ratio(rq.get("peak_rss_gb"), rp.get("peak_rss_gb")),
                "ppl": ratio(qe.get("ppl"), pe.get("ppl")),
            }
            rows.append(row)
            data = {
                "settings": {
                    "model": args.model,
                    "model_path": model_path,
                    "recipes": recipes,
                    "seeds": seeds,
                    "calib_samples": args.calib_samples,
                    "calib_seq_len": args.calib_seq_len,
                    "calib_split": calib_split,
                    "limit": args.limit,
                    "seq_len": args.seq_len,
                    "total_windows": total,
                    "true_sequential": args.true_sequential == "on",
                    "smoke": args.smoke,
                    "dtype": "float32",
                    "allocator": {
                        "qtool": allocator_env(True).get("GLIBC_TUNABLES", "glibc defaults"),
                        "peer": allocator_env(args.peer_allocator == "qtool").get(
                            "GLIBC_TUNABLES", "glibc defaults"
                        ),
                    },
                    "gptq": {"damp": GPTQ_DAMP, "block_size": GPTQ_BLOCK, "weight_ranges": "min-max"},
                },
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch threads 1 per process",
                "qtool_versions": rq.get("versions") or versions(),
                "peer_versions": rp.get("versions", {}),
                "command": command(),
                "total_seconds": time.time() - started,
                "rows": rows,
            }
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{out_name}.json").write_text(json.dumps(data, indent=2))
            print(render(data).split("\n\n")[1], flush=True)
    (RESULTS / f"{out_name}.md").write_text(render(data))
    print(render(data))
    if tmp is not None:
        tmp.cleanup()


def merge(paths: list[str], out_name: str) -> None:
    """One table from runs made separately (split over processes or sessions): their rows in order;
    the runs must share every setting but the seeds (and may cover different recipes)."""
    runs = [json.loads(Path(f).read_text()) for f in paths]
    keep = ("seeds", "recipes")
    base = {k: v for k, v in runs[0]["settings"].items() if k not in keep}
    for f, r in zip(paths, runs, strict=True):
        other = {k: v for k, v in r["settings"].items() if k not in keep}
        if other != base:
            diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
            raise SystemExit(f"{f}: settings differ from {paths[0]} in {diff}; not merged")
    rows = [row for r in runs for row in r["rows"]]
    recipes = list(dict.fromkeys(name for r in runs for name in r["settings"]["recipes"]))
    seeds = sorted({row["seed"] for row in rows})
    data = {
        **runs[0],
        "settings": {**runs[0]["settings"], "seeds": seeds, "recipes": recipes},
        "command": "; ".join(r["command"] for r in runs) + f"; merged by `{command_line()}`",
        "total_seconds": sum(r["total_seconds"] for r in runs),
        "merged_from": [str(f) for f in paths],
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{out_name}.md").write_text(render(data))
    print(render(data))


def command_line() -> str:
    from scripts.tables.common import command

    return command()


def worker_main(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = WORKERS[kind](spec)
    Path(spec_path.replace(".spec.json", ".result.json")).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
