"""Several targets in one `qtool eval`: the same windows for every row, a ratio against the first
target, every row in the JSON (issue 16, item 2); the gates and their exit status (item 3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool import api
from qtool.cli import app
from qtool.eval.gates import GATE_FAILED
from qtool.eval.perplexity import perplexity

SEQ, WINDOWS = 64, 3


def flat(text: str) -> str:
    return " ".join(text.split())


def write_recipe(path: Path, model, scheme: str) -> Path:
    path.write_text(f"model: {model}\ndevice: cpu\nscheme: {scheme}\nsteps: [rtn, export]\n")
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multi")
    out = {}
    for name, scheme in (
        ("w4a16", "{preset: W4A16, weights: {group_size: 32}}"),
        ("w4a4kv4", "{preset: W4A4KV4, weights: {group_size: null}}"),
    ):
        out[name] = folder / name
        api.quantize(write_recipe(folder / f"{name}.yaml", tiny_llama_dir, scheme), out[name])
    return out


def run(args: list[str]):
    return CliRunner().invoke(app, ["eval", *args], env={"COLUMNS": "200"})  # the table unwrapped


def ppl_args(text_file: str) -> list[str]:
    return ["--ppl", text_file, "--seq-len", str(SEQ), "--limit", str(WINDOWS), "--device", "cpu"]


@pytest.fixture(scope="module")
def three_rows(tiny_llama_dir, checkpoints, text_file, tmp_path_factory):
    js = tmp_path_factory.mktemp("js") / "multi.json"
    targets = [str(tiny_llama_dir), str(checkpoints["w4a16"]), str(checkpoints["w4a4kv4"])]
    res = run([*targets, *ppl_args(text_file), "--json", str(js)])
    assert res.exit_code == 0, res.output
    return targets, res.output, json.loads(js.read_text())


def test_every_target_scores_the_same_windows(three_rows):
    targets, _, data = three_rows
    rows = data["rows"]
    assert [r["model"] for r in rows] == targets
    assert {r["protocol"]["tokens_scored"] for r in rows} == {WINDOWS * (SEQ - 1)}
    assert {r["protocol"]["windows"] for r in rows} == {WINDOWS}
    assert len({r["protocol"]["total_windows"] for r in rows}) == 1
    assert [r["loaded"]["kind"] for r in rows] == ["unquantized", "checkpoint", "checkpoint"]
    assert all(len(r["nll_per_window"]) == WINDOWS for r in rows)
    # the weights' size on disk: the 4-bit checkpoints are smaller than the bf16 model
    sizes = [r["weights_bytes"] for r in rows]
    assert all(s > 0 for s in sizes) and sizes[1] < sizes[0] and sizes[2] < sizes[0]
    # three different models really ran
    assert len({round(r["ppl"], 6) for r in rows}) == 3


def test_ratio_against_the_first_target(three_rows):
    _, output, data = three_rows
    rows = data["rows"]
    assert rows[0]["ppl_ratio"] == 1.0
    for r in rows[1:]:
        assert r["ppl_ratio"] == pytest.approx(r["ppl"] / rows[0]["ppl"], rel=1e-12)
    out = flat(output)
    assert "ppl / first" in out
    for r in rows:
        assert f"ppl={r['ppl']:.6f} {r['model']}" in output
        assert f"{r['ppl_ratio']:.4f}" in out
    # the first row's keys stay at the top level (the single-target JSON), no gates given
    assert data["ppl"] == rows[0]["ppl"] and data["model"] == rows[0]["model"]
    assert data["gates"] == [] and data["passed"] is True


def test_each_row_equals_its_own_single_evaluation(three_rows, text_file):
    targets, _, data = three_rows
    for target, row in zip(targets, data["rows"], strict=True):
        model, tok, _ = api.load(target, device="cpu")
        ref = perplexity(model, tok, text_file, SEQ, WINDOWS)
        assert row["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
        assert row["nll_per_window"] == pytest.approx(ref.nll_per_window, rel=1e-6)


def test_targets_checked_before_the_first_is_loaded(tiny_llama_dir, tmp_path, text_file, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded a model although a later target is missing")

    monkeypatch.setattr(api, "load", refuse)
    res = run([str(tiny_llama_dir), str(tmp_path / "missing"), *ppl_args(text_file)])
    assert res.exit_code == 1 and "error:" in res.output and "missing" in flat(res.output)


# --- gates ---------------------------------------------------------------------------------------


def gate_run(targets: list[str], text_file: str, tmp_path: Path, *gates: str):
    js = tmp_path / "gates.json"
    res = run([*targets, *ppl_args(text_file), *gates, "--json", str(js)])
    return res, (json.loads(js.read_text()) if js.exists() else None)


def test_max_ppl_gate(tiny_llama_dir, text_file, tmp_path):
    target = str(tiny_llama_dir)
    res, data = gate_run([target], text_file, tmp_path, "--max-ppl", "1e9")
    assert res.exit_code == 0, res.output
    assert data["passed"] is True
    [g] = data["gates"]
    assert (g["kind"], g["threshold"], g["target"], g["passed"]) == ("max_ppl", 1e9, target, True)
    assert g["value"] == pytest.approx(data["ppl"])
    assert "PASS --max-ppl 1e+09" in flat(res.output)

    # a random tiny model's ppl is near its vocabulary size: far above 10
    res, data = gate_run([target], text_file, tmp_path, "--max-ppl", "10")
    assert res.exit_code == GATE_FAILED == 3, res.output
    assert data["passed"] is False and data["gates"][0]["passed"] is False
    out = flat(res.output)
    assert "FAIL --max-ppl 10" in out and "gate failed" in out and "exit status 3" in out


def test_max_ppl_ratio_gate(tiny_llama_dir, checkpoints, text_file, tmp_path):
    # the same model twice: ratio exactly 1
    same = [str(tiny_llama_dir), str(tiny_llama_dir)]
    res, data = gate_run(same, text_file, tmp_path, "--max-ppl-ratio", "1.0")
    assert res.exit_code == 0, res.output
    [g] = data["gates"]  # checked on the second target only: the first is the baseline
    assert g["value"] == 1.0 and g["passed"] is True
    res, data = gate_run(same, text_file, tmp_path, "--max-ppl-ratio", "0.999")
    assert res.exit_code == GATE_FAILED and data["gates"][0]["passed"] is False
    # three targets: one check per non-baseline target, each with its own ratio
    targets = [str(tiny_llama_dir), str(checkpoints["w4a16"]), str(checkpoints["w4a4kv4"])]
    res, data = gate_run(targets, text_file, tmp_path, "--max-ppl-ratio", "1e6", "--max-ppl", "1e9")
    assert res.exit_code == 0, res.output
    ratio = [g for g in data["gates"] if g["kind"] == "max_ppl_ratio"]
    assert [g["target"] for g in ratio] == targets[1:]
    assert [g["value"] for g in ratio] == [r["ppl_ratio"] for r in data["rows"][1:]]
    assert len([g for g in data["gates"] if g["kind"] == "max_ppl"]) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-ppl-ratio", "1.1"], "compares against the first target"),
        (["--max-ppl", "0"], "--max-ppl must be positive"),
        (["--max-ppl-ratio", "-1"], "--max-ppl-ratio must be positive"),
        (["--min-acc", "qtool_mc"], "write TASK=ACC"),
        (["--min-acc", "qtool_mc=high"], "is not a number"),
        (["--min-acc", "qtool_mc=1.5"], "between 0 and 1"),
        (["--min-acc", "arc_easy=0.5"], "task 'arc_easy' is not evaluated; add it to --tasks"),
    ],
)
def test_gate_usage_errors_exit_1_before_work(tiny_llama_dir, text_file, monkeypatch, args, message):
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded a model"))
    res = run([str(tiny_llama_dir), *ppl_args(text_file), *args])
    assert res.exit_code == 1, res.output
    assert "error:" in res.output and message in flat(res.output)


def test_gates_on_constructed_rows():
    from qtool.eval.gates import evaluate_gates, make_gates

    rows = [
        {
            "model": "fp",
            "ppl": 20.0,
            "ppl_ratio": 1.0,
            "tasks": {"t": {"metrics": {"acc": 0.7, "acc_norm": 0.6}}},
        },
        {"model": "q", "ppl": 25.0, "ppl_ratio": 1.25, "tasks": {"t": {"metrics": {"acc": 0.5}}}},
        {"model": "bad", "ppl": math.inf, "ppl_ratio": math.inf, "tasks": {}},
    ]
    gates = make_gates(1.3, 24.0, ["t=0.6", "t:acc_norm=0.55"])
    res = evaluate_gates(gates, rows)
    got = {(r["gate"], r["target"]): r["passed"] for r in res}
    assert got == {
        ("--max-ppl-ratio 1.3", "q"): True,
        ("--max-ppl-ratio 1.3", "bad"): False,  # not finite
        ("--max-ppl 24", "fp"): True,
        ("--max-ppl 24", "q"): False,
        ("--max-ppl 24", "bad"): False,
        ("--min-acc t=0.6", "fp"): True,
        ("--min-acc t=0.6", "q"): False,
        ("--min-acc t=0.6", "bad"): False,  # no result for the task
        ("--min-acc t:acc_norm=0.55", "fp"): True,
        ("--min-acc t:acc_norm=0.55", "q"): False,  # the metric is missing
        ("--min-acc t:acc_norm=0.55", "bad"): False,
    }
    # thresholds are inclusive
    edge = evaluate_gates(make_gates(1.25, 25.0, ["t=0.5"]), rows[:2])
    assert all(r["passed"] for r in edge if r["target"] == "q")
