"""Write a random-initialized Llama checkpoint of a real shape: bf16 safetensors, sharded, seeded.

    python -m scripts.bench.make_random_checkpoint --shape llama-2-7b --out /tmp/llama2-7b-random

For timing and memory measurements (they do not depend on the weight values). The folder goes
outside the repository and is never committed. Tensors are generated one at a time (normal, std
0.02, norms at 1), so writing a 7B checkpoint needs about one layer of memory. The tokenizer is the
embedded SmolLM2's (a tokenizer must be there for calibration), so the vocabulary is SmolLM2's
49,152 tokens instead of the original model's (the embedding and lm_head shapes differ by that);
every decoder layer has the real shape.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from qtool.bench.generate import SHAPES  # the real shapes (the vocabulary is replaced, see above)


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    p.add_argument("--out", required=True, help="output folder (outside the repository)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="target shard size in GB")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from qtool.models.loading import resolve_model_path

    out = Path(args.out)
    repo = Path(__file__).resolve().parents[2]
    if out.resolve().is_relative_to(repo):
        raise SystemExit(f"{out} is inside the repository: write random checkpoints elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    tok.save_pretrained(out)
    shape = SHAPES[args.shape]
    vocab = len(tok)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(args.seed)
    h = shape["hidden_size"]
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (vocab, h))]]
    limit = args.shard_gb * 1e9
    size = vocab * h * 2
    for i in range(shape["num_hidden_layers"]):
        layer = [(f"model.layers.{i}.{k}", s) for k, s in layer_shapes(shape).items()]
        nbytes = sum(2 * torch.Size(s).numel() for _, s in layer)
        if size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1] += layer
        size += nbytes
    groups[-1] += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    n = len(groups)
    weight_map, total = {}, 0
    start = time.perf_counter()
    for j, group in enumerate(groups):
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        tensors = {key: random_tensor(key, s, gen) for key, s in group}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
        print(f"{name}: {len(group)} tensors ({time.perf_counter() - start:.0f}s)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {out}: {args.shape} (vocab {vocab}), {total / 1e9:.2f} GB in {n} shards", flush=True)


if __name__ == "__main__":
    main()
