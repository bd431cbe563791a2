"""lm-eval tasks through `qtool eval --tasks` (issue 16, item 1), offline, on the local task
`tests/data/lm_eval_tasks/qtool_mc.yaml` (40 multiple-choice questions written for this project).

qtool's path (QtoolLM over the fake-quant model, lm-eval's simple_evaluate) is checked against
lm-eval's own Hugging Face model (HFLM) run through simple_evaluate on the same model object;
the simulation is checked to be in the loop (the quantized model scores differently); the pivot
cache is checked to be the prefix of every sequence.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtool import api
from qtool.cli import app
from qtool.errors import QtoolError
from qtool.eval.gates import GATE_FAILED

lm_eval = pytest.importorskip("lm_eval")

TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"
TASK = "qtool_mc"


def flat(text: str) -> str:
    return " ".join(text.split())


def write_recipe(path: Path, model, scheme: str, steps: str = "[rtn, export]") -> Path:
    path.write_text(f"model: {model}\ndevice: cpu\nscheme: {scheme}\nsteps: {steps}\n")
    return path


@pytest.fixture(scope="module")
def spec():
    from qtool.eval.tasks import prepare_tasks

    return prepare_tasks([TASK], TASKS)


@pytest.fixture(scope="module")
def w4a4(tiny_llama_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    out = folder / "w4a4kv4"
    recipe = write_recipe(folder / "r.yaml", tiny_llama_dir, "{preset: W4A4KV4, weights: {group_size: null}}")
    api.quantize(recipe, out)
    return out


def reference(model, tok, spec, **kw) -> dict:
    """lm-eval's own HFLM over the same model object, through lm-eval's simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    res = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=1),
        tasks=[TASK],
        task_manager=spec.manager,
        bootstrap_iters=1000,
        **kw,
    )
    return res["results"][TASK]


def test_cli_tasks_match_simple_evaluate_on_the_same_model(w4a4, spec, tmp_path):
    js = tmp_path / "tasks.json"
    args = ["eval", str(w4a4), "--tasks", TASK, "--include-path", str(TASKS), "--device", "cpu"]
    res = CliRunner().invoke(app, [*args, "--json", str(js)])
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    got = data["rows"][0]["tasks"][TASK]
    model, tok, info = api.load(str(w4a4), device="cpu")
    assert info["kind"] == "checkpoint"
    ref = reference(model, tok, spec)
    assert got["metrics"]["acc"] == ref["acc,none"]
    assert got["metrics"]["acc_norm"] == ref["acc_norm,none"]
    assert got["stderr"]["acc"] == pytest.approx(ref["acc_stderr,none"], rel=1e-12)
    assert got["samples"] == got["samples_total"] == 40
    assert got["version"] == 1.0 and got["num_fewshot"] == 0
    assert data["lm_eval"]["lm_eval"] == lm_eval.__version__
    assert data["lm_eval"]["forward_passes"] == 160  # 40 questions x 4 choices, each its own pass
    assert "ppl" not in data  # --tasks without --ppl runs the tasks only
    out = flat(res.output)
    assert f"{got['metrics']['acc']:.4f} ± {got['stderr']['acc']:.4f}" in out
    assert f"lm-eval {lm_eval.__version__}, {TASK} v1.0" in out


def test_in_memory_model_matches_simple_evaluate_per_document(tiny_llama_dir, tmp_path, spec):
    """A recipe quantized in memory (W4A4KV4), the same model object through both: every
    document's log-likelihoods agree, not only the accuracy."""
    from qtool.eval.tasks import run_tasks

    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_llama_dir, "{preset: W4A4KV4, weights: {group_size: null}}"
    )
    model, tok, info = api.load(str(recipe), device="cpu")
    assert info["kind"] == "in-memory"
    ours = run_tasks(model, tok, spec, log_samples=True)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    ref = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=1),
        tasks=[TASK],
        task_manager=spec.manager,
        bootstrap_iters=1000,
    )
    a = [[r[0] for r in s["resps"]] for s in ours["samples"][TASK]]
    b = [[r[0] for r in s["resps"]] for s in ref["samples"][TASK]]
    assert len(a) == len(b) == 40
    for x, y in zip(a, b, strict=True):
        for (lx, gx), (ly, gy) in zip(x, y, strict=True):
            assert lx == pytest.approx(ly, abs=1e-4) and gx == gy
    assert ours["tasks"][TASK]["metrics"]["acc"] == ref["results"][TASK]["acc,none"]


