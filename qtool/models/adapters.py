"""Architecture adapters: where a Llama-family model keeps its parts.

Llama, Mistral and Qwen2 share one decoder layout in transformers 5 (``model.model.layers[i]``
with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and two RMSNorms); Qwen2 adds
biases on q/k/v, Mistral and Qwen2 may use sliding-window masks (handled by the model's own
mask). An adapter names these parts so no other module hard-codes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qtool.errors import QtoolError

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Adapter:
    model_type: str
    attention_bias_allowed: bool = False

    # --- model-level parts -------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embed(self, model: nn.Module) -> nn.Embedding:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def rotary(self, model: nn.Module) -> nn.Module:
        return model.model.rotary_emb

    # --- layer-level parts -------------------------------------------------------------
    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def linear(self, layer: nn.Module, name: str) -> nn.Module:
        parent = layer.self_attn if name in ATTN_LINEARS else layer.mlp
        return getattr(parent, name)

    def set_linear(self, layer: nn.Module, name: str, module: nn.Module) -> None:
        parent = layer.self_attn if name in ATTN_LINEARS else layer.mlp
        setattr(parent, name, module)

    def linear_names(self) -> tuple[str, ...]:
        return ATTN_LINEARS + MLP_LINEARS

    def norm_readers(self, layer: nn.Module) -> list[tuple[nn.Module, list[str]]]:
        """Each RMSNorm with the linears that read its output (for folding its gain)."""
        return [
            (layer.input_layernorm, ["q_proj", "k_proj", "v_proj"]),
            (layer.post_attention_layernorm, ["gate_proj", "up_proj"]),
        ]

    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """The decoder layer's linears in the order their inputs become final (GPTQ's
        true-sequential order): each group reads the outputs of the groups before it."""
        return (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

    def residual_writers(self) -> tuple[str, ...]:
        return ("o_proj", "down_proj")

    def residual_readers(self) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


ADAPTERS = {
    "llama": Adapter("llama"),
    "mistral": Adapter("mistral"),
    "qwen2": Adapter("qwen2", attention_bias_allowed=True),
}


def get_adapter(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise QtoolError(
            f"unsupported architecture {model_type!r}; qtool supports {', '.join(sorted(ADAPTERS))} "
            "(Llama-family decoders). Convert the model or add an adapter in qtool/models/adapters.py"
        )
    return ADAPTERS[model_type]
