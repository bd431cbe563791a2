"""``rtn``: round-to-nearest weight quantization of every targeted decoder linear."""

from __future__ import annotations

import logging
import time

from pydantic import Field

from qtool.algorithms.gptq import rtn_quantize
from qtool.models.prepare import iter_qlinears
from qtool.models.qlinear import QuantizedWeight
from qtool.recipe import StepConfig
from qtool.steps import register

logger = logging.getLogger("qtool")


@register("rtn")
class RTN(StepConfig):
    """Quantize weights to the nearest grid point (optionally with a per-group MSE clip search)."""

    mse_clip: bool = Field(False, description="search a clip ratio per row/group minimizing the weight error")

    def apply(self, ctx) -> None:
        w = ctx.scheme.weights
        if w is None:
            raise ValueError("`rtn` needs scheme.weights")
        spec = w.spec()
        start = time.perf_counter()
        errors = {}
        for i, name, lin in iter_qlinears(ctx.model):
            if name not in ctx.scheme.targets or lin.qweight is not None:
                continue
            res = rtn_quantize(
                lin.weight.data.float(), spec, mse_clip=self.mse_clip, scale_dtype=ctx.scale_dtype
            )
            lin.set_quantized(QuantizedWeight(res.codes, res.scale, res.zero, spec))
            errors[f"layers.{i}.{name}"] = res.loss
        ctx.record("rtn", {"seconds": time.perf_counter() - start, "layer_errors": errors})
        logger.info(
            "rtn: %d linears quantized to %s in %.1fs",
            len(errors),
            w.model_dump(),
            time.perf_counter() - start,
        )
