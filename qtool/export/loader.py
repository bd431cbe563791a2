"""Load a qtool checkpoint back into the simulation model (the same math as in memory).

The loader rebuilds the architecture from ``config.json``, installs qtool's QLinears and
attention for the saved scheme, re-applies the run-time features recorded in ``qtool.json``
(:mod:`qtool.models.features`: online rotations, clip ratios, KV smoothing, pivot cache, LoRA),
and fills quantized linears from their packed codes, so the reloaded model computes exactly
what the in-memory quantized model computed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from qtool.errors import QtoolError
from qtool.models.loading import DTYPES, resolve_device
from qtool.models.qlinear import QuantizedWeight
from qtool.models.shards import LazyTensors, ShardReader
from qtool.quant.packing import unpack_gptq, unpack_int4, unpack_int4_dim0

logger = logging.getLogger("qtool")


def _unpack(
    tensors: dict, prefix: str, spec, fmt: str, out_features: int, in_features: int
) -> QuantizedWeight:
    if fmt == "gptq":
        codes = unpack_gptq(tensors.pop(f"{prefix}.qweight"), in_features)
        scale = tensors.pop(f"{prefix}.scales").float().t().contiguous()
        tensors.pop(f"{prefix}.qzeros")
        tensors.pop(f"{prefix}.g_idx")
        zero = torch.zeros_like(scale, dtype=torch.int8)
        return QuantizedWeight(codes, scale, zero, spec)
    shape_t = tensors.pop(f"{prefix}.weight_shape", None)
    shape = shape_t.tolist() if shape_t is not None else list(tensors[f"{prefix}.weight"].shape)
    if shape != [out_features, in_features]:
        raise QtoolError(
            f"{prefix}: weight_shape {shape} does not match the model ({out_features}, {in_features})"
        )
    if spec.bits == 4:
        codes = unpack_int4(tensors.pop(f"{prefix}.weight_packed"), in_features)
    else:
        codes = tensors.pop(f"{prefix}.weight").to(torch.int8)
    scale = tensors.pop(f"{prefix}.weight_scale").float()
    zp = tensors.pop(f"{prefix}.weight_zero_point", None)
    if zp is None:
        zero = torch.zeros_like(scale, dtype=torch.int8)
    else:
        zero = unpack_int4_dim0(zp, out_features) if spec.bits == 4 else zp.to(torch.int8)
    return QuantizedWeight(codes, scale, zero, spec)


def _skip_init():
    """Build the skeleton without random-initializing weights the checkpoint overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers versions without the module: initialize (slower, same result)
        return contextlib.nullcontext()
    return no_init_weights()


def load_checkpoint(path: str | Path, dtype: str = "float32", device: str = "auto", keep_codes: bool = True):
    """Load a qtool export. Returns ``(model, tokenizer, meta)``.

    ``keep_codes=False`` (evaluation without packed kernels) keeps only the dequantized weight of each
    quantized linear, not its integer codes beside it: the loaded model computes the same, and host
    memory is the model in ``dtype`` alone (a 7B model in bfloat16: 13.5 GB instead of 13.5 GB plus
    6.7 GB of int8 codes). Such a model cannot be re-exported or packed (``qweight`` is None;
    ``weight_spec`` records what the weight was quantized with).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qtool.models.features import load_sidecars, rebuild_features
    from qtool.models.lora import ADAPTER_FILE
    from qtool.models.prepare import iter_qlinears, prepare_model
    from qtool.quant.scheme import Scheme

    path = Path(path)
    meta_file = path / "qtool.json"
    if not meta_file.is_file():
        raise QtoolError(f"{path} is not a qtool checkpoint (no qtool.json)")
    meta = json.loads(meta_file.read_text())
    scheme = Scheme.model_validate(meta["scheme"])
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _skip_init():  # every tensor is filled from the checkpoint below (a missing one is an error)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    prepare_model(model, scheme)
    runtime = dict(meta.get("runtime", {}))
    if ADAPTER_FILE in meta.get("sidecars", []):  # checkpoints of qtool <= 0.1.0 list it only there
        runtime.setdefault("lowrank", {})
    rebuild_features(model, runtime)
    reader = ShardReader(path, mapped=False)  # read, not mapped: no mapped pages beside the model
    tensors = LazyTensors(reader)  # each tensor read when installed, then dropped
    fmt = meta["format"]
    wspec = scheme.weights.spec() if scheme.weights else None
    quantized = set(meta.get("quantized_modules", []))
    names = {id(m): n for n, m in model.named_modules()}
    for _, _, lin in iter_qlinears(model):
        prefix = names[id(lin)]
        if prefix not in quantized:
            continue
        lin.set_quantized(_unpack(tensors, prefix, wspec, fmt, lin.out_features, lin.in_features))
        if not keep_codes:
            lin.weight_spec, lin.qweight = lin.qweight.spec, None
        bias = tensors.pop(f"{prefix}.bias", None)
        if bias is not None:
            lin.bias.data = bias.to(lin.weight.dtype)
    expected = {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in quantized}
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing = expected - set(tensors)
    if missing:
        raise QtoolError(f"{path}: checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    unexpected = set(tensors) - set(model.state_dict())
    if unexpected:
        raise QtoolError(
            f"{path}: checkpoint has {len(unexpected)} tensors the model lacks, e.g. {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(dict(tensors), strict=False)  # what is left: embeddings, norms, head
    reader.close()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    # on the target device first, so runtime loaders place their state beside the weights
    model = model.to(resolve_device(device))
    load_sidecars(model, runtime, path)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, meta
