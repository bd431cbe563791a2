"""Autoregressive decoding with the quantized KV cache and the 16-bit prefix cache.

A manual decode loop (no ``transformers.generate``): the cache starts as the model's pivot cache
(IntactKV) or, with a system prompt and prompt mixed precision, as a 16-bit cache of the whole
system prompt (BiSup's horizontal part; the same :func:`~qtool.models.pivot.compute_prefix_cache`
as IntactKV-P). Every other token's K/V is quantized by qtool's attention when it is written to
the cache; with ``past_only`` a token attends to itself unquantized. This is exactly what the
perplexity path computes for the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from qtool.errors import QtoolError
from qtool.models.pivot import PivotCache, cache_kw, compute_prefix_cache


@dataclass
class GenerationResult:
    text: str
    new_token_ids: list[int]
    prompt_tokens: int
    prefix_tokens: int  # tokens whose K/V are held in 16 bits (pivot / system prompt)
    prefill_seconds: float
    decode_seconds: float
    tokens_per_second: float  # new tokens / (prefill + decode)
    decode_tokens_per_second: float  # tokens after the first / decode time
    stopped_at_eos: bool
    kv_cache: str = "16-bit (fake-quant values)"  # or "int4 packed"

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, prompt: str, system: str | None = None, chat: bool = True) -> tuple[list[int], int]:
    """Token ids of the prompt and how many leading ids are the system prompt.

    With a chat template (and ``chat``), the conversation ``[system], user`` with the generation
    prompt; else the raw text (``system`` then prepended as plain text).
    """
    if chat and getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, add_special_tokens=False).input_ids
        if system is None:
            return ids, 0
        sys_text = tokenizer.apply_chat_template(msgs[:1], tokenize=False)
        sys_ids = tokenizer(sys_text, add_special_tokens=False).input_ids
        if not full.startswith(sys_text) or ids[: len(sys_ids)] != sys_ids:
            ids = (
                sys_ids
                + tokenizer(
                    full[len(sys_text) :] if full.startswith(sys_text) else full, add_special_tokens=False
                ).input_ids
            )
        return ids, len(sys_ids)
    sys_ids = tokenizer(system, add_special_tokens=False).input_ids if system else []
    return sys_ids + tokenizer(prompt, add_special_tokens=False).input_ids, len(sys_ids)


def prefix_cache_for(
    model, ids: list[int], system_len: int, mixed_precision: bool, fp_model=None
) -> PivotCache | None:
    """The 16-bit prefix for ``ids``: the system prompt (prompt mixed precision) and/or the pivot.

    The system prompt's K/V come from ``fp_model`` when given (IntactKV-P), else from ``model``
    itself with KV quantization off (BiSup). The model's pivot is reused when it is a prefix.
    """
    pivot: PivotCache | None = getattr(model, "qtool_pivot", None)
    if pivot is not None and ids[: len(pivot)] != pivot.token_ids:
        pivot = None
    if mixed_precision and system_len > (len(pivot) if pivot is not None else 0):
        return compute_prefix_cache(fp_model if fp_model is not None else model, ids[:system_len], base=pivot)
    return pivot


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(-1) - p < top_p
        probs = torch.zeros_like(probs).scatter(-1, idx[keep], p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


@torch.no_grad()
def decode(
    model,
    ids: list[int],
    prefix: PivotCache | None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: set[int] | None = None,
    seed: int = 0,
    packed_kv: bool = False,
) -> tuple[list[int], float, float, bool]:
    """Generate after ``ids`` (whose first ``len(prefix)`` tokens are the prefix cache).

    ``packed_kv``: store the KV cache as packed int4 (:class:`~qtool.models.kv4_runtime.PackedKVCache`)
    instead of dequantized 16-bit values; the tokens are the same up to float16 scale rounding.
    Returns ``(new ids, prefill seconds, decode seconds, stopped at EOS)``.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_pre = len(prefix) if prefix is not None else 0
    if prefix is not None and ids[:n_pre] != list(prefix.token_ids):
        raise QtoolError("internal: the prefix cache does not match the prompt's first tokens")
    rest = ids[n_pre:]
    if not rest:
        raise QtoolError("the prompt is empty after the 16-bit prefix; give a prompt")
    if packed_kv:
        from qtool.models.kv4_runtime import PackedKVCache

        cache = PackedKVCache(1, len(rest) + max_new_tokens, prefix)
    else:
        cache = prefix.as_cache(1, dtype, device) if prefix is not None else DynamicCache()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    logits = model(input_ids=torch.tensor([rest], device=device), **cache_kw(cache), use_cache=True).logits[
        0, -1
    ]
    prefill = time.perf_counter() - t0
    out: list[int] = []
    eos = False
    t1 = time.perf_counter()
    for _ in range(max_new_tokens):
        tok = _sample(logits.cpu(), temperature, top_p, gen)
        out.append(tok)
        if eos_ids and tok in eos_ids:
            eos = True
            break
        if len(out) == max_new_tokens:
            break
        logits = model(
            input_ids=torch.tensor([[tok]], device=device), **cache_kw(cache), use_cache=True
        ).logits[0, -1]
    return out, prefill, time.perf_counter() - t1, eos


