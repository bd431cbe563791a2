"""Run-time side of WKVQuant's KV smoothing: re-apply a recorded ``kv_smooth`` entry to a model.

The entry (``qtool.json`` ``runtime.kv_smooth``) holds per layer ``k_scale``, ``v_scale``,
``k_shift``, ``v_shift`` and whether the scales are folded into the weights (``fold_k``,
``fold_v``). Shifts, and scales that are not folded, live in the attention's
``AttnQuantState``; the fold math is :func:`qtool.algorithms.kv_smooth.fold_linear`.
"""

from __future__ import annotations

import torch

from qtool.algorithms.kv_smooth import fold_factors, fold_linear
from qtool.models.adapters import get_adapter

FOLDED = ("q_proj", "k_proj", "v_proj", "o_proj")


@torch.no_grad()
def apply_layer_smoothing(layer, adapter, entry: dict, fold_k: bool, fold_v: bool, fold: bool) -> None:
    """Fold the scales of one layer's smoothing (when ``fold``) and set its run-time state."""
    st = adapter.attention(layer).qtool
    sk = torch.tensor(entry["k_scale"], dtype=torch.float64)
    sv = torch.tensor(entry["v_scale"], dtype=torch.float64)
    groups = adapter.attention(layer).config.num_attention_heads // sk.shape[0]
    if fold:
        for name in FOLDED:
            if fold_factors(name, sk, sv, groups, fold_k, fold_v) == (None, None):
                continue  # not scaled: no float64 round trip of its weight
            lin = adapter.linear(layer, name)
            b = None if lin.bias is None else lin.bias.data.double()
            w, b = fold_linear(name, lin.weight.data.double(), b, sk, sv, groups, fold_k, fold_v)
            lin.weight.data = w.to(lin.weight.dtype)
            if b is not None:
                lin.bias.data = b.to(lin.bias.dtype)
    dev = adapter.linear(layer, "k_proj").weight.device
    st.k_shift = torch.tensor(entry["k_shift"], dtype=torch.float32, device=dev)
    st.v_shift = torch.tensor(entry["v_shift"], dtype=torch.float32, device=dev)
    st.k_scale = None if fold_k else sk.float().to(dev)
    st.v_scale = None if fold_v else sv.float().to(dev)


def apply_smoothing(model, entry: dict, fold: bool) -> None:
    """Apply a recorded ``kv_smooth`` entry; ``fold=False`` when the weights already carry it."""
    adapter = get_adapter(model.config)
    for layer, e in zip(adapter.layers(model), entry["layers"], strict=True):
        apply_layer_smoothing(layer, adapter, e, entry["fold_k"], entry["fold_v"], fold)
