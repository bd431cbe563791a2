"""The run-time features of a quantized model, declared once: what a checkpoint must re-apply.

The weights alone do not carry everything a recipe did to a model. Steps record a JSON-able
entry per feature in ``ctx.runtime`` (written to ``qtool.json`` as ``runtime``); the export
writer and the loader both read this table, so neither knows any step:

===============  =====================================================  =========================
feature          re-applied by                                          sidecar files
===============  =====================================================  =========================
``rotation``     online Hadamard / head-mixing / Q-K rotations           -
``clip_search``  per-linear activation and per-layer KV clip ratios      -
``kv_smooth``    K/V shifts and the scales that are not folded           -
``intactkv``     the 16-bit pivot prefix cache (``model.qtool_pivot``)   intactkv_pivot.safetensors
``lowrank``      each linear's ``U V^T`` correction (PEFT LoRA layout)   adapter_model.safetensors,
                                                                         adapter_config.json
===============  =====================================================  =========================

``rebuild`` runs on the freshly built modules before the weights are loaded; ``save`` writes a
feature's sidecar files into the checkpoint folder; ``load`` reads them after the weights, with
the model on its target device. A new feature is one more row here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.models.adapters import get_adapter
from qtool.models.kv_smooth import apply_smoothing
from qtool.models.lora import ADAPTER_FILE, CONFIG_FILE, load_lora, save_lora
from qtool.models.online import install_online
from qtool.models.pivot import load_pivot, save_pivot

PIVOT_FILE = "intactkv_pivot.safetensors"


@dataclass(frozen=True)
class Feature:
    name: str
    rebuild: Callable[[nn.Module, dict], None] | None = None
    sidecars: tuple[str, ...] = ()
    save: Callable[[nn.Module, dict, Path, torch.dtype], None] | None = None
    load: Callable[[nn.Module, dict, Path], None] | None = None


def _rebuild_rotation(model, entry: dict) -> None:
    """The online rotations of an exported rotated model (its weights carry the fused part)."""
    model.config.tie_word_embeddings = False
    install_online(model, entry, fuse=False)


def set_clip_ratios(model, entry: dict) -> None:
    """Set per-linear activation (``act``) and per-layer KV (``kv``) clip ratios on ``model``."""
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    for key, ratio in entry.get("act", {}).items():
        _, i, name = key.split(".")
        lin = adapter.linear(layers[int(i)], name)
        if getattr(lin, "act_spec", None) is not None:
            lin.act_spec = dataclasses.replace(lin.act_spec, clip_ratio=float(ratio))
    for key, ratio in entry.get("kv", {}).items():
        st = adapter.attention(layers[int(key.split(".")[1])]).qtool
        if st.k_spec is not None:
            st.k_spec = dataclasses.replace(st.k_spec, clip_ratio=float(ratio))
            st.v_spec = dataclasses.replace(st.v_spec, clip_ratio=float(ratio))


def _save_pivot(model, entry: dict, folder: Path, dtype: torch.dtype) -> None:
    save_pivot(model.qtool_pivot, folder / PIVOT_FILE, dtype)


def _load_pivot(model, entry: dict, folder: Path) -> None:
    model.qtool_pivot = load_pivot(folder / PIVOT_FILE)


def _save_lora(model, entry: dict, folder: Path, dtype: torch.dtype) -> None:
    save_lora(model, folder, dtype, base=entry.get("base_model", ""))


def _load_lora(model, entry: dict, folder: Path) -> None:
    load_lora(model, folder)


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in (
        Feature("rotation", rebuild=_rebuild_rotation),
        Feature("clip_search", rebuild=set_clip_ratios),
        Feature("kv_smooth", rebuild=lambda model, entry: apply_smoothing(model, entry, fold=False)),
        Feature("intactkv", sidecars=(PIVOT_FILE,), save=_save_pivot, load=_load_pivot),
        Feature("lowrank", sidecars=(ADAPTER_FILE, CONFIG_FILE), save=_save_lora, load=_load_lora),
    )
}


def _features(runtime: dict[str, Any]) -> list[tuple[Feature, dict]]:
    unknown = sorted(set(runtime) - set(FEATURES))
    if unknown:
        raise QtoolError(
            f"the checkpoint needs run-time feature(s) {unknown}, which this qtool does not know "
            f"(known: {', '.join(FEATURES)}); upgrade qtool"
        )
    return [(FEATURES[name], entry) for name, entry in runtime.items()]


def rebuild_features(model: nn.Module, runtime: dict[str, Any]) -> None:
    """Re-create every recorded feature's modules and settings on a freshly built model."""
    for feature, entry in _features(runtime):
        if feature.rebuild is not None:
            feature.rebuild(model, entry)


def sidecar_files(runtime: dict[str, Any]) -> list[str]:
    """The sidecar files the recorded features write (``qtool.json`` ``sidecars``)."""
    return sorted(name for feature, _ in _features(runtime) for name in feature.sidecars)


def save_sidecars(
    model: nn.Module,
    runtime: dict[str, Any],
    folder: str | Path,
    dtype: torch.dtype,
    skip: set[str] | frozenset[str] = frozenset(),
) -> None:
    for feature, entry in _features(runtime):
        if feature.save is not None and feature.name not in skip:
            feature.save(model, entry, Path(folder), dtype)


def load_sidecars(model: nn.Module, runtime: dict[str, Any], folder: str | Path) -> None:
    for feature, entry in _features(runtime):
        if feature.load is not None:
            feature.load(model, entry, Path(folder))
