"""Packed runtime linears: checkpoints served through ``torch.ops.qtool`` kernels.

``PackedLinear`` keeps a quantized linear's int4 codes in the export layout
(``qtool.quant.packing``) and computes with the registered ops: ``int4_matmul`` for W4A16 and
``quantize_act_int4`` + ``w4a4_matmul`` for W4A4 (per-channel symmetric weights, per-token
activations). On a CUDA device with the ``qtool_cuda`` extension built the ops run the kernels;
elsewhere they run their pure-PyTorch references, which compute the same quantized values as
the fake-quant :class:`~qtool.models.qlinear.QLinear` (tests bound the difference by SQNR).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import qtool.ops  # noqa: F401  (registers torch.ops.qtool.*)
from qtool.models.prepare import iter_qlinears
from qtool.models.qlinear import QLinear
from qtool.ops.int4_matmul import int4_matmul
from qtool.ops.registry import backend_info
from qtool.ops.w4a4 import w4a4_linear
from qtool.quant.packing import pack_int4, pack_int4_dim0

logger = logging.getLogger("qtool")


def packable(lin: QLinear) -> bool:
    """Whether a QLinear has an int4 layout the ops serve (4-bit weights; A4 needs sym per-channel)."""
    qw = lin.qweight
    if qw is None or qw.spec.bits != 4 or qw.spec.granularity not in ("channel", "group"):
        return False
    if lin.act_spec is None:
        return True
    a = lin.act_spec
    if a.half_range:  # the kernels quantize activations with amax / 7
        return False
    return a.bits == 4 and a.granularity == "token" and qw.spec.symmetric and qw.spec.granularity == "channel"


class PackedLinear(nn.Module):
    def __init__(self, lin: QLinear, dtype: torch.dtype) -> None:
        super().__init__()
        qw = lin.qweight
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.group_size = qw.spec.group_size if qw.spec.granularity == "group" else -1
        self.register_buffer("w_packed", pack_int4(qw.codes))
        self.register_buffer("scales", qw.scale.to(dtype))
        zeros = None if qw.spec.symmetric else pack_int4_dim0(qw.zero)
        self.register_buffer("zeros", zeros)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
        self.input_transform = lin.input_transform
        self.act_clip = None if lin.act_spec is None else lin.act_spec.clip_ratio
        self.lora_U = None if lin.lora_U is None else lin.lora_U.to(dtype)
        self.lora_V = None if lin.lora_V is None else lin.lora_V.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_clip is None:
            y = int4_matmul(x, self.w_packed, self.scales, self.zeros, self.group_size)
            if self.lora_U is not None:
                y = y + (x @ self.lora_V) @ self.lora_U.t()
        else:
            y = w4a4_linear(x, self.w_packed, self.scales, self.act_clip, False, self.lora_U, self.lora_V)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kind = "W4A16" if self.act_clip is None else "W4A4"
        return f"{self.in_features}->{self.out_features}, {kind}, group={self.group_size}"


def pack_model(model: nn.Module) -> dict[str, object]:
    """Swap every packable QLinear for a PackedLinear; returns what ran and how many."""
    dtype = next(model.parameters()).dtype
    names = {id(m): n for n, m in model.named_modules()}
    swapped, skipped = 0, 0
    for _, _, lin in list(iter_qlinears(model)):
        if not packable(lin):
            skipped += 1
            continue
        parent_name, attr = names[id(lin)].rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, PackedLinear(lin, dtype).to(lin.weight.device))
        swapped += 1
    path, reason = backend_info()
    logger.info("packed linears: %d (skipped %d); ops backend: %s (%s)", swapped, skipped, path, reason)
    return {"packed": swapped, "skipped": skipped, "backend": path, "reason": reason}
