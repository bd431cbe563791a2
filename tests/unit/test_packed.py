"""The packed runtime linear (torch.ops.qtool) matches the fake-quant QLinear."""

from __future__ import annotations

import pytest
import torch

from qtool.models.packed import PackedLinear, packable
from qtool.models.qlinear import QLinear, QuantizedWeight
from qtool.quant.quantizer import QSpec, compute_qparams, quantize, sqnr_db


def _qlinear(out_f, in_f, wspec, act_spec=None, lowrank=0):
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f)
    lin = QLinear(w.clone(), torch.randn(out_f) * 0.1, act_spec)
    scale, zero = compute_qparams(w, wspec)
    lin.set_quantized(QuantizedWeight(quantize(w, scale, zero, wspec), scale, zero, wspec))
    if lowrank:
        lin.set_lowrank(torch.randn(out_f, lowrank) * 0.05, torch.randn(in_f, lowrank) * 0.05)
    return lin


@pytest.mark.parametrize(
    "wspec",
    [
        QSpec(4, True, "channel"),
        QSpec(4, True, "group", 64),
        QSpec(4, False, "group", 32),
        QSpec(4, False, "channel"),
    ],
)
@pytest.mark.parametrize("rows", [1, 7])
def test_packed_w4a16_matches_fake_quant(wspec, rows):
    lin = _qlinear(48, 192, wspec, lowrank=4)
    packed = PackedLinear(lin, torch.float32)
    x = torch.randn(2, rows, 192)
    assert sqnr_db(lin(x), packed(x)) > 60


def test_packed_w4a4_matches_fake_quant():
    act = QSpec(4, True, "token", clip_ratio=0.9)
    lin = _qlinear(40, 136, QSpec(4, True, "channel"), act)
    assert packable(lin)
    packed = PackedLinear(lin, torch.float32)
    x = torch.randn(3, 5, 136)
    assert sqnr_db(lin(x), packed(x)) > 40


def test_unpackable_layouts_are_left_alone():
    assert not packable(_qlinear(16, 64, QSpec(8, True, "channel")))
    assert not packable(_qlinear(16, 64, QSpec(4, True, "group", 32), QSpec(4, True, "token")))
