"""One GPTQ solve, this checkout against an older commit's ``qtool/algorithms/gptq.py``: same bits? how fast?

    python -m scripts.dev.gptq_solve_vs_commit 799247e        # the commit before the column-loop rewrite

Loads the old module's source with ``git show COMMIT:qtool/algorithms/gptq.py`` (the rest of qtool
is this checkout's) and runs both ``gptq_quantize`` on the same random SmolLM2-sized matrices and
Hessians (seed 0; weights ``[out, in]`` as in SmolLM2-135M's linears), one thread, alternating
old / new five times and keeping each one's faster time. Prints one line per case: whether codes,
scales, zero points, weights and the loss are identical, and both times.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

import torch

from scripts.tables.common import REPO


def old_module(commit: str):
    src = subprocess.run(
        ["git", "show", f"{commit}:qtool/algorithms/gptq.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    name = "qtool.algorithms._gptq_at_commit"
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    mod.__package__ = "qtool.algorithms"
    sys.modules[name] = mod
    exec(compile(src, f"{commit}:qtool/algorithms/gptq.py", "exec"), mod.__dict__)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("commit")
    args = p.parse_args()
    torch.set_num_threads(1)
    from qtool.algorithms import gptq as new
    from qtool.quant.quantizer import QSpec

    old = old_module(args.commit)
    cases = [  # (out, in, spec, act_order, mse_clip)
        (576, 576, QSpec(4, True, "channel"), True, True),
        (576, 576, QSpec(4, True, "channel"), False, False),
        (1536, 576, QSpec(4, False, "group", 64), True, True),
        (576, 1536, QSpec(4, True, "group", 64), True, False),
    ]
    torch.manual_seed(0)
    print(f"gptq_quantize: {args.commit} vs this checkout (1 thread, best of 5)")
    for m, d, spec, ao, mse in cases:
        W = torch.randn(m, d)
        X = torch.randn(d, 4 * d) * torch.rand(d, 1) * 3
        H = X @ X.T / X.shape[1]
        times: dict[str, float] = {"old": float("inf"), "new": float("inf")}
        res = {}
        for _ in range(5):
            for key, mod in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                res[key] = mod.gptq_quantize(W, H, spec, act_order=ao, mse_clip=mse)
                times[key] = min(times[key], time.perf_counter() - t0)
        a, b = res["old"], res["new"]
        same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("codes", "scale", "zero", "weight"))
        same = same and a.loss == b.loss
        label = f"[{m} x {d}] {spec.granularity}{spec.group_size or ''} act_order={ao} mse_clip={mse}"
        print(
            f"{label:<50} {'same bits' if same else 'DIFFERENT'}  old {times['old']:.3f} s  "
            f"new {times['new']:.3f} s  speed-up {times['old'] / times['new']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
