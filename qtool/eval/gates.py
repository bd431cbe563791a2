"""Pass/fail gates on evaluation results, for CI jobs (``qtool eval --max-ppl-ratio/--max-ppl/--min-acc``).

A gate is checked on every target it applies to: ``max_ppl`` and ``min_acc`` on every target,
``max_ppl_ratio`` on every target after the first (the baseline it is a ratio against). The
command exits with :data:`GATE_FAILED` when any check fails (1 is a user error, 2 a usage error).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qtool.errors import QtoolError

GATE_FAILED = 3  # the exit status of `qtool eval` when a gate fails


@dataclass(frozen=True)
class Gate:
    kind: str  # max_ppl_ratio | max_ppl | min_acc
    threshold: float
    task: str | None = None  # min_acc only
    metric: str = "acc"  # min_acc only: the lm-eval metric compared (acc, acc_norm, ...)

    @property
    def label(self) -> str:
        if self.kind == "min_acc":
            metric = "" if self.metric == "acc" else f":{self.metric}"
            return f"--min-acc {self.task}{metric}={self.threshold:g}"
        return f"--{self.kind.replace('_', '-')} {self.threshold:g}"


def parse_min_acc(spec: str) -> Gate:
    """``TASK=A`` or ``TASK:METRIC=A`` (e.g. ``hellaswag:acc_norm=0.4``), ``0 <= A <= 1``."""
    name, sep, value = spec.rpartition("=")
    if not sep or not name:
        raise QtoolError(f"--min-acc {spec!r}: write TASK=ACC (e.g. arc_easy=0.6) or TASK:METRIC=ACC")
    task, _, metric = name.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        raise QtoolError(f"--min-acc {spec!r}: {value!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:
        raise QtoolError(f"--min-acc {spec!r}: an accuracy is between 0 and 1")
    return Gate("min_acc", threshold, task.strip(), metric.strip() or "acc")


def make_gates(
    max_ppl_ratio: float | None = None, max_ppl: float | None = None, min_acc: list[str] | None = None
) -> list[Gate]:
    gates = []
    if max_ppl_ratio is not None:
        if not max_ppl_ratio > 0:
            raise QtoolError(f"--max-ppl-ratio must be positive, got {max_ppl_ratio}")
        gates.append(Gate("max_ppl_ratio", float(max_ppl_ratio)))
    if max_ppl is not None:
        if not max_ppl > 0:
            raise QtoolError(f"--max-ppl must be positive, got {max_ppl}")
        gates.append(Gate("max_ppl", float(max_ppl)))
    gates.extend(parse_min_acc(s) for s in min_acc or [])
    return gates


def check_gates_apply(gates: list[Gate], n_targets: int, ppl: bool, tasks: list[str]) -> None:
    """Refuse, before any work, a gate that the requested evaluation cannot decide."""
    for gate in gates:
        if gate.kind in ("max_ppl", "max_ppl_ratio") and not ppl:
            raise QtoolError(f"{gate.label} needs a perplexity: add --ppl wikitext2 (or another dataset)")
        if gate.kind == "max_ppl_ratio" and n_targets < 2:
            raise QtoolError(
                f"{gate.label} compares against the first target: give the baseline first and at "
                "least one more target (e.g. `qtool eval smollm2-135m out/quantized ...`)"
            )
        if gate.kind == "min_acc" and gate.task not in tasks:
            raise QtoolError(
                f"{gate.label}: task {gate.task!r} is not evaluated; add it to --tasks "
                f"(--tasks {','.join([*tasks, gate.task])})"
            )


def _value(gate: Gate, row: dict[str, Any]) -> float | None:
    if gate.kind == "max_ppl":
        return row.get("ppl")
    if gate.kind == "max_ppl_ratio":
        return row.get("ppl_ratio")
    task = (row.get("tasks") or {}).get(gate.task)
    if task is None:
        return None
    return task.get("metrics", {}).get(gate.metric)


def evaluate_gates(gates: list[Gate], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per gate and target it applies to: the value, the threshold and ``passed``.

    A missing value (e.g. a task without the gate's metric) or a non-finite one fails the gate.
    """
    out = []
    for gate in gates:
        for i, row in enumerate(rows):
            if gate.kind == "max_ppl_ratio" and i == 0:
                continue  # the baseline: its ratio is 1 by definition
            value = _value(gate, row)
            ok = value is not None and math.isfinite(value)
            if ok:
                ok = value >= gate.threshold if gate.kind == "min_acc" else value <= gate.threshold
            out.append(
                {
                    **asdict(gate),
                    "gate": gate.label,
                    "target": row.get("model"),
                    "value": value,
                    "passed": bool(ok),
                }
            )
    return out
