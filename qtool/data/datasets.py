"""Text datasets for evaluation and calibration: offline mirror first, then the hub.

Names: ``wikitext2`` (hub ``wikitext`` / ``wikitext-2-raw-v1``), ``c4`` (hub ``allenai/c4``,
English validation shard), or a path to a local ``.jsonl`` (``{"text": ...}`` per line),
``.txt`` (one row per line) or ``.parquet`` (a ``text`` column) file.
The mirror directory ``$QTOOL_DATA_DIR`` holds ``wikitext-2-raw-v1/{split}.jsonl`` and
``c4/{split}.jsonl``; it is read before the hub.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from qtool.errors import QtoolError

logger = logging.getLogger("qtool")

HUB = {
    "wikitext2": {"mirror": "wikitext-2-raw-v1", "path": "wikitext", "name": "wikitext-2-raw-v1"},
    "c4": {
        "mirror": "c4",
        "path": "allenai/c4",
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    },
}
LOCAL_SUFFIXES = (".jsonl", ".txt", ".parquet")


def data_dir() -> Path | None:
    value = os.environ.get("QTOOL_DATA_DIR")
    return Path(value) if value else None


def read_local(path: Path) -> list[str]:
    if not path.is_file():
        raise QtoolError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        with path.open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise QtoolError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        return rows
    if path.suffix == ".txt":
        return path.read_text().splitlines()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise QtoolError(f"{path}: a parquet file needs a 'text' column, found {table.column_names}")
        return [str(t) for t in table.column("text").to_pylist()]
    raise QtoolError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def available_splits(dataset: str) -> list[str]:
    if dataset in HUB and data_dir() is not None:
        folder = data_dir() / HUB[dataset]["mirror"]
        return sorted(p.stem for p in folder.glob("*.jsonl"))
    return ["train", "validation", "test"]


def load_rows(dataset: str, split: str) -> list[str]:
    """Rows of text of ``dataset``/``split`` (mirror, then hub), or of a local file."""
    if dataset.endswith(LOCAL_SUFFIXES):
        return read_local(Path(dataset))
    if dataset not in HUB:
        raise QtoolError(
            f"unknown dataset {dataset!r}; use {', '.join(HUB)} or a local {'/'.join(LOCAL_SUFFIXES)} file"
        )
    info = HUB[dataset]
    mirror = data_dir()
    if mirror is not None:
        f = mirror / info["mirror"] / f"{split}.jsonl"
        if f.is_file():
            return read_local(f)
        logger.debug("%s not in the mirror %s; trying the hub", f, mirror)
    try:
        import datasets

        if "data_files" in info:
            ds = datasets.load_dataset(
                "json",
                data_files={split: f"hf://datasets/{info['path']}/{info['data_files'][split]}"},
                split=split,
            )
        else:
            ds = datasets.load_dataset(info["path"], info["name"], split=split)
        return list(ds["text"])
    except Exception as exc:  # network and hub errors come in many types
        raise QtoolError(
            f"could not load {dataset}/{split} from the hub ({type(exc).__name__}: {str(exc)[:200]}). "
            f"Offline? Set QTOOL_DATA_DIR to a mirror holding {info['mirror']}/{split}.jsonl"
        ) from None


def resolve_calibration_split(dataset: str, split: str) -> str:
    if split != "auto":
        return split
    if dataset.endswith(LOCAL_SUFFIXES):
        return "train"
    splits = available_splits(dataset)
    chosen = "train" if "train" in splits else "validation"
    if chosen != "train":
        logger.info("calibration: no train split of %s in the mirror; using %s", dataset, chosen)
    return chosen


def calibration_windows(
    tokenizer, dataset: str, split: str, samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens, ``[samples, seq_len]`` int64, seeded.

    The rows are joined with ``"\\n\\n"`` and tokenized once, as for evaluation; windows start at
    uniformly random offsets drawn from a ``torch.Generator`` seeded with ``seed``.
    """
    split = resolve_calibration_split(dataset, split)
    if split == "test":
        raise QtoolError("calibration on the test split is refused: it would leak the evaluation data")
    text = "\n\n".join(load_rows(dataset, split))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seq_len:
        raise QtoolError(f"{dataset}/{split} has {ids.numel()} tokens, fewer than one {seq_len}-token window")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
