"""``gptq``: sequential layer-wise GPTQ of every targeted decoder linear (METHODS.md section 2).

Each decoder layer is calibrated on the outputs of the already quantized layers before it.
Inside a layer the linears are quantized in true-sequential groups (q/k/v, o, gate/up, down),
each group's Hessian taken from inputs that already pass through the quantized groups before
it. Hessians accumulate in float32 from the linear's input after its online transform.
"""

from __future__ import annotations

import logging
import time

import torch
from pydantic import Field

from qtool.algorithms.gptq import HessianAccumulator, gptq_quantize
from qtool.models.qlinear import QuantizedWeight
from qtool.recipe import StepConfig
from qtool.steps import register
from qtool.steps.layerwise import LayerwiseRunner, capture_inputs

logger = logging.getLogger("qtool")
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def hessian_input(lin, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    x = lin.prepare_input(x)
    return lin.quantize_input(x) if quantized else x


@register("gptq")
class GPTQ(StepConfig):
    """GPTQ with damping, optional act-order, lazy block updates, groups and MSE clip search."""

    block_size: int = Field(128, ge=1)
    damp: float = Field(0.01, gt=0.0, description="damping as a share of mean(diag H)")
    act_order: bool = Field(False, description="quantize columns in descending diag(H) order (static groups)")
    mse_clip: bool = Field(True, description="MSE search of the weight clip ratio (QuaRot's setting)")
    true_sequential: bool = Field(
        True, description="quantize q/k/v, o, gate/up, down one group after another"
    )
    hessian_on_quantized_inputs: bool = Field(
        False, description="accumulate H from activation-quantized inputs instead of full-precision ones"
    )
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")
    offload: bool = Field(True, description="keep calibration activations on the CPU")

    def apply(self, ctx) -> None:
        w = ctx.scheme.weights
        if w is None:
            raise ValueError("`gptq` needs scheme.weights")
        spec = w.spec()
        targets = set(ctx.scheme.targets)
        groups = SEQUENTIAL_GROUPS if self.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
        runner = LayerwiseRunner(ctx, self.batch_size, self.offload)
        errors: dict[str, float] = {}
        start = time.perf_counter()

        def quantize_layer(i: int, layer) -> None:
            for group in groups:
                lins = {n: runner.adapter.linear(layer, n) for n in group if n in targets}
                lins = {n: m for n, m in lins.items() if m.qweight is None}
                if not lins:
                    continue
                hess = {n: HessianAccumulator() for n in lins}

                def add(name, x, hess=hess, lins=lins):
                    hess[name].add(hessian_input(lins[name], x, self.hessian_on_quantized_inputs))

                with capture_inputs(lins, add, stop=True):
                    runner.forward_all(layer)
                for name, lin in lins.items():
                    res = gptq_quantize(
                        lin.weight.data.float(),
                        hess[name].H,
                        spec,
                        block_size=self.block_size,
                        damp=self.damp,
                        act_order=self.act_order,
                        mse_clip=self.mse_clip,
                        scale_dtype=ctx.scale_dtype,
                    )
                    lin.set_quantized(QuantizedWeight(res.codes, res.scale, res.zero, spec))
                    errors[f"layers.{i}.{name}"] = res.loss

        runner.run(quantize_layer, "gptq")
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None
        ctx.record(
            "gptq",
            {
                "layer_errors": errors,
                "peak_gpu_memory_gb": peak,
                "solve_seconds": time.perf_counter() - start,
            },
        )
        logger.info("gptq: %d linears in %.1fs", len(errors), time.perf_counter() - start)
