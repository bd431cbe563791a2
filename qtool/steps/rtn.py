"""``rtn``: round-to-nearest weight quantization of every targeted decoder linear."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from pydantic import Field

from qtool.algorithms.gptq import rtn_quantize
from qtool.models.adapters import get_adapter
from qtool.models.qlinear import QuantizedWeight
from qtool.steps import register
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


@register("rtn")
class RTN(StepConfig):
    """Quantize weights to the nearest grid point (optionally with a per-group MSE clip search)."""

    data_parallel: ClassVar[bool] = True  # nothing to calibrate

    quantizes_weights: ClassVar[bool] = True

    mse_clip: bool = Field(False, description="search a clip ratio per row/group minimizing the weight error")

    streams: ClassVar[bool] = True

    def stream_start(self, ctx) -> None:
        ctx.weight_spec("rtn")  # fail before any work when the scheme quantizes no weights
        ctx.state["rtn"] = {"start": time.perf_counter(), "errors": {}}

    def stream_layer(self, ctx, runner, i: int, layer) -> None:
        spec = ctx.weight_spec("rtn")
        adapter = get_adapter(ctx.model.config)
        errors = ctx.state["rtn"]["errors"]
        lins = ctx.pending({n: adapter.linear(layer, n) for n in adapter.linear_names()})
        for name, lin in lins.items():
            res = rtn_quantize(
                lin.weight.data.float(), spec, mse_clip=self.mse_clip, scale_dtype=ctx.scale_dtype
            )
            lin.set_quantized(QuantizedWeight(res.codes, res.scale, res.zero, spec))
            errors[f"layers.{i}.{name}"] = res.loss

    def stream_end(self, ctx) -> None:
        st = ctx.state["rtn"]
        seconds = time.perf_counter() - st["start"]
        ctx.record("rtn", {"seconds": seconds, "layer_errors": st["errors"]})
        logger.info(
            "rtn: %d linears quantized to %s in %.1fs",
            len(st["errors"]),
            ctx.scheme.weights.model_dump(),
            seconds,
        )

    def apply(self, ctx) -> None:
        self.stream_start(ctx)
        for i, layer in enumerate(get_adapter(ctx.model.config).layers(ctx.model)):
            self.stream_layer(ctx, None, i, layer)
        self.stream_end(ctx)
