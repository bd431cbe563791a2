"""Rotation + GPTQ table (issue 3): SmolLM2-135M, WikiText-2 2048, the same first N windows.

    python -m scripts.tables.table_rotation --limit 16 --calib-samples 64 --calib-seq-len 512

Weights per-channel symmetric 4-bit unless the label says g64; activations per-token 4-bit with
clip 0.9 and KV 4-bit asymmetric per head with clip 0.95 (QuaRot's setting) in the rotated rows;
plain RTN rows use no clipping. GPTQ: act-order, MSE clip search, true-sequential. ``clip_search``
rows replace those fixed activation / KV clip ratios by ratios chosen per linear / per layer on
the calibration data (grid 0.5..1.0).
"""

from scripts.tables.common import parse_args, run_rows

PC = {"bits": 4, "symmetric": True, "group_size": None}
G64 = {"bits": 4, "symmetric": True, "group_size": 64}
A4 = {"bits": 4, "clip_ratio": 0.9}
KV4 = {"bits": 4, "symmetric": False, "clip_ratio": 0.95}
GPTQ = {"gptq": {"act_order": True, "mse_clip": True}}


def q(preset, weights, steps, act=None, kv=None):
    scheme = {"preset": preset, "weights": weights}
    if act:
        scheme["activations"] = act
    if kv:
        scheme["kv_cache"] = kv
    return {"scheme": scheme, "steps": steps}


ROWS = [
    {"label": "FP32", "fp": "float32"},
    {"label": "W4A4 RTN", "recipe": q("W4A4", PC, ["rtn"])},
    {"label": "W4A4KV4 RTN", "recipe": q("W4A4KV4", PC, ["rtn"])},
    {
        "label": "rotate + RTN (mse clip) W4A4KV4",
        "recipe": q("W4A4KV4", PC, ["rotate", {"rtn": {"mse_clip": True}}], A4, KV4),
    },
    {"label": "rotate + GPTQ W4A4", "recipe": q("W4A4", PC, ["rotate", GPTQ], A4)},
    {"label": "rotate + GPTQ W4A4KV4", "recipe": q("W4A4KV4", PC, ["rotate", GPTQ], A4, KV4)},
    {
        "label": "rotate + clip_search + GPTQ W4A4KV4",
        "recipe": q("W4A4KV4", PC, ["rotate", "clip_search", GPTQ], A4, KV4),
    },
    {
        "label": "rotate + clip_search + GPTQ W4A4",
        "recipe": q("W4A4", PC, ["rotate", "clip_search", GPTQ], A4),
    },
    {
        "label": "W4A16-g64 RTN",
        "recipe": q("W4A16", {"group_size": 64}, ["rtn"]),
    },  # same recipe as the foundation table
    {"label": "W4A16-g64 GPTQ", "recipe": q("W4A16", G64, [GPTQ])},
    {"label": "W4A16 per-channel RTN", "recipe": q("W4A16", PC, ["rtn"])},
    {"label": "W4A16 per-channel GPTQ", "recipe": q("W4A16", PC, [GPTQ])},
]

if __name__ == "__main__":
    args = parse_args(__doc__, default_limit=16)
    run_rows(ROWS, args, "table_rotation")
