"""``kv_smooth``: WKVQuant's two-dimensional KV quantization (METHODS.md section 4).

A static per-channel shift and scale for K and for V, ``k~ = (k - shift) / scale``, followed by
the scheme's dynamic per-token quantization of ``k~`` (and of ``v~``). Where the math allows it the
scale is folded into the adjacent weights, so the full-precision function is unchanged:

* K (after RoPE): the scale is tied on each RoPE pair (channels ``i`` and ``i + D/2``), so it
  commutes with RoPE: ``W_k`` rows ``/ s``, ``W_q`` rows ``* s`` (per KV group); not folded when
  an online Q/K rotation follows RoPE (``rotate`` with a quantized KV cache): then it is applied
  at run time;
* V: ``W_v`` rows ``/ s``, ``W_o`` columns ``* s`` (attention rows sum to 1); at run time when
  ``o_proj`` has an online head-mixing input transform;
* shifts always at run time (``AttnQuantState``), undone after dequantization. (For K it could
  stay: a per-channel constant only adds a per-query constant to the scores; undoing it keeps the
  cached K in the model's basis, so an IntactKV pivot computed by the full-precision model fits.)

Initialization from calibration statistics: ``shift = (max + min) / 2``, ``scale = r**alpha``
(``r`` the half range, normalized to geometric mean 1 per head). ``learn`` then trains the
smoothing (and optionally a learnable weight clip per row/group, OmniQuant-style) block by block
with the cross-block loss: ``own * MAE(block_i) + cross * MAE(after the next k full-precision
blocks)``; with ``learn_clip`` the weights are finally quantized with the learned clip.
What the runtime needs is recorded in ``ctx.runtime["kv_smooth"]``.

Under torchrun the statistics start is data-parallel: each rank takes its share of the windows and
the per-channel minima and maxima are reduced over ranks (exact, so the start does not depend on the
number of ranks). ``learn`` is not data-parallel yet: every rank trains on all windows (the same
result everywhere, logged at the start of the step).
"""

from __future__ import annotations

import copy
import logging
import time
import types

import torch
import torch.nn.functional as F
from pydantic import Field

from qtool import dist
from qtool.algorithms.kv_smooth import fold_linear
from qtool.config import Closed
from qtool.errors import QtoolError
from qtool.models.adapters import get_adapter
from qtool.models.kv_smooth import apply_layer_smoothing, apply_smoothing
from qtool.models.prepare import set_quantization_enabled
from qtool.models.qlinear import QuantizedWeight
from qtool.quant.quantizer import compute_qparams, fake_quant_ste, n_groups, quantize
from qtool.steps import register
from qtool.steps.layerwise import LayerwiseRunner
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


class LearnOptions(Closed):
    """Block-wise learning with the cross-block reconstruction loss (CPU-sized defaults)."""

    epochs: int = Field(1, ge=1)
    samples: int = Field(32, ge=1, description="calibration windows used (the first of the recipe's)")
    seq_len: int = Field(512, ge=16, description="tokens per window (truncated)")
    batch_size: int = Field(4, ge=1)
    lr_smooth: float = Field(5e-3, gt=0.0, description="AdamW lr of the log-scales and shifts")
    lr_clip: float = Field(1e-3, gt=0.0, description="AdamW lr of the weight-clip logits")
    learn_clip: bool = Field(
        False, description="learn a weight clip per row/group and quantize the weights with it"
    )
    cross_blocks: int = Field(1, ge=0, description="k: following full-precision blocks in the loss")
    own_weight: float = Field(1.0, ge=0.0, description="weight of the block's own output MAE")
    cross_weight: float = Field(1.0, ge=0.0, description="weight of the MAE after the next k blocks")
    holdout: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="share of the batches kept out of training; each block keeps the epoch (or the "
        "statistics start) with the lowest held-out loss",
    )


