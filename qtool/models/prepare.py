"""Turn a Hugging Face model into qtool's simulation model for a scheme.

Every decoder linear becomes a :class:`QLinear` (activation quantization on the scheme's
targets) and every attention module gets qtool's forward with the scheme's KV quantization.
Weights are left untouched: the ``rtn`` / ``gptq`` steps quantize them.
"""

from __future__ import annotations

from torch import nn

from qtool.errors import QtoolError
from qtool.models.adapters import get_adapter
from qtool.models.attention import AttnQuantState, install_attention
from qtool.models.qlinear import QLinear


def iter_qlinears(model: nn.Module):
    """Yield ``(layer_index, short_name, QLinear)`` for every decoder linear."""
    adapter = get_adapter(model.config)
    for i, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            lin = adapter.linear(layer, name)
            if isinstance(lin, QLinear):
                yield i, name, lin


def prepare_model(model: nn.Module, scheme) -> nn.Module:
    """Install QLinears and quantized attention as ``scheme`` (a recipe ``Scheme``) asks."""
    adapter = get_adapter(model.config)
    act_spec = scheme.activations.spec() if scheme.activations else None
    kv = scheme.kv_cache
    unknown = set(scheme.targets) - set(adapter.linear_names())
    if unknown:
        raise QtoolError(
            f"scheme.targets names {sorted(unknown)}, which are not decoder linears; "
            f"choose from {', '.join(adapter.linear_names())}"
        )
    head_dim = (
        model.config.head_dim
        if getattr(model.config, "head_dim", None)
        else (model.config.hidden_size // model.config.num_attention_heads)
    )
    if kv is not None:
        kv.spec().check_width(head_dim, "head_dim (the KV group size must divide it)")
    for i, layer in enumerate(adapter.layers(model)):
        for name in adapter.linear_names():
            lin = adapter.linear(layer, name)
            spec = act_spec if name in scheme.targets else None
            if isinstance(lin, QLinear):
                lin.act_spec = spec
                continue
            adapter.set_linear(layer, name, QLinear.from_linear(lin, spec, name=f"layers.{i}.{name}"))
            if scheme.weights is not None and name in scheme.targets:
                scheme.weights.spec().check_width(lin.in_features, f"layers.{i}.{name}")
            if spec is not None:
                spec.check_width(lin.in_features, f"activations of layers.{i}.{name}")
        attn = adapter.attention(layer)
        state = getattr(attn, "qtool", None) or AttnQuantState()
        state.k_spec = kv.spec() if kv else None
        state.v_spec = kv.spec() if kv else None
        state.past_only = bool(kv and kv.past_only)
        install_attention(attn, state)
    model.qtool_scheme = scheme
    return model


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch activation and KV quantization on or off (weights stay as they are)."""
    adapter = get_adapter(model.config)
    for layer in adapter.layers(model):
        set_layer_quantization_enabled(adapter, layer, enabled)


def set_layer_quantization_enabled(adapter, layer: nn.Module, enabled: bool) -> None:
    """:func:`set_quantization_enabled` for one decoder layer."""
    for name in adapter.linear_names():
        lin = adapter.linear(layer, name)
        if isinstance(lin, QLinear):
            lin.act_quant_enabled = enabled
    state = getattr(adapter.attention(layer), "qtool", None)
    if state is not None:
        state.enabled = enabled
