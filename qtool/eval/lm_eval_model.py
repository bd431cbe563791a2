"""qtool's in-memory model as an lm-eval-harness ``LM``: tasks run on exactly what qtool simulates.

The model is the one :func:`qtool.api.load` returns (a checkpoint rebuilt by the loader, a recipe
quantized in memory, or an unquantized model), so weight, activation and KV fake-quantization,
the online rotations, low-rank adapters and the 16-bit pivot cache are all in the loop. Every
sequence is one forward pass of its own (batch 1: the quantized attention path has no padding);
when the model carries a pivot cache (IntactKV, ``model.qtool_pivot``) it is the 16-bit prefix of
every sequence, as in ``qtool generate`` and ``qtool eval --prefix``: a sequence that starts with
the pivot's tokens attends to the cache in their place, any other gets the pivot in front.

Tokenization and truncation follow lm-eval's own Hugging Face model (``HFLM``) so that the same
model scores the same through either (tested). This module imports ``lm_eval`` at import time:
import it only through :mod:`qtool.eval.tasks`, which checks that the optional extra is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from qtool.errors import QtoolError
from qtool.eval.perplexity import max_positions
from qtool.log import track


def _progress(items: list, description: str, disable: bool = False, chunks: int = 20):
    """Iterate ``items`` with qtool's progress in at most ``chunks`` steps (a CI log gets a line per
    step, not one per request: a task sends thousands)."""
    if disable or not items:
        yield from items
        return
    size = -(-len(items) // chunks)
    parts = [items[i : i + size] for i in range(0, len(items), size)]
    for part in track(parts, f"{description} ({len(items)})"):
        yield from part


class QtoolLM(TemplateLM):
    """lm-eval ``LM`` over a qtool model and its tokenizer: ``loglikelihood`` and ``loglikelihood_rolling``."""

    backend = "causal"

    def __init__(self, model, tokenizer, max_length: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pivot = getattr(model, "qtool_pivot", None)
        positions = max_length or max_positions(getattr(model, "config", None)) or 2048
        # a pivot put in front of a sequence takes positions too
        self._max_length = positions - (len(self.pivot) if self.pivot is not None else 0)
        self._pivot_logp: torch.Tensor | None = None
        self.calls = 0  # forward passes run (tests check the model is really called)

    # --- what lm-eval's TemplateLM needs --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False  # the text already carries its BOS
        return self.tokenizer.encode(string, **kw)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens, **kwargs)

    # --- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, tokens: list[int]) -> torch.Tensor:
        """Log-probabilities ``[len(tokens), vocab]`` (float32) of the next token after each position."""
        from qtool.models.pivot import forward_with_prefix

        prefix: list[int] = list(self.pivot.token_ids) if self.pivot is not None else []
        head = 0
        if prefix and tokens[: len(prefix)] == prefix and len(tokens) > len(prefix):
            tokens, head = tokens[len(prefix) :], len(prefix)  # these positions are the pivot cache
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logp = F.log_softmax(forward_with_prefix(self.model, ids, prefix)[0].float(), dim=-1)
        self.calls += 1
        if head:
            logp = torch.cat([self._pivot_logprobs(), logp])
        return logp

    @torch.no_grad()
    def _pivot_logprobs(self) -> torch.Tensor:
        """The next-token log-probabilities at the pivot's own positions (scored only when a
        continuation starts right after it, e.g. an empty context): the model run on the pivot
        tokens alone, once (causal: they depend on nothing else)."""
        if self._pivot_logp is None:
            ids = torch.tensor([self.pivot.token_ids], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
            self._pivot_logp = F.log_softmax(logits, dim=-1)
        return self._pivot_logp

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        out = []
        for key, context_enc, continuation_enc in _progress(requests, "lm-eval requests", disable_tqdm):
            if not context_enc or not continuation_enc:
                raise ValueError("lm-eval sent an empty context or continuation")
            # as HFLM: truncate from the left to max_length + 1 tokens, drop the last one
            inp = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            n = len(continuation_enc)
            logp = self._logprobs(inp)[-n:]
            cont = torch.tensor(continuation_enc, device=logp.device)
            greedy = bool((logp.argmax(dim=-1) == cont).all())
            out.append((float(logp.gather(1, cont[:, None]).sum()), greedy))
            self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for string in _progress([r.args[0] for r in requests], "lm-eval rolling requests", disable_tqdm):
            windows = [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(s for s, _ in scored)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise QtoolError(
            "qtool eval --tasks runs log-likelihood tasks (multiple choice, perplexity) only; this task "
            "generates text (output_type generate_until), which qtool's lm-eval model does not do"
        )
