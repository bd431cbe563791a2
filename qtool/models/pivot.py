"""Prefix caches: a 16-bit K/V prefix (IntactKV pivot, system prompt) in front of new tokens.

A :class:`PivotCache` holds the prefix token ids and, for every decoder layer, the K/V those
tokens produce in the full-precision model (in the rotated basis when the model is rotated).
The quantized model attends to it as an ordinary cache, so the prefix K/V are never quantized;
only new tokens' K/V are (see ``qtool.models.attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class PivotCache:
    token_ids: list[int]
    keys: list[torch.Tensor]  # per layer [1, H_kv, P, D]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.token_ids)

    def as_cache(self, batch: int, dtype: torch.dtype, device) -> DynamicCache:
        """A fresh DynamicCache holding the prefix, expanded to ``batch`` sequences."""
        data = [
            (k.to(device, dtype).expand(batch, -1, -1, -1).contiguous(), v.to(device, dtype).expand(batch, -1, -1, -1).contiguous())
            for k, v in zip(self.keys, self.values)
        ]
        return DynamicCache(ddp_cache_data=data)


def forward_with_prefix(model, input_ids: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """Logits of ``input_ids`` positions ``[B, L, V]`` with ``prefix`` tokens in front, unscored.

    Uses the model's pivot cache when it holds exactly these prefix tokens, else runs the prefix
    through the model together with the input.
    """
    pivot: PivotCache | None = getattr(model, "qtool_pivot", None)
    if prefix and pivot is not None and pivot.token_ids == list(prefix):
        dtype = next(model.parameters()).dtype
        cache = pivot.as_cache(input_ids.shape[0], dtype, input_ids.device)
        return model(input_ids=input_ids, cache=cache, use_cache=True).logits
    if not prefix:
        return model(input_ids=input_ids, use_cache=False).logits
    pre = torch.tensor(prefix, dtype=input_ids.dtype, device=input_ids.device).expand(input_ids.shape[0], -1)
    logits = model(input_ids=torch.cat([pre, input_ids], dim=1), use_cache=False).logits
    return logits[:, len(prefix) :]
