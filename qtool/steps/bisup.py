"""``bisup``: BiSup's vertical error suppression (METHODS.md section 5).

Quantization-aware, parameter-efficient fine-tuning, decoder block by decoder block, against the
full-precision block outputs (the snapshot taken before quantizing, rotated when `rotate` ran):
the quantized block reads the outputs of the already fine-tuned blocks before it, the target is
the full-precision block applied to the full-precision stream. Trained per targeted linear, with
weights and activations (and the KV cache) fake-quantized through a straight-through estimator:

* per-group (or per-channel) weight clip ratios ``sigmoid(c)``;
* smoothing factors ``s`` per input channel (``W s`` and ``x / s``), soft-constrained by
  ``reg * |s - 1|^2``, only where ``1/s`` folds into the op before: the input RMSNorm (q/k/v
  share one ``s``), the post-attention RMSNorm (gate/up share one) and ``v_proj -> o_proj``
  (one ``s`` per ``head_dim`` channel, shared by every head, so it commutes with GQA and with
  the head-mixing rotation before ``o_proj``). ``down_proj`` gets none (its input is behind the
  Hadamard of a rotated model, or an elementwise product);
* a low-rank error-compensation term ``A B`` (``A = 0`` at the start) added to the weight
  *before* quantization, ``Q((W + A B) s)``, so it folds into plain quantized weights.

Afterwards everything is folded: ``W' = (W + A B) s`` (rows of ``v_proj`` divided by o's ``s``)
is quantized with the learned clip, ``1/s`` goes into the norm gains; the result is plain
quantized weights (an existing ``lowrank`` correction ``U V^T`` is kept, its ``V`` rescaled).

The starting point is whatever the earlier steps left: after ``gptq``/``lowrank`` the clip is
initialized so that the fake-quantized weight reproduces their grid, otherwise (bisup as the
only weight step) from the float weights with an MSE-searched clip.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from qtool.algorithms.bisup import BisupLinear, Smooth, SmoothView, head_logits, next_token_kl
from qtool.steps import register
from qtool.steps.layerwise import LayerwiseRunner
from qtool.steps.registry import StepConfig

logger = logging.getLogger("qtool")


def _restore(adapter, layer, saved) -> None:
    """Put back a decoder layer's weights, quantized weights, low-rank factors and norm gains."""
    for name in adapter.linear_names():
        lin, old = adapter.linear(layer, name), adapter.linear(saved, name)
        lin.weight.data = old.weight.data.to(lin.weight.device)
        if old.bias is not None:
            lin.bias.data = old.bias.data.to(lin.bias.device)
        if hasattr(old, "qweight"):
            lin.qweight, lin.lora_U, lin.lora_V = old.qweight, old.lora_U, old.lora_V
    for (norm, _), (old_norm, _) in zip(
        adapter.norm_readers(layer), adapter.norm_readers(saved), strict=True
    ):
        norm.weight.data = old_norm.weight.data.to(norm.weight.device)


