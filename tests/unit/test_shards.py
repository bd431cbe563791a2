"""ShardReader: tensors read from safetensors files, mapped or by positioned reads, equal to safetensors' own."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtool.errors import QtoolError
from qtool.models.shards import INDEX, ShardReader


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(4, generator=g).double(),
        "i8": torch.randint(-8, 8, (4, 6), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "i32": torch.arange(6, dtype=torch.int32).view(2, 3),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
    }


@pytest.mark.parametrize("mapped", [True, False])
def test_reads_every_dtype_like_safetensors(tmp_path, mapped):
    ts = _tensors()
    save_file(dict(list(ts.items())[:6]), str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    save_file(dict(list(ts.items())[6:]), str(tmp_path / "b.safetensors"))
    weight_map = {k: "a.safetensors" if i < 6 else "b.safetensors" for i, k in enumerate(ts)}
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = ShardReader(tmp_path, mapped=mapped)
    for key, ref in ts.items():
        got = reader.tensor(key)
        with safe_open(str(tmp_path / weight_map[key]), "pt") as fh:
            theirs = fh.get_tensor(key)
        assert got.dtype == ref.dtype == theirs.dtype and got.shape == ref.shape
        assert torch.equal(got, ref) and torch.equal(got, theirs)
    reader.close()


def test_single_file_keys_and_missing_tensor(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    reader = ShardReader(tmp_path, mapped=False)
    assert reader.keys() == ["x"]
    with pytest.raises(QtoolError, match="no tensor 'y'"):
        reader.tensor("y")


def test_truncated_shard_is_an_error_not_garbage(tmp_path):
    save_file({"x": torch.arange(1000, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(QtoolError, match="cut short"):
        ShardReader(tmp_path, mapped=False).tensor("x")


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(QtoolError, match="not a safetensors file"):
        ShardReader(tmp_path)
