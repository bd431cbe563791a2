"""Run a recipe layer by layer over a model streamed from its shards, exporting as it goes.

``qtool quantize RECIPE --stream``: the model is built on the meta device and only its embeddings,
final norm and ``lm_head`` are loaded (:mod:`qtool.models.streaming`). Then, decoder layer by decoder
layer, the layer is read from the shards, every step does its part on it (``stream_layer``, in
recipe order: rotate, then rtn or gptq), the calibration stream advances through it, its exported
tensors are saved, and its memory is given back. The checkpoint is written shard by shard at the
end, sharded like the input, byte-identical to the in-memory path's export.

Peak host memory: one decoder layer in the math dtype, the calibration activations, embeddings and
``lm_head`` (in the checkpoint's dtype unless a step changes them, e.g. ``rotate``: then in the math
dtype), and one output shard while it is written.

Resume: everything lives in ``.<output>.partial`` beside the output until the final rename. After
each layer the driver saves that layer's exported tensors, the calibration activations entering the
next layer, the step records and the RNG state (``.qtool-state/``). Re-running the same command
continues after the last finished layer; a changed recipe, model or calibration is refused with a
message naming what changed. An interrupted run never leaves a half-written checkpoint at the output.

Under torchrun every rank streams the same layer from the shards and pushes its own share of the
calibration windows (the data-parallel steps, ``gptq`` and ``lowrank``, sum their statistics over
ranks); each rank saves its activations (two generations, by layer parity), then rank 0 saves the
layer's tensors and ``state.json`` once all have, so the state always names a layer whose
activations every rank has. Rank 0 alone writes the checkpoint. A resume needs the same number of
ranks (part of the fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qtool
from qtool import dist
from qtool.errors import QtoolError
from qtool.export.writer import (
    check_format,
    check_output,
    checkpoint_size,
    checkpoint_tensors,
    replace_folder,
    write_metadata,
)
from qtool.log import track
from qtool.models.adapters import get_adapter
from qtool.models.loading import resolve_device, resolve_model_path
from qtool.models.prepare import prepare_model
from qtool.models.shards import ShardReader, shard_plan, write_shards
from qtool.models.streaming import layers_prefix, load_skeleton, materialize_layer, release_layer
from qtool.steps.base import Context
from qtool.steps.layerwise import LayerwiseRunner
from qtool.steps.registry import STEPS, step_name

logger = logging.getLogger("qtool")
STATE = ".qtool-state"


class StreamInterrupted(RuntimeError):
    """Raised by the test hook ``stop_after`` once a layer's state is saved (a simulated crash)."""


def check_streamable(steps: list) -> None:
    """Refuse, before any work, a recipe with a step that cannot run layer by layer."""
    reasons = [s.stream_refusal() for s in steps if step_name(s) != "export"]
    reasons = [r for r in reasons if r]
    if reasons:
        streams = ", ".join(sorted(n for n, c in STEPS.items() if c.streams and n != "export"))
        raise QtoolError("; ".join(reasons) + f" (steps that stream: {streams})")
    runners = [step_name(s) for s in steps if type(s).needs_runner]
    if len(runners) > 1:
        raise QtoolError(
            f"--stream runs at most one calibrated step, got {', '.join(runners)}; run without --stream"
        )


def partial_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(
    recipe, model_path: Path, reader: ShardReader, calibration: torch.Tensor | None
) -> dict[str, str]:
    """What a resumed run must share with the interrupted one, each part hashed on its own."""
    files = sorted(set(reader.weight_map.values()))
    model = json.dumps(
        {
            "config": (model_path / "config.json").read_text(),
            "shards": [(f, (model_path / f).stat().st_size) for f in files],
        }
    ).encode()
    return {
        "recipe": _digest(recipe.to_yaml().encode()),
        "model": _digest(model),
        "calibration": "none" if calibration is None else _digest(calibration.cpu().numpy().tobytes()),
        "qtool": qtool.__version__,
        "ranks": str(dist.world()),  # each rank's saved activations are its own share of the windows
    }


