"""A model whose decoder layers live on disk until needed (``qtool quantize --stream``).

:func:`load_skeleton` builds the architecture on the meta device (no weight memory), then loads
only what sits outside the decoder layers: embeddings, final norm, ``lm_head`` (or its tie to the
embeddings) and the rotary tables. :func:`materialize_layer` reads one decoder layer's tensors
from the safetensors shards into host memory in the math dtype; :func:`release_layer` gives its
memory back (the layer returns to the meta device, its quantized codes dropped once exported).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qtool.errors import QtoolError
from qtool.log import trim_heap
from qtool.models.adapters import get_adapter
from qtool.models.loading import DTYPES
from qtool.models.shards import ShardReader


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layers (``model.layers.``)."""
    layers = get_adapter(model.config).layers(model)
    name = next(n for n, m in model.named_modules() if m is layers)
    return name + "."


def load_skeleton(path: str | Path, reader: ShardReader, dtype: str = "float32", keep_outer: bool = False):
    """``(model, tokenizer)``: every decoder layer on the meta device, the rest loaded.

    ``keep_outer``: load the tensors outside the decoder layers (embeddings, final norm, lm_head)
    in the checkpoint's own floating dtype instead of the math dtype ``dtype`` when it is not wider
    (a bf16 checkpoint's 32000 x 4096 embedding and head: 0.5 GB instead of 1 GB); for runs whose
    steps do not change them. Their values are the same either way (a bf16 value is exact in float32),
    and the calibration stream casts the embedding output to the math dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    get_adapter(config)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    prefix = layers_prefix(model)
    adapter = get_adapter(config)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, _ in list(model.named_parameters()):
        if name.startswith(prefix) or (tied and name == "lm_head.weight"):
            continue
        owner, leaf = name.rsplit(".", 1)
        module = model.get_submodule(owner)
        value = reader.tensor(name)
        math = DTYPES[dtype]
        narrower = (
            value.is_floating_point() and value.element_size() <= torch.empty((), dtype=math).element_size()
        )
        if not (keep_outer and narrower):
            value = value.to(math)
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))
    reader.close()
    if tied:
        adapter.lm_head(model).weight = adapter.embed(model).weight
    rotary = adapter.rotary(model)  # its tables are buffers computed at init: build it on the CPU
    parent, leaf = next(n for n, m in model.named_modules() if m is rotary).rsplit(".", 1)
    setattr(model.get_submodule(parent), leaf, type(rotary)(config=model.config))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config._name_or_path = str(path)
    return model, tok


def materialize_layer(model: nn.Module, i: int, reader: ShardReader) -> nn.Module:
    """Read decoder layer ``i``'s tensors from the shards into host memory (the skeleton's math dtype), one tensor
    at a time straight into the layer's parameters (no second copy of the layer)."""
    layer = get_adapter(model.config).layers(model)[i]
    prefix = f"{layers_prefix(model)}{i}."
    keys = {k.removeprefix(prefix) for k in reader.keys() if k.startswith(prefix)}
    own = dict(layer.named_parameters()) | dict(layer.named_buffers())
    missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
    if missing or unexpected:
        raise QtoolError(
            f"{reader.folder}: layer {i} does not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    layer.to_empty(device="cpu")
    own = dict(layer.named_parameters()) | dict(layer.named_buffers())
    with torch.no_grad():
        for name, target in own.items():
            target.copy_(reader.tensor(prefix + name))
    reader.close()  # unmap the shards: their pages would otherwise stay resident
    return layer


def release_layer(model: nn.Module, i: int) -> None:
    """Give decoder layer ``i``'s memory back: weights to the meta device, quantized codes dropped."""
    layer = get_adapter(model.config).layers(model)[i]
    for module in layer.modules():
        if hasattr(module, "qweight"):
            module.qweight = None
            module.set_lowrank(None, None)
    layer.to("meta")
    trim_heap()
