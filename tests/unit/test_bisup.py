"""``bisup``: trained clip, smoothing and low-rank terms fold back into plain quantized weights."""

from __future__ import annotations

import pytest
import torch
from test_lowrank_step import run_steps

from qtool.models import attention
from qtool.quant.quantizer import sqnr_db
from qtool.steps import STEPS, StepError, parse_step


def test_options_are_validated():
    with pytest.raises(StepError, match="unknown key 'learning_rate'"):
        parse_step({"bisup": {"learning_rate": 1e-3}}, 0)
    with pytest.raises(StepError, match="lr"):
        parse_step({"bisup": {"lr": 0}}, 0)
    step = parse_step({"bisup": {"rank": 4, "epochs": 2, "samples": 8, "reg": 0.1}}, 0)
    assert step.rank == 4 and step.smooth and step.clip


def test_folded_model_equals_trained_fake_quant_model(tiny_llama_dir, monkeypatch):
    """Perturb every trained parameter (as training would), record the wrapped block's output,
    then check that the folded block (plain quantized weights, 1/s in the norms) computes it."""
    seen = []

    def fake_optimize(self, runner, layer, goal, params, smooths, head=None):
        g = torch.Generator().manual_seed(len(seen))
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            for s in smooths:
                s.s.copy_(torch.empty(s.s.shape).uniform_(0.6, 1.6, generator=g))
            x = runner.inputs[0]
            seen.append((layer, x.clone(), runner.run_layer(layer, x).clone(), runner))
        return {
            "loss_before": 0.0,
            "loss_after": 0.0,
            "holdout_before": 0.0,
            "holdout_after": 0.0,
            "epoch_kept": 1,
        }

    parse_step("bisup", 0)  # loads every built-in step (importing one step module directly would not)
    monkeypatch.setattr(STEPS["bisup"], "_optimize", fake_optimize)
    # float32 scales (weights and KV cache): the fold is then exact up to float rounding (16-bit
    # scales would turn that rounding into a few moved codes)
    monkeypatch.setattr(attention, "KV_SCALE_DTYPE", None)
    scheme = {"preset": "W4A4KV4", "weights": {"group_size": 32}}
    bis = {"bisup": {"rank": 3, "accept": "block"}}  # keep the perturbation whatever it does
    run_steps(tiny_llama_dir, ["rotate", bis], scheme, checkpoint_dtype="float32")
    assert len(seen) == 2
    for layer, x, trained, runner in seen:
        for name in ("q_proj", "v_proj", "o_proj", "down_proj"):
            lin = runner.adapter.linear(layer, name)
            assert type(lin).__name__ == "QLinear" and lin.qweight is not None
            assert torch.equal(lin.weight.data, lin.qweight.dequantize())
        assert not torch.all(layer.input_layernorm.weight == 1)  # 1/s went into the norm
        with torch.no_grad():
            folded = runner.run_layer(layer, x)
        assert sqnr_db(trained, folded) > 60


def test_training_lowers_the_block_loss(tiny_llama_dir):
    scheme = {"preset": "W3A3", "weights": {"group_size": 32}}
    calib = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(0))
    ctx = run_steps(
        tiny_llama_dir,
        ["rotate", {"bisup": {"epochs": 2, "lr": 3e-3, "rank": 4, "holdout": 0}}],
        scheme,
        calib=calib,
    )
    blocks = ctx.results["bisup"]["blocks"]
    # the block output error on the calibration samples, trained (fake-quant) model vs its start
    assert sum(b["loss_after"] for b in blocks.values()) < sum(b["loss_before"] for b in blocks.values()), (
        blocks
    )
    assert all(lin.qweight is not None for lin in ctx.model.modules() if hasattr(lin, "qweight"))
    # holdout 0: nothing held out, reported as null (valid JSON), not NaN
    assert all(b["holdout_before"] is None and b["holdout_after"] is None for b in blocks.values())