def test_fake_quant_model_scores_differently(tiny_llama_dir, w4a4, spec):
    from qtool.eval.tasks import run_tasks

    fp, tok, _ = api.load(str(tiny_llama_dir), device="cpu")
    q, qtok, _ = api.load(str(w4a4), device="cpu")
    a = run_tasks(fp, tok, spec, log_samples=True)["samples"][TASK]
    b = run_tasks(q, qtok, spec, log_samples=True)["samples"][TASK]
    diff = max(
        abs(x[0][0] - y[0][0])
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa["resps"], sb["resps"], strict=True)
    )
    assert diff > 1e-2  # W4A4KV4 fake quantization is really in the loop


@pytest.mark.slow
def test_smollm2_fp_and_w4a4kv4_rtn_differ_in_accuracy(smollm2_path, spec):
    """On SmolLM2 the local task separates FP from an unusable W4A4KV4 RTN model (measured:
    0.65 vs 0.325)."""
    from qtool.eval.tasks import run_tasks

    repo = Path(__file__).resolve().parents[2]
    fp, tok, _ = api.load("smollm2-135m", device="cpu")
    acc_fp = run_tasks(fp, tok, spec)["tasks"][TASK]["metrics"]["acc"]
    del fp
    q, qtok, _ = api.load(str(repo / "recipes" / "smollm2-w4a4kv4-rtn.yaml"), device="cpu")
    acc_q = run_tasks(q, qtok, spec)["tasks"][TASK]["metrics"]["acc"]
    assert acc_fp >= 0.5 and acc_fp - acc_q >= 0.15, (acc_fp, acc_q)