class StreamState:
    """The resumable state of a streamed run, inside the partial output folder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.dir = tmp / STATE

    def load(self) -> dict[str, Any] | None:
        f = self.dir / "state.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def layer_file(self, i: int) -> Path:
        return self.dir / f"layer-{i:05d}.safetensors"

    def inputs_file(self, i: int) -> Path:
        """This rank's calibration activations leaving layer ``i`` (two generations by parity, so the
        files of the layer that ``state.json`` names are never the ones being overwritten)."""
        return self.dir / f"inputs-rank{dist.rank():03d}-{i % 2}.safetensors"

    def save_inputs(self, i: int, inputs) -> None:
        stacked = {f"batch.{k:05d}": x.contiguous() for k, x in enumerate(inputs)}
        tmp = self.inputs_file(i).with_suffix(".tmp")
        save_file(stacked, str(tmp), metadata={"layer": str(i)})
        tmp.replace(self.inputs_file(i))

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Save layer ``i``'s exported tensors and the run state, each through a temporary name, so a
        crash at any point leaves the previous layer's state whole (rank 0 only)."""
        save_file(tensors, str(self.layer_file(i)), metadata={"format": "pt"})
        (self.dir / "state.tmp").write_text(json.dumps(state))
        (self.dir / "state.tmp").replace(self.dir / "state.json")

    def inputs(self, i: int) -> list[torch.Tensor]:
        """This rank's activations leaving layer ``i`` (checked against the layer they belong to)."""
        with safe_open(str(self.inputs_file(i)), "pt") as fh:
            layer = (fh.metadata() or {}).get("layer")
            if layer != str(i):
                raise QtoolError(
                    f"{self.inputs_file(i)} holds the activations of layer {layer}, not {i}; delete "
                    f"{self.tmp} to start over"
                )
            return [fh.get_tensor(k) for k in sorted(fh.keys())]


def check_resumable(output: str | Path) -> None:
    """``--resume``: there must be an interrupted run of ``output`` to continue (checked before any
    work; whether it is a run of the same recipe, model and calibration is checked once they are read)."""
    tmp = partial_folder(Path(output))
    if StreamState(tmp).load() is None:
        raise QtoolError(
            f"--resume: no interrupted run of {output} to continue (no saved state in {tmp}); run the "
            "command without --resume to start one (a --stream run saves its state after every layer)"
        )


