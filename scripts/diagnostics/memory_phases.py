"""Where host memory goes in an in-memory W4A4 rotate + GPTQ run on SmolLM2 (issue 17).

    python -m scripts.diagnostics.memory_phases            # resident / peak memory after each phase
    python -m scripts.diagnostics.memory_phases --full     # + the whole `qtool quantize` under /usr/bin/time -v

The recipe is the peer comparison's W4A4 row: rotate, GPTQ per channel without act-order, min-max
weight ranges, activations 4-bit per token (clip 1.0), calibration 64 x 512, float32, one thread.
Phases (in this process): imports, loading the float32 model, ``prepare_model``, ``rotate``, a heap
trim, the calibration ids, the embedded calibration windows. ``--full`` then runs the whole recipe
(with export) in a child process and reads its "Maximum resident set size".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = """model: smollm2-135m
device: cpu
calibration: {samples: 64, seq_len: 512}
scheme: {preset: W4A4, weights: {bits: 4, group_size: null}, activations: {bits: 4, clip_ratio: 1.0}}
steps: [rotate, {gptq: {act_order: false, mse_clip: false}}]
"""


def mem(tag: str) -> None:
    d = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                d[k] = int(v.split()[0]) * 1024 / 1e9
    print(f"{tag:34s} resident {d['VmRSS']:.2f} GB   peak {d['VmHWM']:.2f} GB", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="also run the whole recipe under /usr/bin/time -v")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    mem("start (torch imported)")
    import yaml

    from qtool.log import trim_heap
    from qtool.models.loading import load_hf_model
    from qtool.models.prepare import prepare_model
    from qtool.recipe import Recipe
    from qtool.steps.base import Context
    from qtool.steps.layerwise import LayerwiseRunner

    recipe = Recipe.model_validate(yaml.safe_load(RECIPE))
    mem("imports")
    model, tok = load_hf_model(recipe.model, recipe.dtype, "cpu")
    mem("float32 model loaded")
    prepare_model(model, recipe.scheme)
    mem("prepare_model")
    ctx = Context(recipe=recipe, model=model, tokenizer=tok, device=torch.device("cpu"))
    recipe.steps[0].apply(ctx)
    mem("rotate")
    trim_heap()
    mem("heap trimmed")
    ctx.calibration()
    mem("calibration ids")
    LayerwiseRunner(ctx, 8, True)
    mem("calibration windows embedded")
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "r.yaml").write_text(RECIPE)
            proc = subprocess.run(
                [
                    "/usr/bin/time",
                    "-v",
                    sys.executable,
                    "-m",
                    "qtool",
                    "quantize",
                    f"{tmp}/r.yaml",
                    "--output",
                    f"{tmp}/o",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "QTOOL_NO_PROGRESS": "1"},
            )
            rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
            wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr)
            print(
                f"whole run (exit {proc.returncode}): peak RSS {int(rss.group(1)) * 1024 / 1e9:.2f} GB, wall {wall.group(1)}"
                if rss and wall
                else proc.stderr[-2000:]
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
