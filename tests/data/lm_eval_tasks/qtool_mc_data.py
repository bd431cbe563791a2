"""Data of the ``qtool_mc`` lm-eval task: ``qtool_mc.jsonl`` beside this file, as the ``test`` split."""

from __future__ import annotations

import json
from pathlib import Path


def load(**kwargs):
    import datasets

    rows = [json.loads(line) for line in (Path(__file__).parent / "qtool_mc.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
