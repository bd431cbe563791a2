"""Datasets: the offline WikiText-2 mirror, local files, errors, calibration sampling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qtool.data.datasets import calibration_windows, load_rows, read_local, resolve_calibration_split
from qtool.errors import QtoolError


@pytest.fixture(scope="module")
def test_rows():
    return load_rows("wikitext2", "test")


def test_mirror_is_configured():
    folder = Path(os.environ["QTOOL_DATA_DIR"]) / "wikitext-2-raw-v1"
    assert (folder / "test.jsonl").is_file(), "conftest points QTOOL_DATA_DIR at ../shared/data"


def test_wikitext2_test_rows(test_rows):
    assert len(test_rows) == 4358
    assert sum(1 for r in test_rows if r == "") > 0
    assert all(r == "" or r.endswith("\n") for r in test_rows)
    assert len("\n\n".join(test_rows)) == 1_294_336


def test_wikitext2_validation_loads():
    rows = load_rows("wikitext2", "validation")
    assert len(rows) == 3760
    assert any("<unk>" in r for r in rows)  # the tokenized release, meant for calibration


def test_unknown_dataset():
    with pytest.raises(
        QtoolError, match=r"unknown dataset 'ptb'; use wikitext2, c4 or a local .jsonl/.txt/.parquet file"
    ):
        load_rows("ptb", "test")


def test_local_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first row"}\n\n{"text": "second\\nrow", "id": 3}\n')
    assert load_rows(str(f), "ignored") == ["first row", "second\nrow"]


@pytest.mark.parametrize("bad", ['{"txt": "x"}', "not json", '["text"]'])
def test_local_jsonl_bad_line_is_named(tmp_path, bad):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n' + bad + "\n")
    with pytest.raises(QtoolError, match=rf"{f.name}:2: expected a JSON object with a 'text' field"):
        load_rows(str(f), "test")


def test_local_txt(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("alpha beta\n\ngamma\n")
    assert load_rows(str(f), "train") == ["alpha beta", "", "gamma"]


def test_local_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "two three"], "n": [1, 2]}), f)
    assert load_rows(str(f), "train") == ["one", "two three"]
    g = tmp_path / "e.parquet"
    pq.write_table(pa.table({"content": ["x"]}), g)
    with pytest.raises(QtoolError, match=r"needs a 'text' column, found \['content'\]"):
        load_rows(str(g), "train")


def test_local_file_missing_or_unsupported(tmp_path):
    with pytest.raises(QtoolError, match="data file not found"):
        load_rows(str(tmp_path / "nope.jsonl"), "train")
    f = tmp_path / "d.csv"
    f.write_text("text\nx\n")
    with pytest.raises(QtoolError, match="unsupported file type; use one of .jsonl, .txt, .parquet"):
        read_local(f)


def test_missing_mirror_file_offline_names_qtool_data_dir(offline):
    with pytest.raises(QtoolError) as exc:
        load_rows("wikitext2", "test")
    msg = str(exc.value)
    assert "QTOOL_DATA_DIR" in msg and "wikitext-2-raw-v1/test.jsonl" in msg
    assert "could not load wikitext2/test" in msg


# --- calibration ----------------------------------------------------------------------------


def test_calibration_split_resolution(tmp_path):
    # the mirror has no train split: auto falls back to validation, never test
    assert resolve_calibration_split("wikitext2", "auto") == "validation"
    assert resolve_calibration_split("wikitext2", "train") == "train"
    assert resolve_calibration_split(str(tmp_path / "x.txt"), "auto") == "train"


def test_calibration_windows_seeded(smollm2_tokenizer, tmp_path):
    a = calibration_windows(smollm2_tokenizer, "wikitext2", "auto", 4, 64, seed=0)
    b = calibration_windows(smollm2_tokenizer, "wikitext2", "validation", 6, 64, seed=0)
    assert a.shape == (4, 64) and a.dtype == torch.int64
    # the same seed draws the same windows (auto resolves to validation here); more samples
    # extend the draw, another seed draws others
    assert torch.equal(a, b[:4])
    f = tmp_path / "v.txt"
    f.write_text("\n\n".join(load_rows("wikitext2", "validation")[:200]))
    c = calibration_windows(smollm2_tokenizer, str(f), "auto", 4, 64, seed=0)
    d = calibration_windows(smollm2_tokenizer, str(f), "auto", 4, 64, seed=1)
    assert torch.equal(c, calibration_windows(smollm2_tokenizer, str(f), "auto", 4, 64, seed=0))
    assert not torch.equal(c, d)
    # every window is a contiguous slice of the joined, tokenized validation text
    text = "\n\n".join(load_rows("wikitext2", "validation"))
    ids = smollm2_tokenizer(text, add_special_tokens=False).input_ids
    index = {}
    for i in range(len(ids) - 63):
        index.setdefault(tuple(ids[i : i + 8]), []).append(i)
    for w in a.tolist():
        assert any(ids[s : s + 64] == w for s in index.get(tuple(w[:8]), [])), "window not found in the text"


def test_calibration_refuses_test_split(smollm2_tokenizer, tmp_path):
    with pytest.raises(QtoolError, match="test split is refused"):
        calibration_windows(smollm2_tokenizer, "wikitext2", "test", 2, 32, 0)
    f = tmp_path / "d.txt"
    f.write_text("some text " * 200)
    with pytest.raises(QtoolError, match="test split is refused"):
        calibration_windows(smollm2_tokenizer, str(f), "test", 2, 32, 0)


def test_calibration_from_local_file(smollm2_tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"row {i} " * 20}) for i in range(20)))
    w = calibration_windows(smollm2_tokenizer, str(f), "auto", 3, 16, seed=5)
    assert w.shape == (3, 16)
    with pytest.raises(QtoolError, match="fewer than one 100000-token window"):
        calibration_windows(smollm2_tokenizer, str(f), "auto", 3, 100_000, seed=5)