@register("kv_smooth")
class KVSmooth(StepConfig):
    """Per-channel K/V shift and scale, folded where possible, then per-token KV quantization."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="scale = half-range ** alpha")
    shift: bool = Field(True, description="per-channel shifts (K and V)")
    fold: bool = Field(True, description="fold scales into q/k/v/o weights where possible")
    learn: LearnOptions | None = Field(
        None, description="learn smoothing (and clipping) with the cross-block loss"
    )
    batch_size: int = Field(8, ge=1, description="calibration windows per forward (statistics)")

    def runs_data_parallel(self) -> bool:
        # the statistics start is reduced over ranks; `learn` trains on every rank over all windows
        return self.learn is None

    def apply(self, ctx) -> None:
        if ctx.scheme.kv_cache is None:
            raise QtoolError("`kv_smooth` needs scheme.kv_cache (it smooths the quantized KV cache)")
        if ctx.weights_quantized():
            raise QtoolError(
                "`kv_smooth` folds into the weights: put it before the weight steps (rtn, gptq, ...)"
            )
        start = time.perf_counter()
        model = ctx.model
        adapter = get_adapter(model.config)
        lo = self.learn
        if lo is not None:
            windows = ctx.calibration()[: lo.samples, : lo.seq_len]
            shim = types.SimpleNamespace(model=model, device=ctx.device, calibration=lambda: windows)
            runner = LayerwiseRunner(shim, lo.batch_size, offload=True, fp_stream=True)
            fp = copy.deepcopy(model)
            set_quantization_enabled(fp, False)
            fp_layers = adapter.layers(fp)
        else:
            # statistics only: each rank its share of the windows, min / max reduced over ranks
            runner = LayerwiseRunner(ctx, self.batch_size, offload=True, shard=True)
            fp_layers = None
        layers_entry: list[dict] = []
        fold_k = self.fold and adapter.attention(adapter.layers(model)[0]).qtool.qk_rotate is None
        fold_v = self.fold and adapter.linear(adapter.layers(model)[0], "o_proj").input_transform is None
        losses: dict[str, list[float]] = {}

        def smooth_layer(i: int, layer) -> None:
            kmin, kmax, vmin, vmax = _kv_stats(runner, layer)
            params = init_smoothing(kmin, kmax, vmin, vmax, self.alpha, self.shift)
            clips = None
            if lo is not None:
                params, hist, clips = learn_block(
                    runner, i, layer, fp_layers, params, lo, ctx, fold_k, fold_v, self.shift
                )
                losses[f"layers.{i}"] = hist
            entry = {k: v.tolist() for k, v in params.items()}
            apply_layer_smoothing(layer, adapter, entry, fold_k, fold_v, fold=True)
            if clips:
                quantize_with_clips(layer, adapter, clips, ctx.scheme.weights.spec(), ctx.scale_dtype)
            layers_entry.append(entry)

        runner.run(smooth_layer, "kv_smooth", fp_layers=fp_layers)
        entry = {"fold_k": fold_k, "fold_v": fold_v, "layers": layers_entry}
        ctx.runtime["kv_smooth"] = entry
        if ctx.has_fp_reference():  # keep an existing full-precision snapshot in the same basis
            apply_smoothing(ctx.fp_reference(), entry, fold=True)
        ctx.record(
            "kv_smooth",
            {
                "fold_k": fold_k,
                "fold_v": fold_v,
                "learn_losses": losses,
                "seconds_smooth": time.perf_counter() - start,
            },
        )
        logger.info(
            "kv_smooth: %d layers (K scale %s, V scale %s)",
            len(layers_entry),
            "folded" if fold_k else "runtime",
            "folded" if fold_v else "runtime",
        )

    def replay_on_reference(self, ref_ctx, ctx) -> None:
        if "kv_smooth" in ctx.runtime:  # the recorded smoothing, folded like in the quantized model
            apply_smoothing(ref_ctx.model, ctx.runtime["kv_smooth"], fold=True)


# --- statistics and initialization (pure tensor math) --------------------------------------------


@torch.no_grad()
def _kv_stats(runner, layer):
    st = layer.self_attn.qtool
    acc: dict[str, torch.Tensor] = {}

    def record(k, v):
        for name, x in (("k", k), ("v", v)):
            x = x.detach().float()
            lo, hi = x.amin(dim=(0, 2)), x.amax(dim=(0, 2))  # [H_kv, D]
            acc[name + "min"] = torch.minimum(acc.get(name + "min", lo), lo)
            acc[name + "max"] = torch.maximum(acc.get(name + "max", hi), hi)
        return orig(k, v)

    orig = st.quantize_kv
    st.quantize_kv = record
    try:
        runner.forward_all(layer)
    finally:
        del st.quantize_kv
    # under torchrun every rank saw its own windows: the extremes over all of them (exact)
    return dist.min_(acc["kmin"]), dist.max_(acc["kmax"]), dist.min_(acc["vmin"]), dist.max_(acc["vmax"])


def init_smoothing(kmin, kmax, vmin, vmax, alpha: float, shift: bool = True) -> dict[str, torch.Tensor]:
    """Shift and scale ``[H_kv, D]`` per channel; the K scale is tied on RoPE pairs (i, i + D/2)."""
    out = {}
    for name, lo, hi in (("k", kmin, kmax), ("v", vmin, vmax)):
        r = ((hi - lo) / 2).clamp(min=1e-5)
        if name == "k":
            half = r.shape[-1] // 2
            pair = torch.maximum(r[:, :half], r[:, half:])
            r = torch.cat([pair, pair], dim=-1)
        s = r.pow(alpha)
        s = s / s.log().mean(dim=-1, keepdim=True).exp()
        out[f"{name}_scale"] = s
        out[f"{name}_shift"] = (hi + lo) / 2 if shift else torch.zeros_like(lo)
    return out


# --- learning with the cross-block loss ----------------------------------------------------------


def learn_block(runner, i, layer, fp_layers, init, lo: LearnOptions, ctx, fold_k, fold_v, shift):
    """Train one block's smoothing (and weight clips) against the full-precision stream."""
    adapter = runner.adapter
    st = adapter.attention(layer).qtool
    device = runner.device
    half = init["k_scale"].shape[-1] // 2
    log_sk = torch.nn.Parameter(init["k_scale"][:, :half].log().to(device))
    log_sv = torch.nn.Parameter(init["v_scale"].log().to(device))
    k_shift = torch.nn.Parameter(init["k_shift"].to(device), requires_grad=shift)
    v_shift = torch.nn.Parameter(init["v_shift"].to(device), requires_grad=shift)
    groups = adapter.attention(layer).config.num_attention_heads // log_sv.shape[0]
    wspec = ctx.scheme.weights.spec() if (lo.learn_clip and ctx.scheme.weights) else None
    names = [n for n in adapter.linear_names() if n in ctx.scheme.targets]
    lins = {n: adapter.linear(layer, n) for n in names}
    base = {n: lin.weight.data.clone() for n, lin in lins.items()}
    clips = {}
    if wspec is not None:
        for n, lin in lins.items():
            clips[n] = torch.nn.Parameter(
                torch.full((lin.out_features, n_groups(lin.in_features, wspec)), 4.0, device=device)
            )

    def scales():
        sk = torch.cat([log_sk, log_sk], dim=-1).exp()
        return sk, log_sv.exp()

    def weight_and_bias(n):
        sk, sv = scales()
        b = lins[n].bias
        w, b = fold_linear(n, base[n].float(), b, sk, sv, groups, fold_k, fold_v)
        if n in clips:
            w = fake_quant_ste(w, wspec, clip=torch.sigmoid(clips[n]))
        return w, b

    for n, lin in lins.items():
        lin.forward = lambda x, n=n, lin=lin: F.linear(
            lin.quantize_input(lin.prepare_input(x)), *weight_and_bias(n)
        )
    nxt = [fp_layers[j].to(device) for j in range(i + 1, min(i + 1 + lo.cross_blocks, len(fp_layers)))]
    fp_layer = fp_layers[i].to(device)
    groups_p = [{"params": [log_sk, log_sv] + ([k_shift, v_shift] if shift else []), "lr": lo.lr_smooth}]
    if clips:
        groups_p.append({"params": list(clips.values()), "lr": lo.lr_clip})
    opt = torch.optim.AdamW(groups_p, weight_decay=0.0)
    pe = runner.position_embeddings
    hist: list[float] = []

    def set_state():
        sk, sv = scales()
        st.k_shift, st.v_shift = k_shift, v_shift
        st.k_scale = None if fold_k else sk
        st.v_scale = None if fold_v else sv

    batches = list(zip(runner.inputs, runner.fp_inputs, strict=True))
    n_hold = min(len(batches) - 1, round(lo.holdout * len(batches)))
    train, held = batches[: len(batches) - n_hold], batches[len(batches) - n_hold :]
    params = [p for g in groups_p for p in g["params"]]

    def block_loss(xq, xf):
        xq, xf = xq.to(device), xf.to(device)
        with torch.no_grad():
            yf = fp_layer(xf, position_embeddings=pe)
            tf = [yf]
            for blk in nxt:
                tf.append(blk(tf[-1], position_embeddings=pe))
        set_state()
        yq = layer(xq, position_embeddings=pe)
        loss = lo.own_weight * (yq.float() - yf.float()).abs().mean()
        h = yq
        for blk, t in zip(nxt, tf[1:], strict=True):
            h = blk(h, position_embeddings=pe)
            loss = loss + lo.cross_weight * (h.float() - t.float()).abs().mean()
        return loss

    def held_loss() -> float | None:
        if not held:
            return None
        with torch.no_grad():
            return sum(float(block_loss(xq, xf)) for xq, xf in held) / len(held)

    held_hist: list[float | None] = []
    st.ste = True
    try:
        held_hist.append(held_loss())  # epoch 0: the statistics start
        best = (held_hist[0], 0, [p.detach().clone() for p in params])
        with torch.enable_grad():
            for epoch in range(1, lo.epochs + 1):
                total = 0.0
                for xq, xf in train:
                    loss = block_loss(xq, xf)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                hist.append(total / max(1, len(train)))
                held_hist.append(held_loss())
                if held_hist[-1] is None or held_hist[-1] < best[0]:
                    best = (held_hist[-1], epoch, [p.detach().clone() for p in params])
        with torch.no_grad():  # keep the best epoch on the held-out batches (or the start)
            for p, v in zip(params, best[2], strict=True):
                p.copy_(v)
    finally:
        st.ste = False
        for lin in lins.values():
            del lin.forward
    report = {"train": hist, "holdout": held_hist, "epoch_kept": best[1]}
    with torch.no_grad():
        sk, sv = scales()
        out = {
            "k_scale": sk.detach().cpu(),
            "v_scale": sv.detach().cpu(),
            "k_shift": k_shift.detach().cpu(),
            "v_shift": v_shift.detach().cpu(),
        }
    learned_clips = {n: torch.sigmoid(c).detach() for n, c in clips.items()} if clips else None
    return out, report, learned_clips


@torch.no_grad()
def quantize_with_clips(layer, adapter, clips: dict, wspec, scale_dtype) -> None:
    """Quantize each linear (smoothing already folded) with its learned clip, the normal path."""
    for n, clip in clips.items():
        lin = adapter.linear(layer, n)
        w = lin.weight.data.float()
        scale, zero = compute_qparams(w, wspec, clip.to(w.device))
        scale = scale.to(scale_dtype).float()
        lin.set_quantized(QuantizedWeight(quantize(w, scale, zero, wspec), scale, zero, wspec))
