"""The low-rank correction as a PEFT-style LoRA adapter beside the quantized checkpoint.

``adapter_model.safetensors`` holds, for every linear with a correction ``U V^T``,
``base_model.model.<module>.lora_A.weight = V^T`` ``[k, in]`` and
``base_model.model.<module>.lora_B.weight = U`` ``[out, k]`` in the checkpoint dtype;
``adapter_config.json`` is a PEFT ``LORA`` config with ``r`` the largest rank, per-module ranks in
``rank_pattern`` and ``lora_alpha`` equal to each module's rank (``alpha_pattern``), so that
PEFT's scaling ``alpha / r`` is 1 and the adapter adds exactly ``U V^T x``.

The adapter acts on the *unquantized* input of the linear, as PEFT's LoRA does (it reads the
input before the base layer quantizes it). On a rotated model, however, it reads the input
*after* qtool's online transform for ``o_proj`` (head mixing) and ``down_proj`` (Hadamard): an
external PEFT runtime reproduces the correction only for linears without an online transform
(q/k/v, gate/up) or when it applies the same transform. qtool's own loader restores it exactly
(the ``lowrank`` run-time feature in :mod:`qtool.models.features`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtool.errors import QtoolError
from qtool.models.prepare import iter_qlinears

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."


def _corrected(model) -> dict[str, object]:
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(lin)]: lin for _, _, lin in iter_qlinears(model) if lin.lora_U is not None}


def lora_tensors(model, dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{PEFT key: tensor}`` for every linear with a low-rank correction (whose module name starts
    with ``prefix``: one decoder layer of a streamed run)."""
    out = {}
    for name, lin in _corrected(model).items():
        if not name.startswith(prefix):
            continue
        out[f"{PREFIX}{name}.lora_A.weight"] = lin.lora_V.t().to(dtype).cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = lin.lora_U.to(dtype).cpu().contiguous()
    return out


def lora_config(tensors: dict[str, torch.Tensor], base: str) -> dict:
    """The PEFT config of the adapter tensors ``tensors`` (:func:`lora_tensors`)."""
    suffix = ".lora_B.weight"
    ranks = {k[len(PREFIX) : -len(suffix)]: int(t.shape[1]) for k, t in tensors.items() if k.endswith(suffix)}
    r = max(ranks.values(), default=0)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": ranks,
        "alpha_pattern": ranks,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "qtool_note": "lora_A acts on the input after qtool's online transform (o_proj, down_proj of rotated models)",
    }


def save_lora(model, folder: str | Path, dtype: torch.dtype, base: str) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``."""
    save_lora_tensors(lora_tensors(model, dtype), folder, base)


def save_lora_tensors(tensors: dict[str, torch.Tensor], folder: str | Path, base: str) -> None:
    """Write the adapter of ``tensors`` (:func:`lora_tensors`, e.g. gathered layer by layer)."""
    folder = Path(folder)
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(lora_config(tensors, base), indent=2))


def load_lora(model, path: str | Path) -> None:
    """Install the adapter's factors in folder ``path`` as each linear's ``U``, ``V`` (on its device
    and dtype)."""
    tensors = load_file(str(Path(path) / ADAPTER_FILE))
    corrected = 0
    for name, module in model.named_modules():
        a = tensors.pop(f"{PREFIX}{name}.lora_A.weight", None)
        b = tensors.pop(f"{PREFIX}{name}.lora_B.weight", None)
        if a is None and b is None:
            continue
        if a is None or b is None or not hasattr(module, "set_lowrank"):
            raise QtoolError(f"{path}/{ADAPTER_FILE}: incomplete or misplaced LoRA factors for {name}")
        w = module.weight
        module.set_lowrank(b.to(w.device, w.dtype), a.t().contiguous().to(w.device, w.dtype))
        corrected += 1
    if tensors:
        raise QtoolError(
            f"{path}/{ADAPTER_FILE}: {len(tensors)} factors match no module, e.g. {sorted(tensors)[:2]}"
        )
    if corrected == 0:
        raise QtoolError(f"{path}/{ADAPTER_FILE} holds no LoRA factors")
