"""qtool's compressed-tensors exports load in plain transformers and compute what qtool computes.

Loaded with ``AutoModelForCausalLM.from_pretrained(folder)`` (compressed-tensors installed).
Asymmetric 4-bit exports use ``CompressedTensorsConfig(dequantize=True)``: compressed-tensors
0.20's default (compressed) load path builds ``weight_zero_point`` unpacked (``[out, groups]``)
on the meta device while its own writer and decompressor use the packed
``[ceil(out / 8), groups]`` int32 layout that qtool writes, so the default path refuses every
asymmetric pack-quantized checkpoint, llm-compressor's included.
"""

from __future__ import annotations

import pytest
import torch

from qtool import api
from qtool.eval.perplexity import eval_token_ids, perplexity
from qtool.models.prepare import iter_qlinears
from qtool.quant.quantizer import sqnr_db

pytest.importorskip("compressed_tensors")

SEQ, WINDOWS = 128, 2

CASES = {
    "w4a16-g32-sym": ("{preset: W4A16, weights: {group_size: 32}}", False),
    "w4a16-g32-asym": ("{preset: W4A16, weights: {group_size: 32, symmetric: false}}", True),
    "w4a16-channel-asym": ("{preset: W4A16, weights: {symmetric: false}}", True),
    "w8a8": ("W8A8", False),
}


@pytest.fixture(scope="module")
def ids(tiny_llama_dir):
    from transformers import AutoTokenizer

    return eval_token_ids(AutoTokenizer.from_pretrained(tiny_llama_dir))[: SEQ * WINDOWS].view(WINDOWS, SEQ)


def export(tiny_llama_dir, folder, scheme: str):
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"model: {tiny_llama_dir}\ndevice: cpu\nscheme: {scheme}\nsteps: [rtn, export]\n")
    api.quantize(recipe, folder / "ckpt")
    return folder / "ckpt"


def hf_load(folder, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_loads_qtool_export(name, tiny_llama_dir, tmp_path, ids, text_file):
    scheme, dequantize = CASES[name]
    out = export(tiny_llama_dir, tmp_path, scheme)
    ours, tok, _ = api.load(str(out), device="cpu")
    theirs = hf_load(out, dequantize)
    assert type(theirs).__name__ == "LlamaForCausalLM"

    ref = logits(ours, ids)
    got = logits(theirs, ids)  # the default path decompresses on this first forward
    # the weights compressed-tensors decodes are qtool's dequantized codes (up to bf16 rounding)
    layers = theirs.model.layers
    for i, n, lin in iter_qlinears(ours):
        parent = (
            layers[i].self_attn if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layers[i].mlp
        )
        w = getattr(parent, n).weight.float()
        torch.testing.assert_close(w, lin.weight, rtol=2**-7, atol=1e-7)
    assert sqnr_db(ref, got) > 40.0
    a = perplexity(ours, tok, text_file, SEQ, WINDOWS).ppl
    b = perplexity(theirs, tok, text_file, SEQ, WINDOWS).ppl
    assert b == pytest.approx(a, rel=5e-3)


def test_transformers_loads_w8a16(tiny_llama_dir, tmp_path, ids):
    out = export(tiny_llama_dir, tmp_path, "W8A16")
    ours, _, _ = api.load(str(out), device="cpu")
    theirs = hf_load(out, dequantize=False)
    assert sqnr_db(logits(ours, ids), logits(theirs, ids)) > 40.0
