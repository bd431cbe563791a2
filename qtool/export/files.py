"""Which files a qtool checkpoint folder needs, checked before any loading.

A checkpoint missing one of them fails up front with the file's name, instead of deep inside
``transformers`` or the loader after minutes of work on the other targets.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import QtoolError

# what the writer always writes (``recipe.yaml`` is provenance: loading does not need it); the
# weights are ``model.safetensors`` or, sharded, the index and every shard it lists
REQUIRED = ("qtool.json", "config.json", "tokenizer_config.json")
INDEX = "model.safetensors.index.json"
# a tokenizer needs one of these beside tokenizer_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def missing_checkpoint_files(path: str | Path) -> list[str]:
    """The files the checkpoint at ``path`` lacks (empty when complete), sidecars included."""
    path = Path(path)
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if (path / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise QtoolError(
                f"{path / INDEX} is not a valid shard index ({exc}); re-export the checkpoint"
            ) from None
        missing += [name for name in shards if not (path / name).is_file()]
    elif not (path / "model.safetensors").is_file():
        missing.append(f"model.safetensors (or {INDEX} and its shards)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    meta_file = path / "qtool.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise QtoolError(f"{meta_file} is not valid JSON ({exc}); re-export the checkpoint") from None
        missing += [name for name in meta.get("sidecars", []) if not (path / name).is_file()]
    return missing


def check_checkpoint_files(path: str | Path) -> None:
    """Raise a :class:`QtoolError` naming the first missing file(s) of the checkpoint at ``path``."""
    missing = missing_checkpoint_files(path)
    if missing:
        raise QtoolError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}; copy the whole folder, "
            f"or re-export it with `qtool quantize RECIPE --output {path} --overwrite`"
        )


def looks_like_checkpoint(path: str | Path) -> bool:
    """A folder qtool exported (its ``qtool.json`` or, when that was lost, its ``recipe.yaml``)."""
    path = Path(path)
    return path.is_dir() and ((path / "qtool.json").is_file() or (path / "recipe.yaml").is_file())