def test_pivot_cache_is_the_prefix_of_every_sequence(tiny_llama_dir, tmp_path):
    """With an IntactKV pivot ([BOS]) a sequence is scored after the 16-bit pivot cache: in place of
    its own leading BOS, or in front of it; an empty context is scored from the pivot's position."""
    from qtool.eval.lm_eval_model import QtoolLM
    from qtool.models.pivot import forward_with_prefix

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_llama_dir,
        "{preset: W4KV4, weights: {group_size: null}}",
        "[rtn, {intactkv: {pivot: bos}}, export]",
    )
    model, tok, _ = api.load(str(recipe), device="cpu")
    pivot = model.qtool_pivot
    bos = tok.bos_token_id
    assert pivot.token_ids == [bos]
    lm = QtoolLM(model, tok)

    def logp(tokens, prefix):
        ids = torch.tensor([tokens])
        return torch.log_softmax(forward_with_prefix(model, ids, prefix)[0].float(), -1)

    def score(lp, positions, targets):
        return float(sum(lp[p, t] for p, t in zip(positions, targets, strict=True)))

    reqs = [
        (("a", "b"), [5, 6, 7], [8, 9]),  # no BOS: the pivot goes in front
        (("a", "b"), [bos, 5, 6], [7]),  # starts with the pivot: the cache replaces it
        (("", "b"), [bos], [5, 6]),  # empty context: the first token is predicted at the pivot
    ]
    got = [s for s, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    assert got[0] == pytest.approx(score(logp([5, 6, 7, 8], [bos]), [2, 3], [8, 9]), abs=1e-5)
    assert got[1] == pytest.approx(score(logp([5, 6], [bos]), [1], [7]), abs=1e-5)
    head = torch.log_softmax(
        model(input_ids=torch.tensor([[bos]]), use_cache=False).logits[0, -1].float(), -1
    )
    assert got[2] == pytest.approx(float(head[5]) + float(logp([5], [bos])[0, 6]), abs=1e-5)
    # the cache is really used: other pivot K/V change the scores
    for k in pivot.keys:
        k.mul_(0.5)
    again = [s for s, _ in lm._loglikelihood_tokens(reqs[:2], disable_tqdm=True)]
    assert again[0] != pytest.approx(got[0], abs=1e-4) and again[1] != pytest.approx(got[1], abs=1e-4)


def test_min_acc_gate_on_a_task(tiny_llama_dir, tmp_path):
    js = tmp_path / "g.json"
    base = ["eval", str(tiny_llama_dir), "--tasks", TASK, "--include-path", str(TASKS), "--limit", "8"]
    res = CliRunner().invoke(app, [*base, "--min-acc", f"{TASK}=0", "--json", str(js)])
    assert res.exit_code == 0, res.output
    [g] = json.loads(js.read_text())["gates"]
    assert g["kind"] == "min_acc" and g["task"] == TASK and g["passed"] is True
    res = CliRunner().invoke(app, [*base, "--min-acc", f"{TASK}=1", "--json", str(js)])
    assert res.exit_code == GATE_FAILED, res.output
    data = json.loads(js.read_text())
    assert data["passed"] is False and data["gates"][0]["value"] < 1
    assert data["rows"][0]["tasks"][TASK]["samples"] == 8  # --limit: the first 8 documents
    assert f"FAIL --min-acc {TASK}=1" in flat(res.output)


def test_num_fewshot_is_passed_and_recorded(tiny_llama_dir, spec):
    from qtool.eval.tasks import run_tasks

    model, tok, _ = api.load(str(tiny_llama_dir), device="cpu")
    out = run_tasks(model, tok, spec, num_fewshot=2, limit=4, log_samples=True)
    assert out["tasks"][TASK]["num_fewshot"] == 2
    first = out["samples"][TASK][0]["arguments"][0]  # (context, continuation) of the first choice
    prompt = first[0] if isinstance(first, (list, tuple)) else first["arg_0"]
    assert prompt.count("Question:") == 3  # two examples, then the question


def test_unknown_task_lists_close_matches(tmp_path):
    res = CliRunner().invoke(
        app, ["eval", str(tmp_path), "--tasks", "qtool_mcc", "--include-path", str(TASKS)]
    )
    assert res.exit_code == 1, res.output
    assert "unknown task 'qtool_mcc'" in flat(res.output) and "close matches: qtool_mc" in flat(res.output)
    from qtool.eval.tasks import prepare_tasks

    with pytest.raises(QtoolError, match="close matches: arc_easy"):
        prepare_tasks(["arc_eesy"])


def test_hub_task_without_network_names_the_task_and_what_to_set(offline, tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "no-datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "no-datasets"))
    from qtool.eval.tasks import prepare_tasks

    with pytest.raises(QtoolError) as exc:
        prepare_tasks(["arc_easy"])
    msg = str(exc.value)
    assert "task 'arc_easy': could not load allenai/ai2_arc/ARC-Easy" in msg
    assert "HF_DATASETS_CACHE" in msg and "HF_DATASETS_OFFLINE" in msg and "--include-path" in msg


def test_generation_task_refused_before_work(tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    shutil.copy(TASKS / "qtool_mc.jsonl", folder)
    shutil.copy(TASKS / "qtool_mc_data.py", folder)
    (folder / "gen.yaml").write_text(
        "task: qtool_gen\ncustom_dataset: !function qtool_mc_data.load\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[answer]}}'\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    from qtool.eval.tasks import prepare_tasks

    with pytest.raises(QtoolError, match="task 'qtool_gen' generates text"):
        prepare_tasks(["qtool_gen"], folder)


def test_missing_lm_eval_and_bad_include_path(monkeypatch, tmp_path):
    import qtool.eval.tasks as tasks

    with pytest.raises(QtoolError, match="--include-path .*no such folder"):
        tasks.prepare_tasks([TASK], tmp_path / "nope")
    monkeypatch.setattr(tasks, "lm_eval_version", lambda: None)
    res = CliRunner().invoke(app, ["eval", str(tmp_path), "--tasks", TASK])
    assert res.exit_code == 1 and "optional extra `eval`" in flat(res.output)
    assert "pip install 'lm-eval>=0.4.13,<0.5'" in flat(res.output)
    with pytest.raises(QtoolError, match="empty task name"):
        tasks.parse_task_list("a,,b")
    assert tasks.parse_task_list(["a,b", "a", " c "]) == ["a", "b", "c"]


def test_loglikelihood_rolling_matches_hflm(w4a4, text_file):
    """Rolling log-likelihood (perplexity tasks) over several windows equals lm-eval's HFLM on the
    same fake-quant model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from qtool.data.datasets import load_rows
    from qtool.eval.lm_eval_model import QtoolLM

    model, tok, _ = api.load(str(w4a4), device="cpu")
    texts = [r for r in load_rows(text_file, "test") if len(r) > 200][:2]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = QtoolLM(model, tok, max_length=32)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=32)
    got, want = ours.loglikelihood_rolling(reqs), ref.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(tok(texts[0]).input_ids) > 64  # several windows each
    assert got == pytest.approx(want, rel=1e-5)
    assert ours.calls >= 4
