"""The fake-quant linear: the simulation path every recipe step and every loader shares.

``QLinear`` computes ``y = W_hat @ Q_a(T(x)) + b + U (V^T T(x))`` where

* ``T`` is an optional online transform of the input (the Hadamard before ``down_proj`` or the
  head-mixing rotation before ``o_proj`` of a rotated model);
* ``Q_a`` is dynamic per-token activation quantization (``act_spec``; None = 16-bit);
* ``W_hat`` is the dequantized weight; its integer codes, scales and zero points are kept in
  ``self.qweight`` so export writes exactly what the simulation used;
* ``U, V`` is the optional full-precision low-rank correction acting on the unquantized input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qtool.quant.quantizer import QSpec, QuantizedWeight, fake_quant

__all__ = ["QLinear", "QuantizedWeight"]  # QuantizedWeight lives in qtool.quant.quantizer


class QLinear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        act_spec: QSpec | None = None,
        input_transform: nn.Module | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.act_spec = act_spec
        self.input_transform = input_transform
        self.qweight: QuantizedWeight | None = None
        self.weight_spec: QSpec | None = None  # set when the codes were dropped after dequantizing
        self.lora_U: torch.Tensor | None = None
        self.lora_V: torch.Tensor | None = None
        self.name = name
        self.act_quant_enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_spec: QSpec | None, name: str = "") -> QLinear:
        bias = None if linear.bias is None else linear.bias.data
        return cls(linear.weight.data, bias, act_spec, name=name)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def set_quantized(self, qw: QuantizedWeight) -> None:
        """Install quantized weights; the float weight becomes their exact dequantization."""
        self.qweight = qw
        self.weight.data = qw.dequantize().to(self.weight.dtype)

    def set_lowrank(self, U: torch.Tensor | None, V: torch.Tensor | None) -> None:
        """Install the correction ``U`` ``[out, k]``, ``V`` ``[in, k]`` in one canonical layout.

        Both factors are stored row-major (contiguous) whatever layout they arrive in: the
        solver's ``V`` comes out of LAPACK column-major while a reloaded adapter is row-major, and
        a matmul over differently strided operands may sum in a different order. One layout makes
        the in-memory and the reloaded model compute bit-identically.
        """
        self.lora_U = None if U is None else U.contiguous()
        self.lora_V = None if V is None else V.contiguous()

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input after the online transform, before activation quantization."""
        return x if self.input_transform is None else self.input_transform(x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is None or not self.act_quant_enabled:
            return x
        return fake_quant(x, self.act_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        y = F.linear(self.quantize_input(x), self.weight, self.bias)
        if self.lora_U is not None:
            y = y + F.linear(F.linear(x, self.lora_V.t().to(x.dtype)), self.lora_U.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        spec = self.qweight.spec if self.qweight is not None else self.weight_spec
        w = f"W{spec.bits}" if spec is not None else "W16"
        a = f"A{self.act_spec.bits}" if self.act_spec is not None else "A16"
        lr = f", lowrank={self.lora_U.shape[1]}" if self.lora_U is not None else ""
        t = f", transform={type(self.input_transform).__name__}" if self.input_transform is not None else ""
        return f"{self.in_features}->{self.out_features}, {w}{a}{lr}{t}"
