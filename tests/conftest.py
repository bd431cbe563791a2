"""Shared fixtures: the offline data mirror, tiny random Llama-family models, SmolLM2.

The tiny models use the SmolLM2 tokenizer (so they read the same WikiText-2 token stream as the
real model) and random weights; they are saved once per session in bfloat16 like a hub model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

os.environ.setdefault("QTOOL_DATA_DIR", str(SHARED / "data"))
os.environ["QTOOL_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M as a cached bf16 HF folder (dequantized once, ~20 s)."""
    from qtool.models.loading import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _config(arch: str, vocab_size: int, tok):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(TINY, vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        # tied embeddings like SmolLM2
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        # Qwen2 has biases on q/k/v (attention_bias in its modelling code)
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    raise ValueError(f"no tiny config for {arch!r}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """Factory ``tiny_model_dir(arch)`` -> folder of a tiny random ``arch`` model (cached per arch)."""
    import torch
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch in made:
            return made[arch]
        config = _config(arch, len(smollm2_tokenizer), smollm2_tokenizer)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if arch == "qwen2":
            # make the q/k/v biases non-zero so that a dropped bias shows up
            with torch.no_grad():
                for layer in model.model.layers:
                    for name in ("q_proj", "k_proj", "v_proj"):
                        getattr(layer.self_attn, name).bias.normal_(0, 0.5)
        model = model.to(torch.bfloat16)
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        made[arch] = folder
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access: offline env flags (also patched where already read) and an empty data mirror."""
    import datasets.config
    import huggingface_hub.constants

    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("QTOOL_DATA_DIR", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both modules read the environment once, at import: patch what they read (undone after the test)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return empty


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """The first rows of WikiText-2 test as a local file: a few windows, tokenized in no time."""
    import json

    from qtool.data.datasets import load_rows

    path = tmp_path_factory.mktemp("text") / "wiki.jsonl"
    path.write_text("\n".join(json.dumps({"text": r}) for r in load_rows("wikitext2", "test")[:30]))
    return str(path)
