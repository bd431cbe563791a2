"""Zero-shot / few-shot tasks through lm-eval-harness (the optional extra ``qtool[eval]``).

:func:`prepare_tasks` runs before any model is loaded: it checks that lm-eval is installed, that
every task name is known (unknown names get the close matches), that each task's data can be
read (a hub dataset without network fails naming the task and what to set) and that the task
only needs log-likelihoods. :func:`run_tasks` then evaluates one loaded qtool model through
lm-eval's own ``simple_evaluate`` with :class:`~qtool.eval.lm_eval_model.QtoolLM`.
"""

from __future__ import annotations

import difflib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError

logger = logging.getLogger("qtool")

INSTALL = "install qtool's optional extra `eval` (`make setup` does), or pip install 'lm-eval>=0.4.13,<0.5'"
BOOTSTRAP_ITERS = 1000  # lm-eval's bootstrap for non-mean metrics (perplexities); acc stderr is exact


@dataclass
class TaskSpec:
    """Tasks checked by :func:`prepare_tasks`, ready for :func:`run_tasks` on each target."""

    names: list[str]
    include_path: str | None
    manager: Any = field(repr=False)  # lm_eval.tasks.TaskManager
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # per leaf task: dataset, output type


def lm_eval_version() -> str | None:
    try:
        import lm_eval
    except ImportError:
        return None
    return getattr(lm_eval, "__version__", "unknown")


def require_lm_eval() -> None:
    if lm_eval_version() is None:
        raise QtoolError(f"--tasks needs lm-eval-harness, which is not installed: {INSTALL}")


def parse_task_list(tasks: str | list[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (order kept, duplicates dropped)."""
    if not tasks:
        return []
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for item in items for n in item.split(",")]
    if any(not n for n in names):
        raise QtoolError(f"--tasks {','.join(items)!r}: an empty task name; write --tasks a,b,c")
    return list(dict.fromkeys(names))


def _dataset_hint(entry) -> str:
    cfg = (entry.cfg or {}) if entry is not None else {}
    path = cfg.get("dataset_path")
    name = cfg.get("dataset_name")
    return f"{path}{'/' + name if name else ''}" if path else "its dataset"


def prepare_tasks(tasks: list[str], include_path: str | Path | None = None) -> TaskSpec:
    """Check ``tasks`` before any model work; fail with a message saying what to change."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise QtoolError(f"--include-path {include_path}: no such folder (a folder of lm-eval task YAMLs)")
    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = manager.all_tasks
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        where = f" in lm-eval's tasks or {include_path}" if include_path else " in lm-eval's tasks"
        raise QtoolError(
            f"unknown task {name!r}{where}{hint}. `lm-eval ls tasks` lists them; your own task YAMLs "
            "work with --include-path DIR"
        )
    info: dict[str, dict[str, Any]] = {}
    for name in tasks:
        entry = manager.task_index.get(name)
        try:
            with _quiet_lm_eval():
                loaded = manager.load([name])  # builds the task: reads its data now, not after the models
        except Exception as exc:  # the hub, datasets and task code fail in many types
            offline = any(
                os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
            )
            raise QtoolError(
                f"task {name!r}: could not load {_dataset_hint(entry)} ({type(exc).__name__}: "
                f"{str(exc).strip()[:300]}). lm-eval reads task data from the Hugging Face hub"
                f"{' and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set' if offline else ''}: run once "
                "with network to fill the datasets cache (HF_DATASETS_CACHE, default "
                "~/.cache/huggingface/datasets) and set HF_DATASETS_OFFLINE=1 after, or point the task "
                "at local files in your own YAML and pass --include-path DIR"
            ) from None
        for task_name, task in loaded["tasks"].items():
            kind = task.get_config("output_type")
            if kind == "generate_until":
                raise QtoolError(
                    f"task {task_name!r} generates text (output_type generate_until); qtool eval --tasks "
                    "runs log-likelihood tasks only (multiple_choice, loglikelihood, loglikelihood_rolling)"
                )
            info[task_name] = {"output_type": kind, "dataset": task.get_config("dataset_path")}
    return TaskSpec(list(tasks), str(include_path) if include_path else None, manager, info)


def _split_metric(key: str) -> tuple[str, str]:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` -> ``("acc", "none")``."""
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """lm-eval's ``simple_evaluate`` output -> per task (and group): metrics, stderrs, version, counts."""
    out: dict[str, dict[str, Any]] = {}
    for task, values in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        stderr: dict[str, float | None] = {}
        for key, value in values.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = _split_metric(key)
            is_stderr = metric.endswith("_stderr")
            metric = metric.removesuffix("_stderr")
            name = metric if filt == "none" else f"{metric},{filt}"
            number = float(value) if isinstance(value, (int, float)) else None
            (stderr if is_stderr else metrics)[name] = number
        samples = results.get("n-samples", {}).get(task, {})
        out[task] = {
            "alias": values.get("alias", task).strip(" -"),
            "metrics": metrics,
            "stderr": stderr,
            "version": results.get("versions", {}).get(task),
            "num_fewshot": results.get("n-shot", {}).get(task),
            "samples": samples.get("effective"),
            "samples_total": samples.get("original"),
            "higher_is_better": results.get("higher_is_better", {}).get(task),
        }
    return out


@contextmanager
def _quiet_lm_eval():
    """lm-eval's own log lines only with ``qtool -v`` (its tqdm bars stay: tqdm reads its settings at import)."""
    lm_logger = logging.getLogger("lm_eval")
    before = lm_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        lm_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_logger.setLevel(before)


def run_tasks(
    model,
    tokenizer,
    spec: TaskSpec,
    num_fewshot: int | None = None,
    limit: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (as qtool simulates it) on ``spec``'s tasks through lm-eval's ``simple_evaluate``.

    Returns ``{"tasks": {task: summary}, "lm_eval": version, "num_fewshot", "limit", "forward_passes"}``
    and, with ``log_samples``, lm-eval's per-document ``samples``.
    """
    from lm_eval import simple_evaluate

    from qtool.eval.lm_eval_model import QtoolLM

    if num_fewshot is not None and num_fewshot < 0:
        raise QtoolError("--num-fewshot must be 0 or more")
    lm = QtoolLM(model, tokenizer)
    with _quiet_lm_eval():
        res = simple_evaluate(
            model=lm,
            tasks=list(spec.names),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=spec.manager,
            log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    out: dict[str, Any] = {
        "tasks": summarize(res),
        "lm_eval": lm_eval_version(),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "forward_passes": lm.calls,
    }
    if log_samples:
        out["samples"] = res.get("samples", {})
    return out
