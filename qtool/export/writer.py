"""Checkpoint writer: safetensors in compressed-tensors or GPTQ layout, written atomically.

A checkpoint folder holds:

* ``model.safetensors``: quantized decoder linears as ``weight_packed`` (int4, see
  ``qtool.quant.packing``) or int8 ``weight`` (other bit widths), ``weight_scale``,
  ``weight_zero_point`` (asymmetric), ``weight_shape``; every other tensor in the checkpoint dtype;
* ``config.json`` with a compressed-tensors ``quantization_config`` (or GPTQ's);
* ``qtool.json``: what qtool's runtime needs beyond that (activation and KV quantization, the
  online rotations of a rotated model, sidecar files), and ``recipe.yaml``, the resolved recipe;
* the sidecar files of the run-time features (:mod:`qtool.models.features`), e.g. the IntactKV pivot cache,
  kept out of the weight file so engines that do not know them are not confused.

Everything is written to a temporary folder beside the target and renamed at the end, so an
interrupted export never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import qtool
from qtool.errors import QtoolError
from qtool.models.features import save_sidecars, sidecar_files
from qtool.models.loading import resolve_model_path
from qtool.models.prepare import iter_qlinears
from qtool.models.shards import INDEX, SINGLE, ShardReader, shard_plan, write_shards
from qtool.quant.packing import pack_gptq, pack_int4, pack_int4_dim0

logger = logging.getLogger("qtool")
FORMATS = ("compressed-tensors", "gptq")


def check_output(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise QtoolError(
            f"output folder {path} exists; pass --overwrite to replace it or choose another --output"
        )
    if path.exists() and not path.is_dir():
        raise QtoolError(f"output {path} exists and is not a folder")
    return path


def _ct_args(spec, dynamic: bool, strategy: str | None = None) -> dict[str, Any]:
    if strategy is None:
        strategy = {"channel": "channel", "group": "group", "token": "token", "tensor": "tensor"}[
            spec.granularity
        ]
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": strategy,
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }


def quantization_config(scheme, fmt: str) -> dict[str, Any]:
    w = scheme.weights.spec() if scheme.weights else None
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": w.bits,
            "group_size": w.group_size if w.granularity == "group" else -1,
            "desc_act": False,
            "sym": True,
            "checkpoint_format": "gptq",
        }
    group: dict[str, Any] = {
        "targets": [f"re:.*\\.{name}$" for name in scheme.targets],
        "weights": _ct_args(w, dynamic=False) if w else None,
        "input_activations": _ct_args(scheme.activations.spec(), dynamic=True)
        if scheme.activations
        else None,
        "output_activations": None,
    }
    packed = w is not None and w.bits == 4
    group["format"] = "pack-quantized" if packed else ("int-quantized" if w else "dense")
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if packed else ("int-quantized" if w else "dense"),
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def _linear_tensors(prefix: str, lin, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    qw = lin.qweight
    out: dict[str, torch.Tensor] = {}
    if lin.bias is not None:
        out[f"{prefix}.bias"] = lin.bias.data.to(dtype)
    if fmt == "gptq":
        out[f"{prefix}.qweight"] = pack_gptq(qw.codes)
        out[f"{prefix}.scales"] = qw.scale.t().contiguous().to(dtype)
        groups = qw.scale.shape[1]
        zeros = torch.full((groups, qw.shape[0]), 7, dtype=torch.int8)  # v1 stores zero - 1
        out[f"{prefix}.qzeros"] = pack_int4_dim0(zeros.t().contiguous() - 8).t().contiguous()
        g = qw.spec.group_size or qw.shape[1]
        out[f"{prefix}.g_idx"] = (torch.arange(qw.shape[1]) // g).to(torch.int32)
        return out
    if qw.spec.bits == 4:
        out[f"{prefix}.weight_packed"] = pack_int4(qw.codes)
    else:
        out[f"{prefix}.weight"] = qw.codes.clone()
    out[f"{prefix}.weight_scale"] = qw.scale.to(dtype)
    if qw.spec.bits == 4:  # packed layouts record the unpacked shape; int8 weights carry it themselves
        out[f"{prefix}.weight_shape"] = torch.tensor(list(qw.shape), dtype=torch.int64)
    if not qw.spec.symmetric:
        zp = qw.zero
        out[f"{prefix}.weight_zero_point"] = pack_int4_dim0(zp) if qw.spec.bits == 4 else zp.clone()
    return out


def checkpoint_tensors(
    model, fmt: str, dtype: torch.dtype, select: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict as written: quantized linears packed, the rest cast to ``dtype``.

    ``select(key)`` keeps only some keys (a streamed run exports one decoder layer at a time;
    the layers not in memory are never touched)."""
    keep = select or (lambda key: True)
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    names = {id(m): n for n, m in model.named_modules()}
    for _, _, lin in iter_qlinears(model):
        prefix = names[id(lin)]
        if lin.qweight is None or not keep(prefix + "."):
            continue
        quantized.add(prefix)
        tensors.update(_linear_tensors(prefix, lin, fmt, dtype))
    params = {name for name, _ in model.named_parameters()}
    for key, value in model.state_dict(keep_vars=False).items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized or not keep(key):
            continue
        if getattr(model.config, "tie_word_embeddings", False) and key == "lm_head.weight":
            continue
        # parameters in the checkpoint dtype; buffers (fixed rotation matrices) keep theirs
        tensors[key] = value.to(dtype) if key in params and value.is_floating_point() else value
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def quantized_modules(model) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return sorted(names[id(lin)] for _, _, lin in iter_qlinears(model) if lin.qweight is not None)


