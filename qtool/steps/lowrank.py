"""``lowrank``: GPTQ jointly solved with a full-precision low-rank correction (LRC, METHODS.md 6).

Replaces ``gptq`` in a recipe: every targeted linear becomes ``y = Q_w(W) Q_a(x) + U V^T x``
with ``x`` the linear's input after its online transform (the Hadamard before ``down_proj``,
the head mixing before ``o_proj`` of a rotated model). The decoder layers are calibrated
sequentially like ``gptq`` (true-sequential groups q/k/v, o, gate/up, down), and for each group
the statistics ``S_x``, ``S_y``, ``S_xy`` of ``X`` and ``Y = Q_a(X)`` are accumulated online in
float64 from inputs that already pass through the quantized (and corrected) groups before it.
Linears reading the same input (q/k/v, gate/up) share one set of statistics.

Memory: ``3 * 8 * d^2`` bytes of statistics per group on the compute device (SmolLM2-135M:
8 MB for d = 576, 57 MB for down_proj's d = 1536; Llama-2-7B: 0.4 GB for d = 4096, 2.9 GB for
d = 11008), plus GPTQ's own ``d x d`` float32 Hessian and one layer.

The factors are rounded to the checkpoint dtype as soon as they are solved, so the model in
memory computes exactly what the exported LoRA adapter reproduces.

Streams (``qtool quantize --stream``): one decoder layer in memory at a time, plus the statistics
above; each layer's factors are saved with its resume state and the adapter is written from them
at the end, byte-identical to the in-memory run's.
"""

from __future__ import annotations

import logging
import math
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from qtool import dist
from qtool.algorithms.lowrank import LowRankStats, lowrank_solve, rank_for_fraction
from qtool.errors import QtoolError
from qtool.models.lora import lora_tensors, save_lora_tensors
from qtool.models.qlinear import QuantizedWeight
from qtool.models.streaming import layers_prefix
from qtool.quant.quantizer import n_groups
from qtool.steps import register
from qtool.steps.layerwise import apply_layerwise, calibrate_groups
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


