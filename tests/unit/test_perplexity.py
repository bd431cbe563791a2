"""Perplexity protocol: joined rows tokenized once, non-overlapping windows, exp(mean window NLL)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtool.data.datasets import load_rows
from qtool.errors import QtoolError
from qtool.eval.perplexity import perplexity

SEQ = 64


@pytest.fixture(scope="module")
def model_and_tok(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 25 windows of 64 tokens of WikiText-2 test text as a local .txt file."""
    rows = load_rows("wikitext2", "test")[:40]
    path = tmp_path_factory.mktemp("ppl") / "wiki.txt"
    path.write_text("\n".join(r.rstrip("\n") for r in rows) + "\n")
    return path


def hand_ppl(model, tok, path, seq_len, limit=None, prefix=()):
    """The protocol written out by hand, with plain logits and cross-entropy."""
    rows = path.read_text().splitlines()
    ids = tok("\n\n".join(rows), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if limit is not None:
        n = min(n, limit)
    nlls = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seq_len : (i + 1) * seq_len]
            inp = torch.cat([torch.tensor(list(prefix), dtype=w.dtype), w])[None]
            logits = model(inp).logits[0, len(prefix) :].float()
            nlls.append(float(F.cross_entropy(logits[:-1], w[1:])))
    return math.exp(sum(nlls) / len(nlls)), n, ids.numel() // seq_len


class UniformLM(nn.Module):
    """A 'model' whose logits are all zero: its perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab) * self.dummy
        return type("Out", (), {"logits": logits})()


def test_known_answer_uniform_model(model_and_tok, text_file):
    _, tok = model_and_tok
    res = perplexity(UniformLM(len(tok)), tok, str(text_file), seq_len=SEQ, limit=3)
    assert res.ppl == pytest.approx(len(tok), rel=1e-6)
    assert res.windows == 3 and res.tokens_scored == 3 * (SEQ - 1)


def test_matches_hand_computation(model_and_tok, text_file):
    model, tok = model_and_tok
    res = perplexity(model, tok, str(text_file), seq_len=SEQ)
    ref, n, total = hand_ppl(model, tok, text_file, SEQ)
    assert res.ppl == pytest.approx(ref, rel=1e-6)
    assert res.windows == res.total_windows == n == total
    assert n >= 20
    assert res.tokens_scored == n * (SEQ - 1)
    assert len(res.nll_per_window) == n
    assert res.ppl == pytest.approx(math.exp(sum(res.nll_per_window) / n), rel=1e-12)
    # a random model is near uniform: ppl is of the order of the vocabulary size
    assert 0.2 * len(tok) < res.ppl < 5 * len(tok)
    assert res.prefix == "none" and res.seq_len == SEQ and res.dataset == str(text_file)


def test_limit_takes_the_first_windows(model_and_tok, text_file):
    model, tok = model_and_tok
    full = perplexity(model, tok, str(text_file), seq_len=SEQ)
    res = perplexity(model, tok, str(text_file), seq_len=SEQ, limit=3)
    ref, n, total = hand_ppl(model, tok, text_file, SEQ, limit=3)
    assert res.ppl == pytest.approx(ref, rel=1e-6)
    assert (res.windows, res.total_windows) == (3, total)
    assert res.nll_per_window == pytest.approx(full.nll_per_window[:3], rel=1e-6)
    with pytest.raises(QtoolError, match=rf"--limit 10000 is more than the {total} windows of {SEQ} tokens"):
        perplexity(model, tok, str(text_file), seq_len=SEQ, limit=10_000)
    assert perplexity(model, tok, str(text_file), seq_len=SEQ, limit=total).windows == total


def test_batch_size_does_not_change_the_result(model_and_tok, text_file):
    model, tok = model_and_tok
    one = perplexity(model, tok, str(text_file), seq_len=SEQ, limit=5, batch_size=1)
    two = perplexity(model, tok, str(text_file), seq_len=SEQ, limit=5, batch_size=2)  # last batch of 1
    assert two.windows == 5
    assert two.nll_per_window == pytest.approx(one.nll_per_window, rel=1e-5)
    assert two.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_prefix_bos_scores_the_same_tokens(model_and_tok, text_file):
    model, tok = model_and_tok
    none = perplexity(model, tok, str(text_file), seq_len=SEQ, limit=4)
    bos = perplexity(model, tok, str(text_file), seq_len=SEQ, limit=4, prefix="bos")
    assert bos.prefix == "bos"
    assert bos.tokens_scored == none.tokens_scored and bos.windows == none.windows
    ref, _, _ = hand_ppl(model, tok, text_file, SEQ, limit=4, prefix=(tok.bos_token_id,))
    assert bos.ppl == pytest.approx(ref, rel=1e-6)
    assert bos.ppl != pytest.approx(none.ppl, rel=1e-9)  # the prefix is really fed
    text = perplexity(model, tok, str(text_file), seq_len=SEQ, limit=4, prefix="The")
    ref, _, _ = hand_ppl(
        model, tok, text_file, SEQ, limit=4, prefix=tok("The", add_special_tokens=False).input_ids
    )
    assert text.ppl == pytest.approx(ref, rel=1e-6)


def test_bad_arguments(model_and_tok, text_file, tmp_path):
    model, tok = model_and_tok
    with pytest.raises(
        QtoolError, match=r"--seq-len 100000 is longer than the model's max_position_embeddings \(512\)"
    ):
        perplexity(model, tok, str(text_file), seq_len=100_000)
    with pytest.raises(
        QtoolError, match=r"--seq-len 512 plus the 1-token prefix is longer .*use --seq-len 511"
    ):
        perplexity(model, tok, str(text_file), seq_len=512, prefix="bos")
    with pytest.raises(QtoolError, match="--seq-len must be at least 2"):
        perplexity(model, tok, str(text_file), seq_len=1)
    with pytest.raises(QtoolError, match="--limit must be at least 1"):
        perplexity(model, tok, str(text_file), seq_len=SEQ, limit=0)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(QtoolError, match="fewer than one"):
        perplexity(model, tok, str(empty), seq_len=SEQ)


def test_prefix_bos_without_bos_token(model_and_tok, text_file):
    model, tok = model_and_tok

    class NoBos:
        bos_token_id = None

        def __call__(self, *args, **kwargs):
            return tok(*args, **kwargs)

    with pytest.raises(QtoolError, match="no BOS token"):
        perplexity(model, NoBos(), str(text_file), seq_len=SEQ, limit=1, prefix="bos")
