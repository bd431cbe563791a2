"""BiSup's block-wise quantization-aware training, as modules and losses (METHODS.md section 5).

Tensor math only: the training view of a quantized linear (:class:`BisupLinear`: learnable
per-group clip, soft-constrained smoothing, a low-rank term, straight-through rounding) and its
fold back into plain quantized weights, the smoothing factors, and the next-token losses. The
``bisup`` step (:mod:`qtool.steps.bisup`) orchestrates them block by block. A wrapped linear is
anything with qtool's ``QLinear`` interface (``weight``, ``bias``, ``qweight``, ``act_spec``,
``prepare_input``, ``lora_U``/``lora_V``, ``set_quantized``, ``set_lowrank``).
"""

from __future__ import annotations

import torch
from torch import nn

from qtool.quant.quantizer import (
    QuantizedWeight,
    compute_qparams,
    expand_params,
    fake_quant_ste,
    mse_clip_search,
    quantize,
)

CLIP_HI = 2.0  # learned clip ratio in (0, CLIP_HI): above 1 keeps a grid wider than the weight's max


class BisupLinear(nn.Module):
    """Training view of a QLinear: ``fq(x / s_in) @ fq((W + A B) * s_in / s_out)^T + U V^T x``.

    ``s_in`` / ``s_out`` are shared ``Smooth`` parameters (or None); ``s_out`` divides output rows
    (v_proj -> o_proj). ``divide_input``: the wrapper divides its input by ``s_in`` itself (the
    producer is a norm, folded afterwards); False when the producer already does (o_proj reads
    v_proj's rows divided by ``s``). Activation quantization uses the straight-through estimator.
    """

    def __init__(
        self,
        lin,
        spec,
        rank: int,
        s_in=None,
        s_out=None,
        divide_input: bool = True,
        w_fp: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lin, self.spec, self.s_in, self.s_out = lin, spec, s_in, s_out
        self.divide_input = divide_input
        qw = lin.qweight
        # the weight under the quantizer: the full-precision one (``w_fp``) or the current one
        # (GPTQ's dequantized weight when a weight step ran before)
        W0 = (lin.weight.data if w_fp is None else w_fp).float().to(lin.weight.device)
        self.register_buffer("W0", W0)
        m, d = W0.shape
        base, _ = compute_qparams(W0, spec)
        offset = None
        if qw is not None:
            # reproduce the existing grid at the start: GPTQ's scale can exceed max|W| / qmax
            # (rows whose codes never reach the edge), hence ratios above 1
            clip = qw.scale.to(base) / base
            if w_fp is not None:
                # GPTQ's rounding decisions, kept as a fixed offset in grid steps: at step 0 the
                # full-precision weight quantizes to GPTQ's exact codes; training then moves the
                # full-precision weight (clip, smoothing, A B) under the quantizer
                scale = expand_params(qw.scale.to(W0), W0, spec)
                steps = qw.codes.to(W0) - expand_params(qw.zero.to(W0), W0, spec)
                offset = steps - W0 / scale
        else:
            clip = mse_clip_search(W0, spec)
        self.register_buffer("offset", offset)
        clip = clip.clamp(0.05, 0.99 * CLIP_HI) / CLIP_HI
        self.clip_logit = nn.Parameter(torch.log(clip / (1 - clip)))
        g = torch.Generator().manual_seed(m * 7919 + d)
        self.A = nn.Parameter(torch.zeros(m, rank, device=W0.device)) if rank else None
        self.B = nn.Parameter((torch.randn(rank, d, generator=g) / d**0.5).to(W0.device)) if rank else None

    def effective_weight(self) -> torch.Tensor:
        W = self.W0 if self.A is None else self.W0 + self.A @ self.B
        if self.s_in is not None:
            W = W * self.s_in.value()[None, :]
        if self.s_out is not None:
            W = W / self.s_out.value()[:, None]
        return W

    def clip(self) -> torch.Tensor:
        return CLIP_HI * torch.sigmoid(self.clip_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.lin
        xt = lin.prepare_input(x)
        xs = xt / self.s_in.value().to(xt.dtype) if (self.s_in is not None and self.divide_input) else xt
        xs_unq = xs
        if lin.act_spec is not None and lin.act_quant_enabled:
            xs = fake_quant_ste(xs, lin.act_spec)
        w = fake_quant_ste(self.effective_weight(), self.spec, clip=self.clip(), offset=self.offset).to(
            x.dtype
        )
        bias = lin.bias
        if bias is not None and self.s_out is not None:
            bias = bias / self.s_out.value().to(bias.dtype)
        y = nn.functional.linear(xs, w, bias)
        if lin.lora_U is not None:  # the correction reads the unsmoothed input: V rows scaled by s
            V = lin.lora_V if self.s_in is None else lin.lora_V * self.s_in.value()[:, None]
            U = lin.lora_U if self.s_out is None else lin.lora_U / self.s_out.value()[:, None]
            y = y + nn.functional.linear(nn.functional.linear(xs_unq, V.to(x.dtype).t()), U.to(x.dtype))
        return y

    @torch.no_grad()
    def fold(self, scale_dtype) -> None:
        """Write the trained parameters back into the QLinear as plain quantized weights."""
        lin = self.lin
        W = self.effective_weight()
        scale, zero = compute_qparams(W, self.spec, self.clip())
        scale = scale.to(scale_dtype).float()
        codes = quantize(W, scale, zero, self.spec, offset=self.offset)
        lin.set_quantized(QuantizedWeight(codes, scale, zero, self.spec))
        if self.s_out is not None:
            so = self.s_out.value()
            if lin.bias is not None:
                lin.bias.data = (lin.bias.data / so).to(lin.bias.dtype)
            if lin.lora_U is not None:
                lin.set_lowrank((lin.lora_U / so[:, None]).to(lin.lora_U.dtype), lin.lora_V)
        if self.s_in is not None and lin.lora_V is not None:
            lin.set_lowrank(lin.lora_U, (lin.lora_V * self.s_in.value()[:, None]).to(lin.lora_V.dtype))


class Smooth(nn.Module):
    """Positive per-channel factors, ``repeat`` times tiled (v -> o: one per head_dim channel)."""

    def __init__(self, n: int, device, repeat: int = 1) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(n, device=device))
        self.repeat = repeat

    def value(self, repeat: int | None = None) -> torch.Tensor:
        return self.s.clamp(min=1e-2).repeat(self.repeat if repeat is None else repeat)

    def penalty(self) -> torch.Tensor:
        return (self.s - 1.0).pow(2).sum()


class SmoothView(nn.Module):
    """``s_out`` view of a Smooth tiled for the v_proj rows (num_kv_heads copies)."""

    def __init__(self, smooth: Smooth, repeat: int) -> None:
        super().__init__()
        self.smooth, self.repeat = smooth, repeat

    def value(self) -> torch.Tensor:
        return self.smooth.value(self.repeat)


def head_logits(head, h: torch.Tensor) -> torch.Tensor:
    """Next-token logits of residual-stream states ``h`` through ``head = (final_norm, lm_head)``
    (RMSNorm written out so no gradient reaches the frozen head)."""
    norm, lm = head
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    h = h.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.detach().float().to(h.device)
    bias = None if lm.bias is None else lm.bias.detach().float().to(h.device)
    return nn.functional.linear(h, lm.weight.detach().float().to(h.device), bias)


def next_token_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(ref || q) between next-token log-distributions ``[..., vocab]``."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
