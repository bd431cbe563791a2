"""WikiText-2 perplexity by the protocol the papers use (METHODS.md section 0).

Rows of the test split joined with ``"\\n\\n"``, tokenized once as one string (the tokenizer's
own special tokens, so a Llama tokenizer puts one BOS at the very start only), non-overlapping
windows of ``seq_len`` tokens with the tail dropped, each window an independent forward pass,
``ppl = exp(mean over windows of the mean next-token cross-entropy)``.

``prefix`` puts the same tokens in front of every window (``bos``, or a text) without scoring
them, so that rows with and without an IntactKV pivot score exactly the same tokens. When the
model carries a pivot cache (``model.qtool_pivot``) and the prefix matches it, the prefix is fed
as that 16-bit cache instead of being recomputed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from qtool.data.datasets import load_rows
from qtool.errors import QtoolError
from qtool.log import track


@dataclass
class PPLResult:
    dataset: str
    ppl: float
    seq_len: int
    windows: int
    total_windows: int
    tokens_scored: int
    prefix: str
    nll_per_window: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def eval_token_ids(tokenizer, dataset: str = "wikitext2", split: str = "test") -> torch.Tensor:
    text = "\n\n".join(load_rows(dataset, split))
    return tokenizer(text, return_tensors="pt").input_ids[0]


def prefix_ids(tokenizer, prefix: str) -> list[int]:
    """Token ids of a ``--prefix`` value: ``none``, ``bos`` or literal text."""
    if prefix in ("none", "", None):
        return []
    if prefix == "bos":
        bos = tokenizer.bos_token_id
        if bos is None:
            raise QtoolError("--prefix bos: this tokenizer has no BOS token; use --prefix none or a text")
        return [bos]
    return tokenizer(prefix, add_special_tokens=False).input_ids


def window_nll(model, windows: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """Mean next-token NLL of each window ``[B, L]`` (positions 1..L-1), with an unscored prefix."""
    from qtool.models.pivot import forward_with_prefix

    logits = forward_with_prefix(model, windows, prefix)  # [B, L, V] logits of the window positions
    shift = logits[:, :-1].float()
    target = windows[:, 1:].to(shift.device)
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(windows.shape[0], -1).mean(dim=1).cpu()


def max_positions(config) -> int | None:
    """The longest sequence a model's position embeddings cover (``max_position_embeddings``)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_seq_len(seq_len: int, limit_positions: int | None, prefix_len: int = 0) -> None:
    """Refuse a window (plus its unscored prefix) longer than the model's positions, before any work."""
    if seq_len < 2:
        raise QtoolError("--seq-len must be at least 2")
    if limit_positions is not None and seq_len + prefix_len > limit_positions:
        with_prefix = f" plus the {prefix_len}-token prefix" if prefix_len else ""
        raise QtoolError(
            f"--seq-len {seq_len}{with_prefix} is longer than the model's max_position_embeddings "
            f"({limit_positions}); use --seq-len {limit_positions - prefix_len} or less"
        )


def eval_windows(
    tokenizer, dataset: str = "wikitext2", seq_len: int = 2048, limit: int | None = None, split: str = "test"
) -> tuple[torch.Tensor, int]:
    """The first ``limit`` (all when None) non-overlapping windows ``[n, seq_len]`` and the total count.

    A ``limit`` above the number of windows is refused with that number (checked before any model
    work: only the tokenizer is needed).
    """
    if seq_len < 2:
        raise QtoolError("--seq-len must be at least 2")
    if limit is not None and limit < 1:
        raise QtoolError("--limit must be at least 1")
    ids = eval_token_ids(tokenizer, dataset, split)
    total = ids.numel() // seq_len
    if total == 0:
        raise QtoolError(f"{dataset}/{split} has {ids.numel()} tokens, fewer than one {seq_len}-token window")
    if limit is not None and limit > total:
        raise QtoolError(
            f"--limit {limit} is more than the {total} windows of {seq_len} tokens in {dataset} ({split}, "
            f"{ids.numel()} tokens); use --limit {total} or less, or leave --limit out for all of them"
        )
    n = total if limit is None else limit
    return ids[: total * seq_len].view(total, seq_len)[:n], total


@torch.no_grad()
def perplexity_of_windows(
    model,
    windows: torch.Tensor,
    total_windows: int,
    dataset: str,
    prefix_tokens: list[int],
    prefix: str = "none",
    batch_size: int = 1,
) -> PPLResult:
    """Perplexity of ``model`` on prepared ``windows`` (:func:`eval_windows`), each after ``prefix_tokens``."""
    n, seq_len = windows.shape
    check_seq_len(seq_len, max_positions(getattr(model, "config", None)), len(prefix_tokens))
    device = next(model.parameters()).device
    start = time.perf_counter()
    nlls: list[float] = []
    batches = [windows[i : i + batch_size] for i in range(0, n, batch_size)]
    for batch in track(batches, f"ppl {dataset} ({n} x {seq_len})"):
        nlls.extend(window_nll(model, batch.to(device), prefix_tokens).tolist())
    ppl = math.exp(sum(nlls) / len(nlls))
    return PPLResult(
        dataset=dataset,
        ppl=ppl,
        seq_len=seq_len,
        windows=n,
        total_windows=total_windows,
        tokens_scored=n * (seq_len - 1),
        prefix=prefix or "none",
        nll_per_window=nlls,
        seconds=time.perf_counter() - start,
    )


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seq_len: int = 2048,
    limit: int | None = None,
    batch_size: int = 1,
    prefix: str = "none",
    split: str = "test",
) -> PPLResult:
    pre = prefix_ids(tokenizer, prefix)
    check_seq_len(seq_len, max_positions(getattr(model, "config", None)), len(pre))
    windows, total = eval_windows(tokenizer, dataset, seq_len, limit, split)
    return perplexity_of_windows(model, windows, total, dataset, pre, prefix, batch_size)
