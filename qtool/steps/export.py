"""``export``: write the quantized model as a safetensors checkpoint folder."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import Field

from qtool import dist
from qtool.errors import QtoolError
from qtool.steps import register
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


@register("export")
class Export(StepConfig):
    """Write the checkpoint (``--output`` or the recipe's ``output``). Always the last step."""

    data_parallel: ClassVar[bool] = True  # nothing to calibrate

    format: Literal["compressed-tensors", "gptq"] = Field(
        "compressed-tensors", description="compressed-tensors pack-quantized (default) or GPTQ (W4A16 only)"
    )

    def apply(self, ctx) -> None:
        from qtool.export.writer import round_unquantized_, write_checkpoint

        out = ctx.output
        if not dist.is_main():  # rank 0 alone writes the checkpoint
            ctx.record("export", {"path": str(out), "format": self.format, "written_by_rank": 0})
            return
        if out is None:
            raise QtoolError("`export` needs an output folder: pass --output or set `output:` in the recipe")
        size = write_checkpoint(ctx, out, self.format, overwrite=ctx.overwrite)
        round_unquantized_(ctx.model, ctx.scale_dtype)
        ctx.record("export", {"path": str(out), "format": self.format, **size})
        logger.info("export: wrote %s (%.1f MB)", out, size["bytes"] / 1e6)
