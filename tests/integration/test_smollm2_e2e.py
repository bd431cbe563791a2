"""The real SmolLM2-135M through the CLI: quantize the demo recipe once, evaluate, reload.

One quantization for the whole module (the CLI's ``qtool quantize``; a spy on ``api.quantize``
keeps its in-memory model), perplexity on the first 2 windows of 2048 tokens of WikiText-2 test.
Most of the time goes to the recipe's MSE clip search (``rtn: {mse_clip: true}``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool import api
from qtool.cli import app
from qtool.eval.perplexity import perplexity

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-w4a16-rtn.yaml"
SEQ, WINDOWS = 2048, 2


def run_cli(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, smollm2_path):
    """``qtool quantize recipes/smollm2-w4a16-rtn.yaml --output DIR``: ``(ctx, DIR)``."""
    out = tmp_path_factory.mktemp("smollm2") / "w4a16"
    captured = {}
    real = api.quantize

    def spy(*args, **kwargs):
        captured["ctx"] = real(*args, **kwargs)
        return captured["ctx"]

    mp = pytest.MonkeyPatch()
    mp.setattr(api, "quantize", spy)
    try:
        run_cli(["quantize", str(RECIPE), "--output", str(out), "--device", "cpu"])
    finally:
        mp.undo()
    return captured["ctx"], out


def eval_json(target: str, tmp_path: Path, *extra: str) -> dict:
    js = tmp_path / "ppl.json"
    run_cli(
        [
            "eval",
            "--ppl",
            "wikitext2",
            target,
            "--limit",
            str(WINDOWS),
            "--device",
            "cpu",
            *extra,
            "--json",
            str(js),
        ]
    )
    return json.loads(js.read_text())


@pytest.fixture(scope="module")
def fp_result(tmp_path_factory, smollm2_path):
    return eval_json("smollm2-135m", tmp_path_factory.mktemp("fp"))


@pytest.fixture(scope="module")
def quant_result(quantized, tmp_path_factory):
    _, out = quantized
    return eval_json(str(out), tmp_path_factory.mktemp("q"), "--seq-len", str(SEQ))


def test_checkpoint_written(quantized):
    ctx, out = quantized
    meta = json.loads((out / "qtool.json").read_text())
    assert meta["scheme"]["weights"] == {
        "bits": 4,
        "symmetric": True,
        "group_size": 64,
        "ragged": False,
        "clip_ratio": 1.0,
        "grid": "qmax",
    }
    assert len(meta["quantized_modules"]) == 30 * 7
    exp = ctx.results["export"]
    # 4-bit codes + a bf16 scale per 64 weights: about 4.25 bits per decoder-linear weight
    n_weights = sum(lin.weight.numel() for lin in _qlinears(ctx.model))
    assert exp["decoder_linear_bytes"] * 8 / n_weights == pytest.approx(4.25, rel=0.02)


def _qlinears(model):
    from qtool.models.prepare import iter_qlinears

    return [lin for _, _, lin in iter_qlinears(model)]


def test_quantized_perplexity_close_to_fp(fp_result, quant_result):
    fp, q = fp_result["ppl"], quant_result["ppl"]
    for res in (fp_result, quant_result):
        p = res["protocol"]
        assert (p["seq_len"], p["windows"], p["prefix"], p["dataset"]) == (SEQ, WINDOWS, "none", "wikitext2")
        assert p["tokens_scored"] == WINDOWS * (SEQ - 1)
        assert {"qtool", "torch", "transformers"} <= set(res["versions"])
    assert fp_result["loaded"]["kind"] == "unquantized" and quant_result["loaded"]["kind"] == "checkpoint"
    assert math.isfinite(q) and math.isfinite(fp)
    assert 5.0 < fp < 60.0  # an instruct 135M model on WikiText-2
    assert q < 1.6 * fp
    assert q > 0.98 * fp  # rounding to 4 bits does not improve the model


def test_reload_equals_in_memory_model(quantized, quant_result):
    # the model `qtool quantize` held in memory scores the first window as the reloaded export does
    # (one window, to keep the test short; the export was evaluated on two by the CLI)
    ctx, _ = quantized
    mem = perplexity(ctx.model, ctx.tokenizer, "wikitext2", SEQ, limit=1)
    assert mem.nll_per_window[0] == pytest.approx(quant_result["nll_per_window"][0], rel=1e-5)
    assert mem.ppl == pytest.approx(math.exp(quant_result["nll_per_window"][0]), rel=1e-4)
