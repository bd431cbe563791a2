"""Shared set-up of the BiSup diagnostics (``diag_bisup_hidden``, ``diag_bisup_protocol``).

One W4A4KV4 rotate + GPTQ model of the lowrank/BiSup table (same scheme, same GPTQ options), its
rotated full-precision reference, and BiSup trained on a copy of it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from scripts.tables.table_lowrank_bisup import GPTQ, W4A4KV4


@dataclass
class Base:
    tok: object
    calib: object  # [samples, seq_len] calibration ids
    recipe: object  # rotate + gptq + bisup (bisup applied separately by train_bisup)
    model: object  # rotate + GPTQ
    ctx: object
    seconds: float
    fp_rot: object  # the full-precision model, rotated like ``model``


def gptq_base(model_name: str, calib_samples: int, calib_seq_len: int, bisup: dict) -> Base:
    """Load ``model_name``, quantize it (rotate + GPTQ) on seeded WikiText-2 windows."""
    import torch

    from qtool.data.datasets import calibration_windows
    from qtool.models.loading import load_hf_model
    from qtool.models.prepare import prepare_model
    from qtool.recipe import Recipe
    from qtool.steps.base import Context

    torch.manual_seed(0)
    model, tok = load_hf_model(model_name, "float32", "cpu")
    calib = calibration_windows(tok, "wikitext2", "auto", calib_samples, calib_seq_len, 0)
    recipe = Recipe.model_validate(
        {
            "model": model_name,
            "device": "cpu",
            "scheme": W4A4KV4,
            "steps": ["rotate", GPTQ, {"bisup": bisup}],
            "calibration": {"samples": calib_samples, "seq_len": calib_seq_len},
        }
    )
    prepare_model(model, recipe.scheme)
    ctx = Context(recipe=recipe, model=model, tokenizer=tok, device=torch.device("cpu"))
    ctx._calibration = calib
    t0 = time.perf_counter()
    for step in recipe.steps[:2]:
        step.apply(ctx)
    seconds = time.perf_counter() - t0
    return Base(tok, calib, recipe, model, ctx, seconds, ctx.fp_reference())


def train_bisup(base: Base, windows) -> tuple[object, object, float]:
    """BiSup (the recipe's last step) on a copy of the base model, calibrated on ``windows``."""
    import torch

    from qtool.steps.base import Context

    model = copy.deepcopy(base.model)
    ctx = Context(recipe=base.recipe, model=model, tokenizer=base.tok, device=torch.device("cpu"))
    ctx._calibration = windows
    ctx.use_fp_reference(base.fp_rot)
    t0 = time.perf_counter()
    base.recipe.steps[-1].apply(ctx)
    return model, ctx, time.perf_counter() - t0