@register("lowrank")
class LowRank(StepConfig):
    """Quantize weights with GPTQ and fit a full-precision rank-k correction ``U V^T`` jointly."""

    quantizes_weights: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = True

    rank: int | None = Field(
        None, ge=0, description="absolute rank of every correction (or use rank_fraction)"
    )
    rank_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="share of each weight's parameters spent on U and V (0.1 = 10%)"
    )
    iterations: int = Field(1, ge=1, le=5, description="alternations of GPTQ and the reduced-rank regression")
    init: Literal["closed_form", "zero"] = Field(
        "closed_form",
        description="start of the alternation: the exact optimum with continuous quantized weights "
        "(METHODS.md 6), or U = V = 0 (the solver before it, for comparison)",
    )
    cross_shrink: Literal["auto"] | float = Field(
        "auto",
        description="factor in [0, 1] on the W-step's cross term S_xy S_y^-1, which overfits with few "
        "calibration tokens; 'auto' = Stein estimate from the statistics at each W-step, 1 = unshrunk",
    )
    targets: list[str] | None = Field(
        None, description="linears that get a correction (default: scheme.targets)"
    )
    damp: float = Field(
        0.01, gt=0.0, description="ridge of both solves and GPTQ's damping, share of mean(diag S_y)"
    )
    block_size: int = Field(128, ge=1)
    act_order: bool = Field(False, description="GPTQ act-order (static groups)")
    mse_clip: bool = Field(True, description="MSE search of the weight clip ratio")
    true_sequential: bool = True
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")
    offload: bool = Field(True, description="keep calibration activations on the CPU")

    @model_validator(mode="after")
    def _one_rank(self) -> LowRank:
        if (self.rank is None) == (self.rank_fraction is None):
            raise ValueError("give exactly one of `rank` (absolute) or `rank_fraction` (e.g. 0.1)")
        if self.cross_shrink != "auto" and not 0.0 <= self.cross_shrink <= 1.0:
            raise ValueError(f"cross_shrink must be 'auto' or a number in [0, 1], got {self.cross_shrink}")
        return self

    def rank_for(self, m: int, d: int) -> int:
        k = self.rank if self.rank is not None else rank_for_fraction(m, d, self.rank_fraction)
        return min(k, m, d)

    streams: ClassVar[bool] = True
    needs_runner: ClassVar[bool] = True

    def stream_start(self, ctx) -> None:
        ctx.weight_spec("lowrank")  # fail before any work when the scheme quantizes no weights
        quant = set(ctx.scheme.targets)
        corrected = set(self.targets) if self.targets is not None else quant
        if corrected - quant:
            raise QtoolError(
                f"lowrank.targets {sorted(corrected - quant)} are not quantized; choose among scheme.targets"
            )
        # plain JSON (a streamed run saves it after every layer to resume)
        ctx.state["lowrank"] = {
            "start": time.perf_counter(),
            "errors": {},
            "linears": {},
            "extra": 0,
            "last": -1,
        }

    def stream_layer(self, ctx, runner, i: int, layer) -> None:
        """Decoder layer ``i``, its inputs in ``runner`` (the outputs of the corrected layers before)."""
        spec = ctx.weight_spec("lowrank")
        corrected = set(self.targets) if self.targets is not None else set(ctx.scheme.targets)
        st = ctx.state["lowrank"]
        st["last"] = i
        gptq_kwargs = {
            "block_size": self.block_size,
            "act_order": self.act_order,
            "mse_clip": self.mse_clip,
            "scale_dtype": ctx.scale_dtype,
        }

        def add(lin, stats, x):
            xt = lin.prepare_input(x)
            stats.add(xt, lin.quantize_input(xt))

        for lins, stats in calibrate_groups(ctx, runner, layer, self.true_sequential, LowRankStats, add):
            if dist.active():  # sum every rank's statistics (float64) before the solves, once per input
                merged = {}
                for st_ in stats.values():
                    if id(st_) not in merged:
                        merged[id(st_)] = st_.merged(dist.sum_)
                stats = {n: merged[id(st_)] for n, st_ in stats.items()}
            for j, (name, lin) in enumerate(lins.items()):
                W = lin.weight.data.float()
                m, d = W.shape
                k = self.rank_for(m, d) if name in corrected else 0

                def solve(W=W, k=k, lstats=stats[name]):
                    res = lowrank_solve(
                        W,
                        lstats,
                        spec,
                        k,
                        iterations=self.iterations,
                        damp=self.damp,
                        init=self.init,
                        cross_shrink=self.cross_shrink,
                        gptq_kwargs=gptq_kwargs,
                    )
                    obj = res.objective or [float("nan")]
                    info = torch.tensor([obj[0], obj[-1], res.seconds], dtype=torch.float64)
                    return res.codes, res.scale, res.zero, res.U, res.V, info

                g = n_groups(d, spec)
                like = [
                    ((m, d), torch.int8),
                    ((m, g), torch.float32),
                    ((m, g), torch.int8),
                    ((m, k), torch.float32),
                    ((d, k), torch.float32),
                    ((3,), torch.float64),
                ]
                # several ranks: linear j of the layer is solved by its owner and broadcast
                codes, scale, zero, U, V, info = dist.solve_on_owner(
                    dist.owner(i + j), solve, like, lin.weight.device
                )
                lin.set_quantized(QuantizedWeight(codes, scale, zero, spec))
                if k > 0:
                    dt = lin.weight.dtype
                    U = U.to(ctx.scale_dtype).to(dt)
                    V = V.to(ctx.scale_dtype).to(dt)
                    lin.set_lowrank(U, V)
                    st["extra"] += U.numel() + V.numel()
                first, last, seconds = (float(v) for v in info)
                has_obj = not math.isnan(last)
                st["errors"][f"layers.{i}.{name}"] = last if has_obj else None
                st["linears"][f"layers.{i}.{name}"] = {
                    "rank": k,
                    "objective_first": first if has_obj else None,
                    "objective_last": last if has_obj else None,
                    "seconds": round(seconds, 3),
                }
            del stats

    def stream_extra(self, ctx, i: int, layer) -> dict:
        """The layer's factors in the adapter's layout (the streamed run writes the adapter at the end)."""
        return lora_tensors(ctx.model, ctx.scale_dtype, prefix=f"{layers_prefix(ctx.model)}{i}.")

    def stream_sidecar(self, ctx, tensors: dict, folder) -> str | None:
        if "lowrank" not in ctx.runtime:
            return None
        save_lora_tensors(tensors, folder, ctx.runtime["lowrank"]["base_model"])
        return "lowrank"

    def layer_summary(self, ctx) -> str:
        """The last finished layer's objectives, for its progress line in logs."""
        st = ctx.state["lowrank"]
        mine = [v for k, v in st["errors"].items() if k.startswith(f"layers.{st['last']}.") and v is not None]
        return f"mean LRC objective {sum(mine) / len(mine):.4g}" if mine else "no linear quantized"

    def stream_end(self, ctx) -> None:
        st = ctx.state["lowrank"]
        seconds = time.perf_counter() - st["start"]
        if st["extra"]:  # export writes the factors as a PEFT LoRA adapter beside the weights
            ctx.runtime["lowrank"] = {"base_model": ctx.recipe.model}
        peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None
        ctx.record(
            "lowrank",
            {
                "linears": st["linears"],
                "extra_parameters": st["extra"],
                "solve_seconds": seconds,
                "iterations": self.iterations,
                "rank": self.rank,
                "rank_fraction": self.rank_fraction,
                "peak_gpu_memory_gb": peak,
            },
        )
        logger.info(
            "lowrank: %d linears, %d extra parameters, %.1fs", len(st["linears"]), st["extra"], seconds
        )

    def apply(self, ctx) -> None:
        apply_layerwise(self, ctx)