@pytest.mark.parametrize("start", ["fp", "quantized"])
@pytest.mark.parametrize("preset", ["W4A4KV4", "W4A16"])
def test_untrained_bisup_after_gptq_keeps_the_gptq_grid(tiny_llama_dir, preset, start):
    """BiSup starts from GPTQ's grid, including rows whose codes never reach the edge (their
    scale exceeds max|W| / qmax): with nothing learned the fold gives back GPTQ's exact codes,
    whether the trained weight is GPTQ's dequantized one or the full-precision one (GPTQ's
    rounding then kept as an offset)."""
    scheme = {"preset": preset, "weights": {"bits": 4, "group_size": None}}
    gptq = {"gptq": {"act_order": True, "mse_clip": True}}
    ref = run_steps(tiny_llama_dir, ["rotate", gptq], scheme, checkpoint_dtype="float32")
    bis = {"bisup": {"lr": 1e-12, "rank": 0, "smooth": False, "epochs": 1, "start": start}}
    got = run_steps(tiny_llama_dir, ["rotate", gptq, bis], scheme, checkpoint_dtype="float32")
    pairs = [
        (a, b)
        for a, b in zip(ref.model.modules(), got.model.modules(), strict=True)
        if getattr(a, "qweight", None) is not None
    ]
    assert pairs
    for a, b in pairs:
        assert torch.equal(a.qweight.codes, b.qweight.codes)
        torch.testing.assert_close(a.qweight.scale, b.qweight.scale, rtol=1e-6, atol=0)


def test_held_out_samples_keep_the_best_epoch(tiny_llama_dir):
    """A learning rate that wrecks training is caught on the held-out samples: every block ends no
    worse there than where it started, and a block whose training never helped keeps GPTQ's codes."""
    scheme = {"preset": "W4A4", "weights": {"bits": 4, "group_size": None}}
    gptq = {"gptq": {"act_order": True, "mse_clip": True}}
    calib = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(1))
    ref = run_steps(tiny_llama_dir, ["rotate", gptq], scheme, calib=calib, checkpoint_dtype="float32")
    bis = {"bisup": {"lr": 0.5, "epochs": 2, "rank": 2, "holdout": 0.5}}
    got = run_steps(tiny_llama_dir, ["rotate", gptq, bis], scheme, calib=calib, checkpoint_dtype="float32")
    blocks = got.results["bisup"]["blocks"]
    assert all(b["holdout_after"] <= b["holdout_before"] for b in blocks.values()), blocks
    reverted = [i for i, b in enumerate(blocks.values()) if b["epoch_kept"] == 0]
    assert reverted, blocks  # lr 0.5 on clip logits, smoothing and A B never helps
    for i in reverted:
        a_layer, b_layer = ref.model.model.layers[i], got.model.model.layers[i]
        for name in ("q_proj", "o_proj"):
            a, b = getattr(a_layer.self_attn, name), getattr(b_layer.self_attn, name)
            assert torch.equal(a.qweight.codes, b.qweight.codes)


def test_last_block_loss_is_the_kl_of_the_model_outputs(tiny_llama_dir):
    """``head_loss``: the last block is scored by the KL divergence of the next-token distribution;
    with nothing learned before it, its starting loss is the KL between the full-precision model
    and the quantized model on the calibration windows, as a plain forward of both computes it."""
    scheme = {"preset": "W4A4", "weights": {"bits": 4, "group_size": None}}
    gptq = {"gptq": {"act_order": True, "mse_clip": True}}
    calib = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(2))
    ref = run_steps(tiny_llama_dir, ["rotate", gptq], scheme, calib=calib, checkpoint_dtype="float32")
    fp = ref.fp_reference()
    with torch.no_grad():
        lp_fp = torch.log_softmax(fp(calib).logits.float(), -1)
        lp_q = torch.log_softmax(ref.model(calib).logits.float(), -1)
    kl = float((lp_fp.exp() * (lp_fp - lp_q)).sum(-1).mean())
    bis = {"bisup": {"lr": 1e-12, "epochs": 1, "rank": 0, "smooth": False, "holdout": 0}}
    got = run_steps(tiny_llama_dir, ["rotate", gptq, bis], scheme, calib=calib, checkpoint_dtype="float32")
    blocks = got.results["bisup"]["blocks"]
    last = blocks[f"layers.{len(blocks) - 1}"]
    assert last["loss"] == "kl" and blocks["layers.0"]["loss"] == "relative"
    assert kl > 1e-4
    assert last["loss_before"] == pytest.approx(kl, rel=1e-3)


