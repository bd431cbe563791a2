"""``intactkv``: keep the pivot tokens' K/V intact (METHODS.md section 3).

The full-precision model (the rotated / smoothed one when ``rotate`` / ``kv_smooth`` ran before)
computes the pivot's per-layer K/V once: ``[BOS]`` (IntactKV-B) or a system prompt (IntactKV-P).
The quantized model attends to it as a 16-bit prefix cache (``model.qtool_pivot``, see
:mod:`qtool.models.pivot`); only new tokens' K/V are quantized. ``calibrate`` makes the pivot K/V
trainable and minimizes the sum over decoder layers of the MSE between the quantized model's and
the full-precision model's layer outputs on calibration samples, everything else frozen.

The pivot is exported as a sidecar safetensors file (``intactkv_pivot.safetensors``), outside the
weight index, and re-attached by the loader, so ``qtool eval --prefix bos`` and ``qtool generate``
use it automatically.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import ClassVar

import torch
from pydantic import Field
from transformers import DynamicCache

from qtool.config import Closed
from qtool.errors import QtoolError
from qtool.log import track
from qtool.models.adapters import get_adapter
from qtool.models.features import PIVOT_FILE
from qtool.models.pivot import PivotCache, cache_kw, cache_tensors, compute_prefix_cache
from qtool.models.prepare import iter_qlinears
from qtool.quant.quantizer import fake_quant_ste
from qtool.steps import register
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


class CalibrateOptions(Closed):
    """Pivot calibration. CPU-sized defaults; the published setting is 128 samples, lr 2e-4,
    ~160 steps of batch 16 (AdamW)."""

    steps: int = Field(32, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate (published: 2e-4 with 160 steps)")
    samples: int = Field(32, ge=1, description="calibration windows used (the first of the recipe's)")
    seq_len: int = Field(256, ge=8, description="tokens per calibration window (truncated)")
    batch_size: int = Field(4, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)


@register("intactkv")
class IntactKV(StepConfig):
    """A 16-bit pivot prefix cache computed by the full-precision model (optionally calibrated)."""

    pivot: str | list[int] = Field("bos", description="bos, a system-prompt text, or token ids")
    calibrate: CalibrateOptions | None = Field(None, description="train the pivot K/V (IntactKV calibrated)")

    streams: ClassVar[bool] = True

    # --- streamed (``--stream``): the pivot goes through each full-precision layer as it streams ---

    def stream_refusal(self) -> str | None:
        if self.calibrate is not None:
            return (
                "intactkv.calibrate trains the pivot through the whole quantized and full-precision "
                "models and cannot stream; run without --stream, or drop `calibrate` (plain IntactKV streams)"
            )
        return None

    def stream_start(self, ctx) -> None:
        ids = pivot_token_ids(ctx.tokenizer, self.pivot)
        adapter = get_adapter(ctx.model.config)
        math = next(adapter.layers(ctx.model)[0].parameters()).dtype
        with torch.no_grad():
            hidden = adapter.embed(ctx.model)(torch.tensor([ids], device=ctx.device)).to(math)
        ctx.state["intactkv"] = {"start": time.perf_counter(), "ids": ids, "hidden": hidden}

    def stream_fp_layer(self, ctx, i: int, layer) -> None:
        """Push the pivot through full-precision layer ``i`` (KV and activation quantization off),
        keeping the K/V it writes: what the whole full-precision model computes for it."""
        st = ctx.state["intactkv"]
        adapter = get_adapter(ctx.model.config)
        h = st["hidden"]
        pos = torch.arange(h.shape[1], device=h.device)[None]
        attn = adapter.attention(layer).qtool
        lins = [m for m in layer.modules() if hasattr(m, "act_quant_enabled")]
        before = attn.enabled, [m.act_quant_enabled for m in lins]
        attn.enabled = False
        for m in lins:
            m.act_quant_enabled = False
        try:
            with torch.no_grad():
                pe = adapter.rotary(ctx.model).to(h.device)(h, pos)
                cache = DynamicCache()
                st["hidden"] = layer(
                    h,
                    position_ids=pos,
                    **cache_kw(cache),
                    use_cache=True,
                    cache_position=pos[0],
                    position_embeddings=pe,
                )
        finally:
            attn.enabled = before[0]
            for m, e in zip(lins, before[1], strict=True):
                m.act_quant_enabled = e
        keys, values = cache_tensors(cache)
        st["key"], st["value"] = keys[i][:1], values[i][:1]

    def stream_layer(self, ctx, runner, i: int, layer) -> None:
        """Nothing on the quantized layer: the pivot was computed by :meth:`stream_fp_layer`."""

    def stream_extra(self, ctx, i: int, layer) -> dict:
        st = ctx.state["intactkv"]
        out = {
            f"key.{i}": st.pop("key").to(ctx.scale_dtype).cpu(),
            f"value.{i}": st.pop("value").to(ctx.scale_dtype).cpu(),
            f"hidden.{i}": st["hidden"].cpu(),  # the pivot's input to layer i + 1 (for --resume)
        }
        return out

    def stream_restore(self, ctx, tensors: dict) -> None:
        last = max((int(k.split(".")[1]) for k in tensors if k.startswith("hidden.")), default=None)
        if last is not None:
            ctx.state["intactkv"]["hidden"] = tensors[f"hidden.{last}"].to(ctx.device)

    def stream_sidecar(self, ctx, tensors: dict, folder) -> str | None:
        """The pivot cache from the gathered per-layer K/V; the writer saves it like in memory."""
        n = len(get_adapter(ctx.model.config).layers(ctx.model))
        st = ctx.state["intactkv"]
        ctx.model.qtool_pivot = PivotCache(
            st["ids"],
            [tensors[f"key.{i}"].float() for i in range(n)],
            [tensors[f"value.{i}"].float() for i in range(n)],
        )
        return None

    def stream_end(self, ctx) -> None:
        st = ctx.state["intactkv"]
        ctx.runtime["intactkv"] = {"pivot_tokens": st["ids"], "sidecar": PIVOT_FILE, "calibrated": False}
        ctx.record(
            "intactkv",
            {
                "pivot_tokens": st["ids"],
                "calibrated": False,
                "seconds_pivot": time.perf_counter() - st["start"],
            },
        )
        logger.info("intactkv: pivot of %d token(s), computed layer by layer", len(st["ids"]))

    def apply(self, ctx) -> None:
        start = time.perf_counter()
        ids = pivot_token_ids(ctx.tokenizer, self.pivot)
        fp = ctx.fp_reference(self)
        pivot = compute_prefix_cache(fp, ids, dtype=ctx.scale_dtype)
        info: dict = {"pivot_tokens": ids, "calibrated": False}
        if self.calibrate is not None:
            before, after, trained = calibrate_pivot(
                ctx.model, fp, pivot, ctx.calibration(), self.calibrate, ctx.device
            )
            pivot = PivotCache(
                ids,
                [k.to(ctx.scale_dtype).float() for k in trained.keys],
                [v.to(ctx.scale_dtype).float() for v in trained.values],
            )
            info.update(calibrated=True, loss_before=before, loss_after=after)
        ctx.model.qtool_pivot = pivot
        # export writes model.qtool_pivot as the sidecar (qtool.models.features)
        ctx.runtime["intactkv"] = {
            "pivot_tokens": ids,
            "sidecar": PIVOT_FILE,
            "calibrated": info["calibrated"],
        }
        ctx.record("intactkv", {**info, "seconds_pivot": time.perf_counter() - start})
        logger.info(
            "intactkv: pivot of %d token(s)%s", len(ids), " (calibrated)" if info["calibrated"] else ""
        )


def pivot_token_ids(tokenizer, pivot: str | list[int]) -> list[int]:
    if isinstance(pivot, list):
        if not pivot:
            raise QtoolError("intactkv: `pivot` token ids must not be empty")
        return [int(t) for t in pivot]
    if pivot == "bos":
        if tokenizer.bos_token_id is None:
            raise QtoolError("intactkv: this tokenizer has no BOS token; give `pivot` as a text or token ids")
        return [int(tokenizer.bos_token_id)]
    ids = tokenizer(pivot, add_special_tokens=False).input_ids
    if not ids:
        raise QtoolError("intactkv: `pivot` text tokenizes to nothing")
    return ids


# --- training helpers shared with kv_smooth ------------------------------------------------------


@contextmanager
def straight_through(model):
    """Activation and KV fake-quantization with straight-through rounding (gradients flow)."""
    adapter = get_adapter(model.config)
    states = [adapter.attention(layer).qtool for layer in adapter.layers(model)]
    lins = [lin for _, _, lin in iter_qlinears(model)]
    for s in states:
        s.ste = True
    for lin in lins:
        lin.quantize_input = _ste_input(lin)
    try:
        yield
    finally:
        for s in states:
            s.ste = False
        for lin in lins:
            del lin.quantize_input


def _ste_input(lin):
    def quantize_input(x: torch.Tensor) -> torch.Tensor:
        if lin.act_spec is None or not lin.act_quant_enabled:
            return x
        return fake_quant_ste(x, lin.act_spec)

    return quantize_input


@contextmanager
def capture_layer_outputs(model, out: list):
    """Append every decoder layer's output hidden states to ``out`` during forwards."""
    layers = get_adapter(model.config).layers(model)
    hooks = [
        layer.register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def calibrate_pivot(model, fp, pivot: PivotCache, windows: torch.Tensor, opt: CalibrateOptions, device):
    """Train the pivot K/V; returns ``(loss before, loss after, trained PivotCache)``.

    The loss is the sum over decoder layers of the MSE between ``model``'s layer outputs (the
    pivot as its prefix cache, straight-through quantizers) and ``fp``'s (the exact pivot).
    """
    data = windows[: opt.samples, : opt.seq_len]
    dtype = next(model.parameters()).dtype
    keys = [torch.nn.Parameter(k.to(device, dtype).clone()) for k in pivot.keys]
    values = [torch.nn.Parameter(v.to(device, dtype).clone()) for v in pivot.values]
    optim = torch.optim.AdamW(keys + values, lr=opt.lr, weight_decay=opt.weight_decay)
    batches = [data[i : i + opt.batch_size].to(device) for i in range(0, data.shape[0], opt.batch_size)]
    targets: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for b in batches:
            outs: list = []
            with capture_layer_outputs(fp, outs):
                fp(
                    input_ids=b,
                    **cache_kw(pivot.as_cache(b.shape[0], dtype, device)),
                    use_cache=True,
                    logits_to_keep=1,
                )
            targets.append([o.detach() for o in outs])

    def loss_on(i: int) -> torch.Tensor:
        b = batches[i]
        cache = PivotCache(
            pivot.token_ids,
            [k.expand(b.shape[0], -1, -1, -1) for k in keys],
            [v.expand(b.shape[0], -1, -1, -1) for v in values],
        )
        from transformers import DynamicCache

        dc = DynamicCache(ddp_cache_data=list(zip(cache.keys, cache.values, strict=True)))
        outs: list = []
        with capture_layer_outputs(model, outs):
            model(input_ids=b, **cache_kw(dc), use_cache=True, logits_to_keep=1)
        return sum(
            torch.nn.functional.mse_loss(o.float(), t.float()) for o, t in zip(outs, targets[i], strict=True)
        )

    model.requires_grad_(False)
    with straight_through(model), torch.enable_grad():
        with torch.no_grad():
            first = sum(float(loss_on(i)) for i in range(len(batches))) / len(batches)
        last = first
        for step in track(range(opt.steps), "intactkv calibrate"):
            optim.zero_grad(set_to_none=True)
            loss = loss_on(step % len(batches))
            loss.backward()
            optim.step()
            last = float(loss.detach())
        with torch.no_grad():
            final = sum(float(loss_on(i)) for i in range(len(batches))) / len(batches)
    logger.info("intactkv calibrate: layer-output MSE %.5g -> %.5g (last batch %.5g)", first, final, last)
    out = PivotCache(
        pivot.token_ids, [k.detach().float().cpu() for k in keys], [v.detach().float().cpu() for v in values]
    )
    return first, final, out
