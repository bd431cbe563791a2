"""``rotate``: QuaRot's computational-invariance rotations (METHODS.md section 1).

Row-vector convention, a linear computes ``y = x W^T``:

* fold every RMSNorm gain into the linears reading it (``W <- W diag(g)``, ``g <- 1``), the
  final norm's into ``lm_head`` (untied from the embeddings first);
* residual rotation ``Q``: embeddings ``E <- E Q``, readers ``W <- W Q``, writers
  ``W <- Q^T W`` (and their biases ``b <- b Q``), in float64;
* ``down_proj``: online ``x -> x M`` (``M = H^T/sqrt(n)``, fast transform), fused ``W <- W M``;
* V/O: per-head ``B = blockdiag(H_d^T/sqrt(d))`` fused into ``v_proj`` (``W_v <- B^T W_v``),
  online head mixing ``z -> z M_h`` before ``o_proj``, fused ``W_o <- W_o B_q M_h``;
* Q/K after RoPE (when the KV cache is quantized): online ``H_d`` on both, cancels in ``q.k``.

What the runtime must still apply is recorded in ``ctx.runtime["rotation"]``.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import Field

from qtool.algorithms.hadamard import orthogonal_matrix
from qtool.errors import QtoolError
from qtool.log import trim_heap
from qtool.models.adapters import get_adapter
from qtool.models.online import install_online_layer, map_rows, transform_weight
from qtool.steps import register
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


@torch.no_grad()
def fold_head_norm(model) -> None:
    """Untie ``lm_head`` from the embeddings and fold the final RMSNorm gain into it."""
    adapter = get_adapter(model.config)
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    # a new tensor either way, so a tied embedding keeps its values
    folded = _scale_columns(head.weight.data, norm.weight.data)
    if getattr(model.config, "tie_word_embeddings", False) or head.weight is adapter.embed(model).weight:
        head.weight = torch.nn.Parameter(folded, requires_grad=False)
        model.config.tie_word_embeddings = False
    else:
        head.weight.data = folded
    norm.weight.data.fill_(1.0)


def _scale_columns(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``W diag(g)`` in float64, as a new tensor of ``W``'s dtype (a slice at a time)."""
    g = g.to(w.device, torch.float64)
    return map_rows(w, lambda part: part * g, w.device)


@torch.no_grad()
def fold_layer_norms(adapter, layer) -> None:
    """Fold a decoder layer's RMSNorm gains into the linears that read them."""
    for norm, readers in adapter.norm_readers(layer):
        for name in readers:
            lin = adapter.linear(layer, name)
            lin.weight.data = _scale_columns(lin.weight.data, norm.weight.data)
        norm.weight.data.fill_(1.0)


def _right(lin, m: torch.Tensor) -> None:
    """``W <- W M`` (a reader of a rotated input)."""
    transform_weight(lin, lambda w: w @ m, m.device)


def _left_t(lin, m: torch.Tensor) -> None:
    """``W <- M^T W`` and ``b <- b M`` for a linear whose output is rotated by ``M``."""
    transform_weight(lin, lambda w: w @ m, m.device, rows=False)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.to(m.device, torch.float64) @ m).to(lin.bias.device, lin.bias.dtype)


@torch.no_grad()
def rotate_embeddings(model, q: torch.Tensor) -> None:
    """The residual rotation of the embedding (its output) and of ``lm_head`` (its input)."""
    adapter = get_adapter(model.config)
    _right(adapter.embed(model), q)
    _right(adapter.lm_head(model), q)


@torch.no_grad()
def rotate_layer(adapter, layer, q: torch.Tensor) -> None:
    """The residual rotation of one decoder layer: readers ``W Q``, writers ``Q^T W``."""
    for name in adapter.residual_readers():
        _right(adapter.linear(layer, name), q)
    for name in adapter.residual_writers():
        _left_t(adapter.linear(layer, name), q)


@register("rotate")
class Rotate(StepConfig):
    """Fold norms and rotate the model; it computes the same function in full precision."""

    data_parallel: ClassVar[bool] = True  # nothing to calibrate

    kind: Literal["hadamard", "random_orthogonal"] = Field("hadamard", description="residual rotation matrix")
    seed: int = Field(0, description="seed of the random signs / random orthogonal matrices")
    residual: bool = True
    down_proj: bool = Field(True, description="online Hadamard on the input of down_proj")
    attention_vo: bool = Field(True, description="per-head V/O rotation plus head mixing before o_proj")
    head_mix: bool = Field(
        True,
        description="with attention_vo: the online rotation across heads before o_proj (QuaRot; a seeded "
        "random orthogonal h x h where no Hadamard of order h exists); false: per-head rotation only",
    )
    qk: Literal["auto", True, False] = Field(
        "auto", description="online Hadamard on Q/K after RoPE (auto: when KV is quantized)"
    )

    streams: ClassVar[bool] = True
    modifies_outer: ClassVar[bool] = True

    def stream_start(self, ctx) -> None:
        """The global part: untie and fold the head norm, rotate embeddings and ``lm_head``."""
        model = ctx.model
        if ctx.weights_quantized():
            raise QtoolError("`rotate` must come before the weight-quantization steps (rtn, gptq, ...)")
        fold_head_norm(model)
        q = None
        if self.residual:
            q = orthogonal_matrix(model.config.hidden_size, self.kind, self.seed).double().to(ctx.device)
            rotate_embeddings(model, q)
        qk = ctx.scheme.kv_cache is not None if self.qk == "auto" else bool(self.qk)
        entry = {
            "online_kind": "hadamard" if self.kind == "hadamard" else "matrix",
            "seed": self.seed,
            "down_proj": self.down_proj,
            "attention_vo": self.attention_vo,
            "qk": qk,
            **({} if self.head_mix else {"head_mix": False}),  # stored only when off: checkpoints as before
        }
        ctx.runtime["rotation"] = entry
        ctx.state["rotate.q"] = q

    def stream_layer(self, ctx, runner, i: int, layer) -> None:
        """Decoder layer ``i``: fold its norms, rotate it, install (and fuse) its online rotations."""
        adapter = get_adapter(ctx.model.config)
        fold_layer_norms(adapter, layer)
        if ctx.state["rotate.q"] is not None:
            rotate_layer(adapter, layer, ctx.state["rotate.q"])
        install_online_layer(
            ctx.model.config, i, layer, ctx.runtime["rotation"], fuse=True, device=ctx.device
        )

    def stream_end(self, ctx) -> None:
        entry = ctx.runtime["rotation"]
        adapter = get_adapter(ctx.model.config)
        mix = adapter.linear(adapter.layers(ctx.model)[0], "o_proj").input_transform
        if mix is not None and mix.fallback:
            logger.info(
                "rotate: no Hadamard matrix of order %d (heads); head mixing uses a random orthogonal matrix",
                mix.heads,
            )
        ctx.record("rotate", {"kind": self.kind, "online": entry})

    def apply(self, ctx) -> None:
        self.stream_start(ctx)
        for i, layer in enumerate(get_adapter(ctx.model.config).layers(ctx.model)):
            self.stream_layer(ctx, None, i, layer)
            # each layer's float64 temporaries are freed between its new weights: without this the
            # freed pages stay resident, layer after layer (SmolLM2: +15 MB a layer, 0.45 GB in all)
            trim_heap()
        self.stream_end(ctx)

    def replay_on_reference(self, ref_ctx, ctx) -> None:
        self.apply(ref_ctx)
