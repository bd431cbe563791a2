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
from typing import Literal

import torch
from pydantic import Field

from qtool.algorithms.hadamard import orthogonal_matrix
from qtool.models.adapters import get_adapter
from qtool.models.online import OnlineRotation
from qtool.recipe import StepConfig
from qtool.steps import register
from qtool.steps.runtime import runtime_handler

logger = logging.getLogger("qtool")


def _dims(config) -> tuple[int, int, int, int, int]:
    hq = config.num_attention_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    return config.hidden_size, config.intermediate_size, hq, config.num_key_value_heads, d


@torch.no_grad()
def fold_norms(model) -> None:
    """Fold RMSNorm gains into the following linears; untie ``lm_head`` from the embeddings."""
    adapter = get_adapter(model.config)
    if (
        getattr(model.config, "tie_word_embeddings", False)
        or adapter.lm_head(model).weight is adapter.embed(model).weight
    ):
        head = adapter.lm_head(model)
        head.weight = torch.nn.Parameter(head.weight.data.clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    for layer in adapter.layers(model):
        for norm, readers in adapter.norm_readers(layer):
            g = norm.weight.data.double()
            for name in readers:
                lin = adapter.linear(layer, name)
                lin.weight.data = (lin.weight.data.double() * g).to(lin.weight.dtype)
            norm.weight.data.fill_(1.0)
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    head.weight.data = (head.weight.data.double() * norm.weight.data.double()).to(head.weight.dtype)
    norm.weight.data.fill_(1.0)


def _transform_weight(lin, fn, device, rows: bool = True) -> None:
    """``W <- fn(W)`` (``rows``: ``fn`` acts on each row, i.e. ``W M``) or ``W <- fn(W^T)^T``,
    computed in float64 on ``device`` one weight at a time."""
    w = lin.weight.data.to(device, torch.float64)
    w = fn(w) if rows else fn(w.t()).t()
    lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)


def _right(lin, m: torch.Tensor) -> None:
    """``W <- W M`` (a reader of a rotated input)."""
    _transform_weight(lin, lambda w: w @ m, m.device)


def _left_t(lin, m: torch.Tensor) -> None:
    """``W <- M^T W`` and ``b <- b M`` for a linear whose output is rotated by ``M``."""
    _transform_weight(lin, lambda w: w @ m, m.device, rows=False)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.to(m.device, torch.float64) @ m).to(lin.bias.device, lin.bias.dtype)


@torch.no_grad()
def rotate_residual(model, q: torch.Tensor) -> None:
    adapter = get_adapter(model.config)
    emb = adapter.embed(model)
    emb.weight.data = (emb.weight.data.to(q.device, torch.float64) @ q).to(
        emb.weight.device, emb.weight.dtype
    )
    for layer in adapter.layers(model):
        for name in adapter.residual_readers():
            _right(adapter.linear(layer, name), q)
        for name in adapter.residual_writers():
            _left_t(adapter.linear(layer, name), q)
    _right(adapter.lm_head(model), q)


def _per_head(rot: OnlineRotation, heads: int):
    """``x -> x blockdiag(M, ..., M)``: the rotation applied inside each of ``heads`` blocks."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return rot(x.reshape(*shape[:-1], heads, shape[-1] // heads)).reshape(shape)

    return fn


@torch.no_grad()
def install_online(model, entry: dict, fuse: bool, device: torch.device | str = "cpu") -> None:
    """Create the online rotations described by ``entry``; fuse their inverses when ``fuse``.

    Fusion right-multiplies weights by the rotation by applying the (fast) transform to their
    rows, in float64 on ``device``: no dense ``n x n`` matrix is formed for Hadamard kinds.
    """
    adapter = get_adapter(model.config)
    _, inter, hq, hkv, d = _dims(model.config)
    kind, seed = entry["online_kind"], entry["seed"]
    for i, layer in enumerate(adapter.layers(model)):
        if entry.get("down_proj"):
            down = adapter.linear(layer, "down_proj")
            rot = OnlineRotation(inter, kind, seed=seed + 1000 + i)
            down.input_transform = rot.to(down.weight.device)
            if fuse:
                _transform_weight(down, rot.to(device), device)
                rot.to(down.weight.device)
        if entry.get("attention_vo"):
            o = adapter.linear(layer, "o_proj")
            mix = OnlineRotation(hq * d, kind, heads=hq, seed=seed + 3000 + i)
            o.input_transform = mix.to(o.weight.device)
            if fuse:
                per_head = OnlineRotation(d, kind, seed=seed + 2000 + i).to(device)
                v = adapter.linear(layer, "v_proj")
                _transform_weight(v, _per_head(per_head, hkv), device, rows=False)
                if v.bias is not None:
                    v.bias.data = _per_head(per_head, hkv)(v.bias.data.to(device, torch.float64)).to(
                        v.bias.device, v.bias.dtype
                    )
                mix.to(device)
                _transform_weight(o, lambda w, m=mix, ph=per_head: m(_per_head(ph, hq)(w)), device)
                mix.to(o.weight.device)
        if entry.get("qk"):
            attn = adapter.attention(layer)
            attn.qtool.qk_rotate = OnlineRotation(d, kind, seed=seed + 4000 + i).to(attn.q_proj.weight.device)


@runtime_handler("rotation")
def _reload(model, entry: dict) -> None:
    """Re-create the online rotations of an exported rotated model (weights already fused)."""
    model.config.tie_word_embeddings = False
    install_online(model, entry, fuse=False)


@register("rotate")
class Rotate(StepConfig):
    """Fold norms and rotate the model; it computes the same function in full precision."""

    kind: Literal["hadamard", "random_orthogonal"] = Field("hadamard", description="residual rotation matrix")
    seed: int = Field(0, description="seed of the random signs / random orthogonal matrices")
    residual: bool = True
    down_proj: bool = Field(True, description="online Hadamard on the input of down_proj")
    attention_vo: bool = Field(True, description="per-head V/O rotation plus head mixing before o_proj")
    qk: Literal["auto", True, False] = Field(
        "auto", description="online Hadamard on Q/K after RoPE (auto: when KV is quantized)"
    )

    def apply(self, ctx) -> None:
        model = ctx.model
        if any(lin.qweight is not None for lin in model.modules() if hasattr(lin, "qweight")):
            raise ValueError("`rotate` must come before the weight-quantization steps (rtn, gptq, ...)")
        hidden = model.config.hidden_size
        fold_norms(model)
        if self.residual:
            q = orthogonal_matrix(hidden, self.kind, self.seed).double().to(ctx.device)
            rotate_residual(model, q)
        qk = ctx.scheme.kv_cache is not None if self.qk == "auto" else bool(self.qk)
        entry = {
            "online_kind": "hadamard" if self.kind == "hadamard" else "matrix",
            "seed": self.seed,
            "down_proj": self.down_proj,
            "attention_vo": self.attention_vo,
            "qk": qk,
        }
        install_online(model, entry, fuse=True, device=ctx.device)
        ctx.runtime["rotation"] = entry
        adapter = get_adapter(model.config)
        mix = adapter.linear(adapter.layers(model)[0], "o_proj").input_transform
        if mix is not None and mix.fallback:
            logger.info(
                "rotate: no Hadamard matrix of order %d (heads); head mixing uses a random orthogonal matrix",
                mix.heads,
            )
        ctx.record("rotate", {"kind": self.kind, "online": entry})
