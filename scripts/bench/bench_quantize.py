"""Wall time and peak memory of rotate + GPTQ on a random-initialized model of real shapes.

    python -m scripts.bench.bench_quantize --shape llama2-7b --device cuda --samples 128 --seq-len 2048
    python -m scripts.bench.bench_quantize --shape smollm2 --device cpu --samples 128 --seq-len 512

Timing does not depend on weight values, so no download is needed: the model is built from a
LlamaConfig with the named shapes and random weights, calibrated on random token ids. Writes
results/bench_quantize_<shape>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from scripts.tables.common import RESULTS

SHAPES = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--scheme", default="W4A4KV4")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.api import versions
    from qtool.log import setup_logging
    from qtool.models.prepare import prepare_model
    from qtool.recipe import Recipe
    from qtool.steps.base import Context

    setup_logging()
    device = torch.device(args.device)
    config = LlamaConfig(
        **SHAPES[args.shape], vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq_len)
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    recipe = Recipe.model_validate(
        {
            "model": f"random-{args.shape}",
            "device": args.device,
            "calibration": {"samples": args.samples, "seq_len": args.seq_len},
            "scheme": {
                "preset": args.scheme,
                "activations": {"bits": 4, "clip_ratio": 0.9},
                "kv_cache": {"bits": 4, "clip_ratio": 0.95},
            }
            if args.scheme == "W4A4KV4"
            else args.scheme,
            "steps": [
                "rotate",
                {"gptq": {"act_order": True, "mse_clip": True, "batch_size": args.batch_size}},
            ],
        }
    )
    # rotation runs where the weights live; GPTQ moves one layer at a time to the device
    model.model.embed_tokens.to(device)
    model.model.rotary_emb.to(device)
    prepare_model(model, recipe.scheme)
    ctx = Context(recipe=recipe, model=model, tokenizer=None, device=device)
    gen = torch.Generator().manual_seed(0)
    ctx._calibration = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {}
    start = time.perf_counter()
    for step in recipe.steps:
        t = time.perf_counter()
        step.apply(ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[type(step).step_name] = time.perf_counter() - t
    total = time.perf_counter() - start
    out = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "scheme": args.scheme,
        "calibration": f"{args.samples} x {args.seq_len} random tokens",
        "device": args.device,
        "seconds": {"build": build_s, **times, "total": total},
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }
    dest = RESULTS / f"bench_quantize_{args.shape}_{device.type}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("QTOOL_NO_PROGRESS", "1")
    main()
