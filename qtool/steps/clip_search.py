"""``clip_search``: calibrate the clip ratio of every dynamic activation and KV quantizer.

Dynamic per-token quantization takes its range from each token's own max (times a clip ratio);
QuaRot uses one ratio everywhere (activations 0.9, KV 0.95). The best ratio depends on the
layer: after a Hadamard rotation a token is close to Gaussian and the MSE-optimal 4-bit range is
well inside its max, while a layer with a few dominant channels wants less clipping. This step
picks, from ``grid``, per linear the ratio minimizing the output error of its input quantization
``|(x - Q_c(x)) W^T|^2`` and per attention layer the ratio minimizing the relative error of K and
V (one ratio for both, as the int4 cache stores one), on calibration tokens.

Layers are visited sequentially (:class:`~qtool.steps.layerwise.LayerwiseRunner`): each sees
inputs produced by the earlier layers with their chosen ratios. Run it after ``rotate`` and
before ``gptq``/``rtn`` (whose sequential passes then see the final activation quantizers). The
ratios are run-time settings: recorded in ``ctx.runtime["clip_search"]`` and re-applied by the
loader; the packed kernels take a ratio per linear / per layer as well.

Under torchrun each rank pushes its share of the calibration windows; the per-candidate error
tallies (squared output errors; K and V squared errors and norms) are summed over ranks in float64
before the argmin, so every rank picks the same ratios. The tokens used per quantizer are a stride
within each window (positions ``0, s, 2s, ...``, ``s`` from the total token count), so the sample
does not depend on the number of ranks or the batch size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from qtool import dist
from qtool.errors import QtoolError
from qtool.quant.quantizer import fake_quant
from qtool.steps import register
from qtool.steps.layerwise import LayerwiseRunner, capture_inputs
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")
DEFAULT_GRID = [round(0.5 + 0.05 * i, 2) for i in range(11)]  # 0.5 .. 1.0


@register("clip_search")
class ClipSearch(StepConfig):
    """Per-linear activation clip ratios and per-layer KV clip ratios chosen on calibration data."""

    grid: list[float] = Field(default_factory=lambda: list(DEFAULT_GRID), description="candidate ratios")
    activations: bool = Field(True, description="search the activation clip of every quantized linear")
    kv: bool = Field(True, description="search the KV-cache clip of every attention layer")
    max_tokens: int = Field(8192, ge=64, description="calibration tokens used per quantizer (evenly strided)")
    batch_size: int = Field(8, ge=1, description="calibration windows per forward pass")

    data_parallel: ClassVar[bool] = True  # error tallies summed over ranks before each choice

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < c <= 1.0 for c in v):
            raise ValueError(f"grid must be a non-empty list of ratios in (0, 1], got {v}")
        return sorted(set(v))

    def apply(self, ctx) -> None:
        scheme = ctx.scheme
        do_act = self.activations and scheme.activations is not None
        do_kv = self.kv and scheme.kv_cache is not None
        if not (do_act or do_kv):
            raise QtoolError(
                "`clip_search` needs scheme.activations or scheme.kv_cache (nothing to calibrate)"
            )
        start = time.perf_counter()
        runner = LayerwiseRunner(ctx, self.batch_size, offload=True, shard=True)
        n_tokens = sum(x.shape[0] * x.shape[1] for x in runner.inputs)
        n_tokens = int(dist.sum_(torch.tensor([float(n_tokens)])).item())  # all ranks': one stride
        stride = max(1, n_tokens // self.max_tokens)
        seq = runner.inputs[0].shape[1] if runner.inputs else 1
        act: dict[str, float] = {}
        kv: dict[str, float] = {}
        gains: list[float] = []

        def subsample(x: torch.Tensor) -> torch.Tensor:
            """Rows ``0, s, 2s, ...`` of each window (``x``: ``[windows, rows, ..., D]``)."""
            x = x.reshape(x.shape[0], -1, x.shape[-1])[:, ::stride]
            return x.reshape(-1, x.shape[-1]).detach().float().cpu()

        def tally(values: list[float]) -> list[float]:
            """Per-candidate sums over every rank's tokens (float64; alone: the values)."""
            return dist.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

        def search_layer(i: int, layer) -> None:
            lins = {}
            if do_act:
                lins = {n: runner.adapter.linear(layer, n) for n in runner.adapter.linear_names()}
                lins = {n: m for n, m in lins.items() if getattr(m, "act_spec", None) is not None}
            xs: dict[str, list[torch.Tensor]] = {n: [] for n in lins}
            kvs: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
            st = runner.adapter.attention(layer).qtool

            def record(k, v):
                ks, vs = st.smooth_kv(k, v)  # what is quantized (WKVQuant smoothing, when set)
                kvs["k"].append(subsample(ks.transpose(1, 2)))  # [tokens * heads, D] rows
                kvs["v"].append(subsample(vs.transpose(1, 2)))
                return orig(k, v)

            orig = st.quantize_kv
            if do_kv:
                st.quantize_kv = record
            try:
                with capture_inputs(lins, lambda n, x: xs[n].append(subsample(lins[n].prepare_input(x)))):
                    runner.forward_all(layer)
            finally:
                if do_kv:
                    del st.quantize_kv
            for name, lin in lins.items():
                X = torch.cat(xs[name])
                W = lin.weight.data.float().cpu()
                errs = tally(
                    [
                        float(((X - fake_quant(X, _clip(lin.act_spec, c))) @ W.T).pow(2).sum())
                        for c in self.grid
                    ]
                )
                best = min(range(len(errs)), key=errs.__getitem__)
                ref = (
                    errs[self.grid.index(lin.act_spec.clip_ratio)]
                    if lin.act_spec.clip_ratio in self.grid
                    else None
                )
                if ref:
                    gains.append(errs[best] / ref)
                lin.act_spec = _clip(lin.act_spec, self.grid[best])
                act[f"layers.{i}.{name}"] = self.grid[best]
            if do_kv and st.k_spec is not None:
                K, V = torch.cat(kvs["k"]), torch.cat(kvs["v"])

                def sq_err(x, spec, c):
                    return float((x - fake_quant(x, _clip(spec, c))).pow(2).sum())

                # K's and V's squared errors per candidate and their squared norms, summed over ranks
                t = tally(
                    [sq_err(K, st.k_spec, c) for c in self.grid]
                    + [sq_err(V, st.v_spec, c) for c in self.grid]
                    + [float(K.pow(2).sum()), float(V.pow(2).sum())]
                )
                n = len(self.grid)
                nk, nv = max(t[2 * n], 1e-30), max(t[2 * n + 1], 1e-30)
                errs = [t[j] / nk + t[n + j] / nv for j in range(n)]
                best = self.grid[min(range(len(errs)), key=errs.__getitem__)]
                st.k_spec, st.v_spec = _clip(st.k_spec, best), _clip(st.v_spec, best)
                kv[f"layers.{i}"] = best

        runner.run(search_layer, "clip_search")
        ctx.runtime["clip_search"] = {"act": act, "kv": kv}
        seconds = time.perf_counter() - start
        ctx.record(
            "clip_search",
            {
                "act": act,
                "kv": kv,
                "tokens_per_quantizer": (n_tokens // seq) * -(-seq // stride),  # windows x strided rows
                # calibration output error at the chosen ratio / at the scheme's ratio, per linear
                "mean_error_vs_scheme_clip": sum(gains) / len(gains) if gains else None,
                "max_error_vs_scheme_clip": max(gains) if gains else None,
                "solve_seconds": seconds,
            },
        )
        logger.info(
            "clip_search: %d activation and %d KV clip ratios in %.1fs (activation ratios %s..%s)",
            len(act),
            len(kv),
            seconds,
            min(act.values(), default=None),
            max(act.values(), default=None),
        )


def _clip(spec, ratio: float):
    return dataclasses.replace(spec, clip_ratio=float(ratio))