def source_shards(model_name: str) -> ShardReader | None:
    """The recipe model's safetensors (to shard the export like it), when it is a local folder."""
    path = Path(resolve_model_path(model_name))
    if not path.is_dir() or not ((path / INDEX).is_file() or (path / SINGLE).is_file()):
        return None
    return ShardReader(path)


def check_format(ctx, fmt: str) -> None:
    """Refuse an export format the recipe cannot be written in (before any work)."""
    if fmt not in FORMATS:
        raise QtoolError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "gptq":
        w, scheme = ctx.scheme.weights, ctx.scheme
        if w is None or w.bits != 4 or not w.symmetric or scheme.activations or ctx.runtime.get("rotation"):
            raise QtoolError(
                "format gptq holds symmetric 4-bit weight-only (W4A16) models without online rotations; "
                "use format: compressed-tensors"
            )


def write_metadata(
    ctx,
    folder: Path,
    fmt: str,
    quantized: list[str],
    extra: dict[str, Any] | None = None,
    skip_sidecars: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Everything of a checkpoint folder but the weight shards: config, qtool.json, recipe,
    tokenizer, generation config and the run-time features' sidecars (except those of the features
    in ``skip_sidecars``, already written, e.g. gathered layer by layer by a streamed run)."""
    model, scheme, dtype = ctx.model, ctx.scheme, ctx.scale_dtype
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config(scheme, fmt)
    config["dtype"] = str(dtype).removeprefix("torch.")
    meta = {
        "qtool_version": qtool.__version__,
        "format": fmt,
        "checkpoint_dtype": str(dtype).removeprefix("torch."),
        "scheme": scheme.model_dump(mode="json"),
        "runtime": ctx.runtime,
        "sidecars": sidecar_files(ctx.runtime),
        "quantized_modules": quantized,
        **(extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (folder / "qtool.json").write_text(json.dumps(meta, indent=2))
    (folder / "recipe.yaml").write_text(ctx.recipe.to_yaml())
    ctx.tokenizer.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_sidecars(model, ctx.runtime, folder, dtype, skip=skip_sidecars)


def new_tmp(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))


def write_checkpoint(
    ctx,
    output: str | Path,
    fmt: str = "compressed-tensors",
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``ctx.model`` to ``output`` atomically, sharded like the recipe's model; returns
    size information."""
    check_format(ctx, fmt)
    output = check_output(output, overwrite)
    tensors = checkpoint_tensors(ctx.model, fmt, ctx.scale_dtype)
    plan = shard_plan(tensors, source_shards(ctx.recipe.model))
    tmp = new_tmp(output)
    try:
        write_shards(tmp, plan, tensors.__getitem__)
        write_metadata(ctx, tmp, fmt, quantized_modules(ctx.model), extra)
        replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return checkpoint_size(output)


def replace_folder(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` folder to ``output`` (replacing it), never leaving half of one."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output)


def checkpoint_size(path: str | Path) -> dict[str, Any]:
    """Bytes on disk of the checkpoint's tensors, and of its quantized linears alone."""
    from safetensors import safe_open

    path = Path(path)
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    linear_bytes = 0
    for shard in sorted(set(ShardReader(path).weight_map.values())):
        with safe_open(str(path / shard), "pt") as fh:
            for key in fh.keys():
                if ".layers." in key and "_proj." in key:
                    linear_bytes += _nbytes(fh, key)
    return {"bytes": total, "decoder_linear_bytes": linear_bytes}


def _nbytes(fh, key: str) -> int:
    sl = fh.get_slice(key)
    n = 1
    for d in sl.get_shape():
        n *= d
    size = {"I32": 4, "I64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}[sl.get_dtype()]
    return n * size


@torch.no_grad()
def round_unquantized_(model, dtype: torch.dtype) -> None:
    """Round the in-memory model's unquantized float tensors to the checkpoint dtype, in place,
    so the model in memory after export computes exactly what the checkpoint does."""
    quantized = {id(lin) for _, _, lin in iter_qlinears(model) if lin.qweight is not None}
    for module in model.modules():
        if id(module) in quantized:
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype).to(module.bias.dtype)
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype).to(p.dtype)