def run_streaming(
    recipe, steps: list, output: str | Path, overwrite: bool = False, stop_after: int | None = None
):
    """Run ``steps`` (the recipe's, ending with ``export``) layer by layer; returns the Context."""
    check_streamable(steps)
    export = steps[-1]
    others = steps[:-1]
    path = Path(resolve_model_path(recipe.model))
    if not path.is_dir():
        raise QtoolError(
            f"--stream reads the model's safetensors shards from a local folder; {recipe.model!r} is not one "
            "(download it first, e.g. `huggingface-cli download ID --local-dir DIR`, and point `model:` at DIR)"
        )
    reader = ShardReader(path)  # refuses pickle-only folders before anything is loaded
    output = check_output(output, overwrite)
    torch.manual_seed(recipe.seed)
    kill = os.environ.get("QTOOL_TEST_KILL_AFTER_LAYER")  # test hook: "LAYER" or "LAYER:RANK", a real SIGKILL
    kill_after = (
        None if not kill else (int(kill.split(":")[0]), int(kill.split(":")[1]) if ":" in kill else 0)
    )
    device = resolve_device(recipe.device)
    keep_outer = not any(type(s).modifies_outer for s in others)
    model, tok = load_skeleton(path, reader, recipe.dtype, keep_outer=keep_outer)
    prepare_model(model, recipe.scheme)
    ctx = Context(
        recipe=recipe, model=model, tokenizer=tok, device=device, output=output, overwrite=overwrite
    )
    check_format(ctx, export.format)
    tmp = partial_folder(output)
    state = StreamState(tmp)
    calibrated = any(type(s).needs_runner for s in others)
    fp = fingerprint(recipe, path, reader, ctx.calibration() if calibrated else None)
    saved = state.load()
    if saved is not None and saved["fingerprint"] != fp:
        changed = [k for k in fp if saved["fingerprint"].get(k) != fp[k]]
        what = " and ".join("number of ranks" if k == "ranks" else k for k in changed)
        raise QtoolError(
            f"{tmp} holds an interrupted run of a different {what}; re-run with the same recipe, model, "
            f"calibration and number of processes to resume, or delete {tmp} to start over"
        )
    if saved is None and dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        state.dir.mkdir(parents=True)
    dist.barrier()  # the other ranks write their activations into the folder rank 0 made
    start_layer = saved["next_layer"] if saved else 0
    if saved:
        logger.info("resuming %s at decoder layer %d (state in %s)", output, start_layer, tmp)
        torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))

    t0 = time.perf_counter()
    for step in others:
        logger.info("step %s (streamed)", step_name(step))
        try:
            step.stream_start(ctx)
        except QtoolError as exc:
            raise QtoolError(f"step `{step_name(step)}`: {exc}") from None
    runner = None
    if calibrated:
        batch = next(s.batch_size for s in others if type(s).needs_runner)
        shard = all(s.runs_data_parallel() for s in others if type(s).needs_runner)
        runner = LayerwiseRunner(ctx, batch, offload=True, shard=shard)
        if saved:
            runner.inputs = state.inputs(start_layer - 1)
    if saved:
        for name, rec in saved["step_state"].items():
            ctx.state[name].update(rec)
    prefix = layers_prefix(model)
    n_layers = len(get_adapter(model.config).layers(model))
    quantized: list[str] = list(saved["quantized"]) if saved else []
    keys: list[str] = list(saved["keys"]) if saved else []
    # per step: [layer, key] of its sidecar tensors (stream_extra), in order
    extras: dict[str, list] = {k: list(v) for k, v in saved["extras"].items()} if saved else {}

    def gathered(name: str) -> dict[str, torch.Tensor]:
        out = {}
        for layer_i, key in extras.get(name, []):
            with safe_open(str(state.layer_file(layer_i)), "pt") as fh:
                out[key] = fh.get_tensor(f"sidecar/{name}/{key}")
        return out

    if saved:
        for step in others:
            step.stream_restore(ctx, gathered(step_name(step)))
    first_quant = next((k for k, s in enumerate(others) if type(s).quantizes_weights), len(others))
    summary = next((s for s in others if hasattr(s, "layer_summary")), None)

    for i in track(
        range(start_layer, n_layers),
        "layers (streamed)",
        detail=(lambda: summary.layer_summary(ctx)) if summary else None,
    ):
        layer = materialize_layer(model, i, reader).to(device)
        for k, step in enumerate(others):
            if k == first_quant:
                for s in others:
                    s.stream_fp_layer(ctx, i, layer)
            step.stream_layer(ctx, runner, i, layer)
        if first_quant == len(others):
            for s in others:
                s.stream_fp_layer(ctx, i, layer)
        if runner is not None:
            runner.advance(layer)
        mine = f"{prefix}{i}."
        tensors = checkpoint_tensors(
            model, export.format, ctx.scale_dtype, select=lambda k, m=mine: k.startswith(m)
        )
        quantized += sorted(
            n for n, m in layer.named_modules(prefix=mine[:-1]) if getattr(m, "qweight", None) is not None
        )
        keys += list(tensors)
        for step in others:
            name = step_name(step)
            for key, t in step.stream_extra(ctx, i, layer).items():
                tensors[f"sidecar/{name}/{key}"] = t.contiguous()
                extras.setdefault(name, []).append([i, key])
        step_state = {
            name: {k: v for k, v in st.items() if k != "start"}
            for name, st in ctx.state.items()
            if isinstance(st, dict) and "errors" in st
        }
        if runner is not None:  # every rank its own share, before rank 0 declares the layer done
            state.save_inputs(i, runner.inputs)
        dist.barrier()
        if dist.is_main():
            state.save_layer(
                i,
                tensors,
                {
                    "fingerprint": fp,
                    "next_layer": i + 1,
                    "quantized": quantized,
                    "keys": keys,
                    "extras": extras,
                    "step_state": step_state,
                    "rng": torch.get_rng_state().tolist(),
                },
            )
        dist.barrier()
        del tensors
        release_layer(model, i)
        if stop_after is not None and i == stop_after:
            raise StreamInterrupted(f"stopped after layer {i} (test hook)")
        if kill_after is not None and i == kill_after[0] and dist.rank() == kill_after[1]:
            logger.warning("killing rank %d after layer %d (QTOOL_TEST_KILL_AFTER_LAYER)", dist.rank(), i)
            os.kill(os.getpid(), signal.SIGKILL)

    for step in others:
        step.stream_end(ctx)
        ctx.record(step_name(step), {"streamed": True})
    ctx.results["quantize_seconds"] = time.perf_counter() - t0
    if not dist.is_main():  # rank 0 alone writes the checkpoint; the others wait for it
        dist.barrier()
        return ctx
    glob_tensors = checkpoint_tensors(
        model, export.format, ctx.scale_dtype, select=lambda k: not k.startswith(prefix)
    )
    plan = shard_plan(keys + list(glob_tensors), reader)
    owner = {k: state.layer_file(int(k[len(prefix) :].split(".", 1)[0])) for k in keys}

    def fetch(key: str) -> torch.Tensor:
        if key in glob_tensors:
            return glob_tensors[key]
        with safe_open(str(owner[key]), "pt") as fh:
            return fh.get_tensor(key)

    for f in tmp.glob("*.safetensors"):  # shards of an earlier attempt at this last stage
        f.unlink()
    write_shards(tmp, plan, fetch)
    written = {step.stream_sidecar(ctx, gathered(step_name(step)), tmp) for step in others} - {None}
    write_metadata(ctx, tmp, export.format, sorted(quantized), skip_sidecars=written)
    shutil.rmtree(state.dir)
    replace_folder(tmp, output)
    size = checkpoint_size(output)
    ctx.record("export", {"path": str(output), "format": export.format, **size})
    logger.info("export: wrote %s (%.1f MB), streamed layer by layer", output, size["bytes"] / 1e6)
    dist.barrier()
    return ctx