def test_model_level_acceptance_never_raises_the_held_out_kl(tiny_llama_dir):
    """``accept: model``: a block's training is kept only if the whole model's next-token KL on the
    held-out windows goes down; the reported end KL is what a plain forward of the final model
    gives on those windows, and rejected blocks keep GPTQ's codes."""
    scheme = {"preset": "W4A4", "weights": {"bits": 4, "group_size": None}}
    gptq = {"gptq": {"act_order": True, "mse_clip": True}}
    calib = torch.randint(0, 2000, (4, 64), generator=torch.Generator().manual_seed(3))
    ref = run_steps(tiny_llama_dir, ["rotate", gptq], scheme, calib=calib, checkpoint_dtype="float32")
    bis = {"bisup": {"lr": 3e-2, "epochs": 2, "rank": 2, "holdout": 0.5, "accept": "model"}}
    got = run_steps(tiny_llama_dir, ["rotate", gptq, bis], scheme, calib=calib, checkpoint_dtype="float32")
    res = got.results["bisup"]
    kl = res["model_kl"]
    assert kl["end"] <= kl["start"]
    held = calib[2:]  # batch_size 1: the last half of the windows are held out
    fp = ref.fp_reference()
    with torch.no_grad():
        lp = torch.log_softmax(fp(held).logits.float(), -1)
        for model, want in ((ref.model, kl["start"]), (got.model, kl["end"])):
            lq = torch.log_softmax(model(held).logits.float(), -1)
            assert float((lp.exp() * (lp - lq)).sum(-1).mean()) == pytest.approx(want, rel=1e-3)
    for i, b in enumerate(res["blocks"].values()):
        if not b["kept"]:
            for name in ("q_proj", "down_proj"):
                a = (
                    ref.model.model.layers[i].self_attn.q_proj
                    if name == "q_proj"
                    else ref.model.model.layers[i].mlp.down_proj
                )
                g = (
                    got.model.model.layers[i].self_attn.q_proj
                    if name == "q_proj"
                    else got.model.model.layers[i].mlp.down_proj
                )
                assert torch.equal(a.qweight.codes, g.qweight.codes)
        else:
            assert b["model_kl_after"] < b["model_kl_before"]


def test_fp_start_puts_the_full_precision_weight_under_gptqs_grid():
    """``start: fp``: the trained weight is the full-precision one; GPTQ's rounding decisions are a
    fixed offset, so at step 0 it quantizes to GPTQ's exact codes (not to plain rounding of W),
    gradients reach the smoothing through W, and folding untrained gives GPTQ's codes back."""
    from qtool.algorithms.bisup import BisupLinear, Smooth
    from qtool.algorithms.gptq import gptq_quantize
    from qtool.models.qlinear import QLinear
    from qtool.quant.quantizer import QSpec, QuantizedWeight, fake_quant_ste, quantize

    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    spec = QSpec(4, False, "group", 32)
    res = gptq_quantize(W, 2 * X.T @ X / 256, spec)
    assert not torch.equal(res.codes, quantize(W, res.scale, res.zero, spec))  # GPTQ moved codes
    lin = QLinear(W.clone())
    lin.set_quantized(QuantizedWeight(res.codes, res.scale, res.zero, spec))
    s = Smooth(64, "cpu")
    wr = BisupLinear(lin, spec, 0, s_in=s, w_fp=W)
    assert torch.equal(wr.W0, W)
    wq = fake_quant_ste(wr.effective_weight(), spec, clip=wr.clip(), offset=wr.offset)
    torch.testing.assert_close(wq, lin.qweight.dequantize(), rtol=1e-6, atol=1e-6)
    (wr(X) ** 2).mean().backward()
    assert float(s.s.grad.abs().sum()) > 0
    wr.fold(torch.float32)
    assert torch.equal(lin.qweight.codes, res.codes)
