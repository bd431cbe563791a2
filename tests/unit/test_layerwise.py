"""The layer-wise runner's early stop: a calibration pass ends once its group's inputs are seen."""

from __future__ import annotations

import torch

from qtool.api import run_recipe
from qtool.recipe import Recipe
from qtool.steps.layerwise import LayerwiseRunner, capture_inputs


def test_capture_stop_sees_the_same_inputs_and_skips_the_rest(tiny_llama_dir):
    r = Recipe.model_validate(
        {
            "model": str(tiny_llama_dir),
            "device": "cpu",
            "calibration": {"samples": 4, "seq_len": 32},
            "scheme": {"weights": {"bits": 4, "group_size": 32}},
            "steps": ["rtn"],
        }
    )
    ctx = run_recipe(r, export=False)
    runner = LayerwiseRunner(ctx, batch_size=2)
    layer = runner.layers()[0]
    attn, mlp = layer.self_attn, layer.mlp
    for group, later in (
        ({"q": attn.q_proj, "k": attn.k_proj}, mlp.down_proj),
        ({"up": mlp.up_proj}, mlp.down_proj),
    ):
        seen: dict[bool, list] = {True: [], False: []}
        calls = {True: 0, False: 0}
        for stop in (False, True):

            def count(*_, stop=stop, calls=calls):
                calls[stop] += 1

            def keep(n, x, stop=stop, seen=seen):
                seen[stop].append((n, x.clone()))

            h = later.register_forward_pre_hook(count)
            with capture_inputs(group, keep, stop=stop):
                runner.forward_all(layer)
            h.remove()
        assert calls[False] == 2 and calls[True] == 0  # two batches; the stopped pass never reaches it
        assert [n for n, _ in seen[True]] == [n for n, _ in seen[False]]
        for (_, a), (_, b) in zip(seen[True], seen[False], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
