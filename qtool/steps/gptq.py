"""``gptq``: sequential layer-wise GPTQ of every targeted decoder linear (METHODS.md section 2).

Each decoder layer is calibrated on the outputs of the already quantized layers before it.
Inside a layer the linears are quantized in true-sequential groups (q/k/v, o, gate/up, down),
each group's Hessian taken from inputs that already pass through the quantized groups before
it. Hessians accumulate in float32 from the linear's input after its online transform.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch
from pydantic import Field

from qtool import dist
from qtool.algorithms.gptq import HessianAccumulator, gptq_quantize
from qtool.models.adapters import get_adapter
from qtool.models.prepare import set_layer_quantization_enabled, set_quantization_enabled
from qtool.models.qlinear import QuantizedWeight
from qtool.quant.quantizer import n_groups
from qtool.steps import register
from qtool.steps.layerwise import apply_layerwise, calibrate_groups
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


def hessian_input(lin, x: torch.Tensor, quantized: bool) -> torch.Tensor:
    x = lin.prepare_input(x)
    return lin.quantize_input(x) if quantized else x


@register("gptq")
class GPTQ(StepConfig):
    """GPTQ with damping, optional act-order, lazy block updates, groups and MSE clip search."""

    quantizes_weights: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = True

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
    act_quant_in_calibration: bool = Field(
        True,
        description="run the calibration windows through each layer with activation and KV quantization "
        "on (false: quantized weights and full-precision activations, as llm-compressor and QuaRot's "
        "GPTQ calibrate)",
    )
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")
    offload: bool = Field(True, description="keep calibration activations on the CPU")

    streams: ClassVar[bool] = True
    needs_runner: ClassVar[bool] = True

    def stream_start(self, ctx) -> None:
        ctx.weight_spec("gptq")  # fail before any work when the scheme quantizes no weights
        ctx.state["gptq"] = {"start": time.perf_counter(), "errors": {}, "last": -1}

    def stream_layer(self, ctx, runner, i: int, layer) -> None:
        """Decoder layer ``i``, its inputs in ``runner`` (the outputs of the quantized layers before)."""
        spec = ctx.weight_spec("gptq")
        st = ctx.state["gptq"]
        st["last"] = i
        if not self.act_quant_in_calibration:  # this layer's capture and advance passes; on again at the end
            set_layer_quantization_enabled(get_adapter(ctx.model.config), layer, False)

        def add(lin, acc, x):
            acc.add(hessian_input(lin, x, self.hessian_on_quantized_inputs))

        # linears reading the same input alike (q/k/v, gate/up) share one Hessian
        for lins, hess in calibrate_groups(ctx, runner, layer, self.true_sequential, HessianAccumulator, add):
            merged: dict[int, torch.Tensor] = {}
            for k, (name, lin) in enumerate(lins.items()):
                # several ranks: the Hessian summed over every rank's windows, then solved below
                if dist.active() and id(hess[name]) not in merged:
                    merged[id(hess[name])] = hess[name].merged(dist.sum_)
                H = merged[id(hess[name])] if dist.active() else hess[name].H
                m, d = lin.weight.shape
                g = n_groups(d, spec)
                loss = torch.zeros(1, dtype=torch.float64)

                def solve(r0, r1, lin=lin, H=H, loss=loss):
                    res = self._solve(ctx, lin.weight.data[r0:r1], H, spec)
                    loss += res.loss
                    return res.codes, res.scale, res.zero

                # a group with at least as many linears as ranks: one owner per linear (each rank
                # runs whole column loops, whose per-column cost does not shrink with fewer rows);
                # fewer (o_proj, down_proj alone): every rank solves a share of the rows
                if spec.granularity == "tensor" or len(lins) >= dist.world():
                    qp = (1, 1) if spec.granularity == "tensor" else (m, g)
                    like = [((m, d), torch.int8), (qp, torch.float32), (qp, torch.int8)]
                    codes, scale, zero = dist.solve_on_owner(
                        dist.owner(i + k), lambda s=solve, m=m: s(0, m), like, lin.weight.device
                    )
                else:
                    like = [((d,), torch.int8), ((g,), torch.float32), ((g,), torch.int8)]
                    codes, scale, zero = dist.solve_rows(m, solve, like, lin.weight.device)
                lin.set_quantized(QuantizedWeight(codes, scale, zero, spec))
                st["errors"][f"layers.{i}.{name}"] = float(dist.sum_(loss))

    def _solve(self, ctx, W, H, spec):
        return gptq_quantize(
            W.float(),
            H,
            spec,
            block_size=self.block_size,
            damp=self.damp,
            act_order=self.act_order,
            mse_clip=self.mse_clip,
            scale_dtype=ctx.scale_dtype,
        )

    def layer_summary(self, ctx) -> str:
        """The last finished layer's errors, for its progress line in logs."""
        st = ctx.state["gptq"]
        mine = [v for k, v in st["errors"].items() if k.startswith(f"layers.{st['last']}.")]
        return f"mean GPTQ loss {sum(mine) / len(mine):.4g}" if mine else "no linear quantized"

    def stream_end(self, ctx) -> None:
        if not self.act_quant_in_calibration:
            set_quantization_enabled(ctx.model, True)
        st = ctx.state["gptq"]
        seconds = time.perf_counter() - st["start"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None
        ctx.record(
            "gptq", {"layer_errors": st["errors"], "peak_gpu_memory_gb": peak, "solve_seconds": seconds}
        )
        logger.info("gptq: %d linears in %.1fs", len(st["errors"]), seconds)

    def apply(self, ctx) -> None:
        apply_layerwise(self, ctx)
