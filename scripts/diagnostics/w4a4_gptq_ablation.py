"""Why is qtool's rotated W4A4 GPTQ worse than llm-compressor's at the same quantizer settings? (issue 17)

    python -m scripts.diagnostics.w4a4_gptq_ablation --limit 8 --calib-samples 32
    python -m scripts.diagnostics.w4a4_gptq_ablation --only "no head mixing before o_proj" --out abl_a   # one row

Labels hold no commas (``--only`` splits on them); a row measured before under the same protocol is
reused from results/ (so a run with another ``--out`` collects rows measured by separate processes).

Every row is the side-by-side harness's ``w4a4-rot-ao`` setting (rotate: residual Hadamard,
online Hadamard before ``down_proj``, per-head V/O; W4 symmetric per channel, min-max ranges, GPTQ
damp 0.01, block 128, act-order; A4 symmetric per token, dynamic, no clipping; float32), and one
calibration choice changes from row to row, the candidates the issue names:

* ``act_quant_in_calibration``: are the windows pushed through each layer with activation (and KV)
  quantization on, as qtool did, or with quantized weights and full-precision activations, as
  llm-compressor's sequential pipeline (``DisableQuantization`` around calibration) and QuaRot's GPTQ do;
* ``hessian_on_quantized_inputs``: the Hessian from ``Q(X)`` instead of ``X``;
* ``true_sequential``: q/k/v, o, gate/up, down calibrated one group after another (qtool) or every
  linear of a layer from the layer's input (llm-compressor's one-subgraph-per-layer pipeline);
* ``rotate: {head_mix: false}``: no online rotation across SmolLM2's 9 heads before ``o_proj`` (a
  seeded random orthogonal 9 x 9 in qtool, as no Hadamard of order 9 exists; llm-compressor's R2
  rotates V/O per head only).

Results: ``results/<out>.{json,md}`` (the table scripts' format: ppl on the first ``--limit``
WikiText-2 test windows of 2048 tokens, no prefix).
"""

from __future__ import annotations

from scripts.tables.common import parse_args, run_rows

SCHEME = {
    "preset": "W4A4",
    "weights": {"bits": 4, "symmetric": True, "group_size": None},
    "activations": {"bits": 4, "clip_ratio": 1.0},
}
ROTATE = {
    "rotate": {"kind": "hadamard", "seed": 0, "residual": True, "down_proj": True, "attention_vo": True}
}
BASE = {"block_size": 128, "damp": 0.01, "act_order": True, "mse_clip": False}

VARIANTS = {
    "qtool as it was (act quant in calibration; true-sequential)": {},
    "activations full precision in calibration": {"act_quant_in_calibration": False},
    "no head mixing before o_proj": {"head_mix": False},
    "Hessian on quantized inputs": {"hessian_on_quantized_inputs": True},
    "activations full precision in calibration; one pass per layer": {
        "act_quant_in_calibration": False,
        "true_sequential": False,
    },
}


def rows() -> list[dict]:
    return [
        {
            "label": label,
            "recipe": {
                "dtype": "float32",
                "device": "cpu",
                "scheme": SCHEME,
                "steps": [
                    {"rotate": {**ROTATE["rotate"], **{k: v for k, v in extra.items() if k == "head_mix"}}},
                    {"gptq": {**BASE, **{k: v for k, v in extra.items() if k != "head_mix"}}},
                ],
            },
        }
        for label, extra in VARIANTS.items()
    ]


def main() -> None:
    args = parse_args(__doc__, default_limit=8)
    run_rows(rows(), args, "w4a4_gptq_ablation")


if __name__ == "__main__":
    main()
