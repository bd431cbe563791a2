"""Foundation table (issue 2): FP and RTN schemes on SmolLM2-135M, WikiText-2, first N windows.

    python -m scripts.tables.table_foundation --limit 16      # writes results/table_foundation.{json,md}

RTN here is plain min/max round-to-nearest (no clip search). W4A16-g32-asym is near-lossless on
this model only because its weights come from a Q4_1 GGUF (4-bit asymmetric groups of 32).
"""

from scripts.tables.common import parse_args, run_rows

PC = {"bits": 4, "symmetric": True, "group_size": None}
ROWS = [
    {"label": "FP32", "fp": "float32"},
    {"label": "BF16", "fp": "bfloat16"},
    {
        "label": "W8A8 RTN (per-channel, per-token)",
        "recipe": {"scheme": {"preset": "W8A8"}, "steps": ["rtn"]},
    },
    {
        "label": "W4A16-g64 RTN",
        "recipe": {"scheme": {"preset": "W4A16", "weights": {"group_size": 64}}, "steps": ["rtn"]},
    },
    {
        "label": "W4A16 per-channel RTN",
        "recipe": {"scheme": {"preset": "W4A16", "weights": PC}, "steps": ["rtn"]},
    },
    {
        "label": "W4A16-g32-asym RTN (GGUF grid, see note)",
        "recipe": {
            "scheme": {"preset": "W4A16", "weights": {"group_size": 32, "symmetric": False}},
            "steps": ["rtn"],
        },
    },
    {"label": "W4A4 RTN", "recipe": {"scheme": {"preset": "W4A4", "weights": PC}, "steps": ["rtn"]}},
    {"label": "W4KV4 RTN", "recipe": {"scheme": {"preset": "W4KV4", "weights": PC}, "steps": ["rtn"]}},
    {"label": "W4A4KV4 RTN", "recipe": {"scheme": {"preset": "W4A4KV4", "weights": PC}, "steps": ["rtn"]}},
]

if __name__ == "__main__":
    args = parse_args(__doc__, default_limit=16)
    run_rows(ROWS, args, "table_foundation")