@register("bisup")
class BiSup(StepConfig):
    """Block-wise QAT of weight clipping, soft-constrained smoothing and a low-rank compensation."""

    quantizes_weights: ClassVar[bool] = True

    start: Literal["fp", "quantized"] = Field(
        "fp",
        description="the weight trained under the quantizer: the full-precision one with the earlier "
        "weight step's rounding kept as an offset (fp), or that step's dequantized weight (quantized)",
    )
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of every trained parameter")
    epochs: int = Field(4, ge=1, le=50, description="passes over the training samples per block")
    samples: int | None = Field(None, ge=1, description="calibration windows used (default: all)")
    batch_size: int = Field(1, ge=1, description="windows per optimizer step")
    rank: int = Field(8, ge=0, description="rank of the low-rank compensation A B folded into W (0 = none)")
    reg: float = Field(1e-2, ge=0.0, description="weight of the smoothing regularizer |s - 1|^2")
    clip: bool = Field(True, description="learn per-group clip ratios")
    smooth: bool = Field(
        True, description="learn smoothing factors where they fold (norm->q/k/v, norm->gate/up, v->o)"
    )
    loss: Literal["relative", "mse"] = Field(
        "relative",
        description="block-output loss: per-token squared error relative to the token's FP output "
        "norm (tokens with massive activations do not dominate), or plain MSE",
    )
    holdout: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="share of the samples held out of training: after every epoch the block's "
        "parameters with the lowest held-out loss so far are kept, and a block whose training never "
        "beats its starting point on them keeps its start (0 = train on all, keep the last epoch)",
    )
    head_loss: bool = Field(
        True,
        description="train the last block on the KL divergence of the next-token distribution "
        "(its output through the final norm and lm_head) instead of its residual output, which the "
        "final norm rescales per token",
    )
    accept: Literal["model", "block"] = Field(
        "model",
        description="when a block's training is kept: `model` = only when the whole model's "
        "next-token KL against the full-precision model on the held-out samples goes down (they "
        "run through the rest of the network after each block); `block` = when the block's own "
        "held-out loss goes down",
    )
    targets: list[str] | None = Field(None, description="linears to train (default: scheme.targets)")
    offload: bool = Field(True, description="keep calibration activations on the CPU")

    def apply(self, ctx) -> None:
        spec = ctx.weight_spec("bisup")
        fp_model = ctx.fp_reference(self)
        targets = set(self.targets if self.targets is not None else ctx.scheme.targets) & set(
            ctx.scheme.targets
        )
        runner = LayerwiseRunner(ctx, self.batch_size, self.offload, fp_stream=True)
        if self.samples is not None:
            nb = -(-self.samples // self.batch_size)
            runner.inputs, runner.fp_inputs = runner.inputs[:nb], runner.fp_inputs[:nb]
        fp_layers = runner.adapter.layers(fp_model)
        report: dict[str, dict] = {}
        start = time.perf_counter()

        adapter = runner.adapter
        model_head = (adapter.final_norm(ctx.model), adapter.lm_head(ctx.model))
        head = model_head if self.head_loss else None
        layers = adapter.layers(ctx.model)
        hold = self._holdout(len(runner.inputs))
        fp_logp: list[torch.Tensor] = []
        if self.accept == "model" and hold:
            with torch.no_grad():  # the full-precision next-token distribution of each held-out sample
                for b in hold:
                    h = runner.fp_inputs[b].to(ctx.device)
                    for fl in fp_layers:
                        h = self._run_moved(runner, fl, h)
                    fp_logp.append(torch.log_softmax(head_logits(model_head, h), dim=-1).to(runner.store))
        kl_now: list[float] = []

        def model_kl(i: int, layer) -> float:
            """Held-out next-token KL (full precision -> quantized), layers < i as they stand now."""
            total = 0.0
            with torch.no_grad():
                for b, lp in zip(hold, fp_logp, strict=True):
                    h = runner.run_layer(layer, runner.inputs[b].to(ctx.device))
                    for later in list(layers)[i + 1 :]:
                        h = self._run_moved(runner, later, h)
                    lq = torch.log_softmax(head_logits(model_head, h), dim=-1)
                    lp = lp.to(lq.device)
                    total += float(next_token_kl(lp, lq))
            return total / len(hold)

        def train_layer(i: int, layer) -> None:
            last = head if i == len(fp_layers) - 1 else None
            judge = None
            if fp_logp:
                if not kl_now:
                    kl_now.append(model_kl(i, layer))
                judge = (kl_now[-1], lambda: model_kl(i, layer))
            rep = self._train_block(
                ctx, runner, layer, fp_layers[i].to(ctx.device), targets, spec, last, judge
            )
            if rep.get("kept") and judge is not None:
                kl_now.append(rep["model_kl_after"])
            report[f"layers.{i}"] = rep

        runner.run(train_layer, "bisup", fp_layers=fp_layers)
        seconds = time.perf_counter() - start
        ctx.record(
            "bisup",
            {
                "blocks": report,
                "solve_seconds": seconds,
                "trained_parameters": sum(r["trained_parameters"] for r in report.values()),
                "blocks_kept": sum(bool(r["kept"]) for r in report.values()),
                "model_kl": {"start": kl_now[0], "end": kl_now[-1]} if kl_now else None,
            },
        )
        logger.info("bisup: %d blocks in %.1fs", len(report), seconds)

    def _holdout(self, n: int) -> list[int]:
        """Indices of the held-out sample batches: the last ``holdout`` share, at least one."""
        if self.holdout <= 0 or n < 2:
            return []
        return list(range(n - min(n - 1, max(1, round(n * self.holdout))), n))

    @staticmethod
    def _run_moved(runner, layer, h: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` on the device (moved there and back when it lives elsewhere)."""
        home = next(layer.parameters()).device
        out = runner.run_layer(layer.to(runner.device), h)
        if home != runner.device:
            layer.to(home)
        return out

    def _train_block(self, ctx, runner, layer, fp_layer, targets, spec, head=None, judge=None) -> dict:
        """Train one decoder layer and fold the result into it.

        ``judge = (loss_now, loss_fn)``: after folding, keep the training only if ``loss_fn()`` (the
        model's held-out KL) is below ``loss_now``; otherwise the layer gets its starting point.
        """
        adapter, dev = runner.adapter, ctx.device
        with torch.no_grad():
            goal = [runner.run_layer(fp_layer, x).to(runner.store) for x in runner.fp_inputs]
        saved = copy.deepcopy(layer) if judge is not None else None  # before any wrapper goes in
        smooths: list[Smooth] = []
        wrappers: dict[str, BisupLinear] = {}
        norms = dict(zip(("qkv", "mlp"), (n for n, _ in adapter.norm_readers(layer)), strict=True))
        readers = dict(zip(("qkv", "mlp"), (r for _, r in adapter.norm_readers(layer)), strict=True))
        s_norm: dict[str, Smooth] = {}
        if self.smooth:
            for key, names in readers.items():
                if all(n in targets for n in names):  # 1/s in the norm reaches every reader
                    s_norm[key] = Smooth(norms[key].weight.shape[0], dev)
                    smooths.append(s_norm[key])
        s_o = None
        o = adapter.linear(layer, "o_proj")
        cfg = ctx.model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.smooth and {"v_proj", "o_proj"} <= targets:
            s_o = Smooth(hd, dev, repeat=o.in_features // hd)
            smooths.append(s_o)
        for name in adapter.linear_names():
            if name not in targets:
                continue
            lin = adapter.linear(layer, name)
            group = next((k for k, names in readers.items() if name in names), None)
            s_in = s_norm.get(group) if group else (s_o if name == "o_proj" else None)
            s_out = (
                SmoothView(s_o, lin.out_features // hd) if (name == "v_proj" and s_o is not None) else None
            )
            w_fp = adapter.linear(fp_layer, name).weight.data if self.start == "fp" else None
            wrappers[name] = BisupLinear(
                lin, spec, self.rank, s_in, s_out, divide_input=name != "o_proj", w_fp=w_fp
            ).to(dev)
            adapter.set_linear(layer, name, wrappers[name])
        params = [p for wr in wrappers.values() for p in (wr.A, wr.B) if p is not None]
        if self.clip:
            params += [wr.clip_logit for wr in wrappers.values()]
        params += [s.s for s in smooths]
        init = [p.detach().clone() for p in params]
        state = adapter.attention(layer).qtool
        state.ste = True  # the state's own KV quantization, with gradients through the rounding
        try:
            losses = self._optimize(runner, layer, goal, params, smooths, head)
        finally:
            state.ste = False
            for name, wr in wrappers.items():
                adapter.set_linear(layer, name, wr.lin)

        def fold() -> None:
            for wr in wrappers.values():
                wr.fold(ctx.scale_dtype)
            with torch.no_grad():
                for key, s in s_norm.items():
                    norms[key].weight.data = (norms[key].weight.data / s.value()).to(norms[key].weight.dtype)

        fold()
        losses["kept"] = losses["epoch_kept"] > 0
        if judge is not None:
            losses["model_kl_before"] = losses["model_kl_after"] = judge[0]
            if losses["kept"]:
                after = judge[1]()
                losses["model_kl_after"] = after
                if not after < judge[0]:  # the start point, folded the same way
                    losses["kept"], losses["model_kl_after"] = False, judge[0]
                    _restore(adapter, layer, saved)
                    with torch.no_grad():
                        for p, v in zip(params, init, strict=True):
                            p.copy_(v)
                    fold()
        return {
            **losses,
            "loss": "kl" if head is not None else self.loss,
            "trained_parameters": sum(p.numel() for p in params),
        }

    def _optimize(self, runner, layer, goal, params, smooths, head=None) -> dict:
        """Train ``params`` on the training samples, keeping the best on the held-out ones.

        Returns the block's output loss before and after over every sample, and over the held-out
        samples alone, and the epoch kept (0 = the starting point). ``head = (final_norm, lm_head)``:
        the loss is the KL divergence of the next-token distributions instead.
        """

        def block_loss(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            y, target = y.float(), target.float()
            if head is not None:
                with torch.no_grad():
                    lp_t = torch.log_softmax(head_logits(head, target), dim=-1)
                lp_y = torch.log_softmax(head_logits(head, y), dim=-1)
                return next_token_kl(lp_t, lp_y)
            if self.loss == "mse":
                return nn.functional.mse_loss(y, target)
            err = (y - target).pow(2).sum(-1)
            return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()

        def mean_loss(idx: list[int]) -> float | None:
            if not idx:
                return None  # no held-out samples (holdout 0, or a single sample)
            with torch.no_grad():
                errs = [
                    block_loss(
                        runner.run_layer(layer, runner.inputs[b].to(runner.device)), goal[b].to(runner.device)
                    )
                    for b in idx
                ]
            return float(sum(e.item() for e in errs) / len(errs))

        n = len(runner.inputs)
        hold = self._holdout(n)
        train = list(range(n - len(hold)))
        before_train, before_hold = mean_loss(train), mean_loss(hold)

        def overall(tr: float, ho: float) -> float:
            return (tr * len(train) + (ho * len(hold) if hold else 0.0)) / n

        out = {"loss_before": overall(before_train, before_hold), "holdout_before": before_hold}
        if not params:
            return {**out, "loss_after": out["loss_before"], "holdout_after": before_hold, "epoch_kept": 0}
        best = (before_hold, 0, [p.detach().clone() for p in params])
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        for epoch in range(1, self.epochs + 1):
            for b in torch.randperm(len(train), generator=gen).tolist():
                x, y = runner.inputs[train[b]].to(runner.device), goal[train[b]].to(runner.device)
                loss = block_loss(runner.run_layer(layer, x), y)
                if smooths and self.reg:
                    loss = loss + self.reg * sum(s.penalty() for s in smooths)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if hold:
                h = mean_loss(hold)
                if h < best[0]:
                    best = (h, epoch, [p.detach().clone() for p in params])
        if hold:
            with torch.no_grad():
                for p, v in zip(params, best[2], strict=True):
                    p.copy_(v)
            after_hold, kept = best[0], best[1]
        else:
            after_hold, kept = None, self.epochs
        after_train = mean_loss(train)
        return {
            **out,
            "loss_after": overall(after_train, after_hold if hold else 0.0),
            "holdout_after": after_hold,
            "epoch_kept": kept,
        }