def generate(
    model,
    tokenizer,
    prompt: str,
    system: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mixed_precision: bool = True,
    chat: bool = True,
    fp_model=None,
    packed_kv: bool = False,
) -> GenerationResult:
    """Decode a reply to ``prompt`` (greedy when ``temperature`` is 0, else top-p sampling).

    ``packed_kv``: keep the KV cache as packed int4 (see :func:`decode`).
    """
    if max_new_tokens < 1:
        raise QtoolError("--max-new-tokens must be at least 1")
    if not 0.0 < top_p <= 1.0:
        raise QtoolError(f"--top-p must be in (0, 1], got {top_p}")
    ids, sys_len = prompt_ids(tokenizer, prompt, system, chat)
    pivot = getattr(model, "qtool_pivot", None)
    if pivot is not None and ids[: len(pivot)] != pivot.token_ids:
        ids, sys_len = list(pivot.token_ids) + ids, sys_len + len(pivot)  # as `eval --prefix`
    prefix = prefix_cache_for(model, ids, sys_len, mixed_precision, fp_model)
    eos = {
        i
        for i in [tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)]
        if isinstance(i, int)
    }
    new, prefill, dec, stopped = decode(
        model, ids, prefix, max_new_tokens, temperature, top_p, eos, seed, packed_kv
    )
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        new_token_ids=new,
        prompt_tokens=len(ids),
        prefix_tokens=len(prefix) if prefix is not None else 0,
        prefill_seconds=prefill,
        decode_seconds=dec,
        tokens_per_second=len(new) / (prefill + dec),
        decode_tokens_per_second=(len(new) - 1) / dec if len(new) > 1 and dec > 0 else 0.0,
        stopped_at_eos=stopped,
        kv_cache="int4 packed" if packed_kv else "16-bit (fake-quant values)",
    )


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], int, list[bool]]:
    """A rendered conversation: ``(ids, system-prompt length, mask of the assistant tokens)``.

    The assistant tokens are each assistant message's content and end-of-turn token (not the
    role header), found by rendering the conversation one message at a time.
    """

    def ids_of(msgs, gen=False):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""
        return tokenizer(text, add_special_tokens=False).input_ids

    ids = ids_of(messages)
    mask = [False] * len(ids)
    sys_len = len(ids_of(messages[:1])) if messages and messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(ids_of(messages[:i], gen=True)), len(ids_of(messages[: i + 1]))
        if ids_of(messages[: i + 1]) != ids[:end]:
            raise QtoolError("the chat template does not render conversations prefix-consistently")
        for j in range(start, end):
            mask[j] = True
    return ids, sys_len, mask
