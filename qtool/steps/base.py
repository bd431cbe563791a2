"""The context a recipe's steps share: model, tokenizer, calibration data, results.

Steps talk to each other only through this object: the run-time features they record
(``runtime``, written to ``qtool.json`` and re-applied by the loader through
:mod:`qtool.models.features`), the full-precision reference (:meth:`Context.fp_reference`), the
output folder and the results report. A step never imports another step.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qtool.data.datasets import calibration_windows
from qtool.errors import QtoolError
from qtool.models.adapters import get_adapter
from qtool.models.loading import DTYPES, load_hf_model
from qtool.models.prepare import iter_qlinears, prepare_model, set_quantization_enabled

if TYPE_CHECKING:
    from qtool.recipe import Recipe

logger = logging.getLogger("qtool")


@dataclass
class Context:
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    # the report: per-step results, written by `qtool quantize --json`
    results: dict[str, Any] = field(default_factory=dict)
    # run-time features the model needs beyond its weights (name -> JSON-able entry, see
    # qtool.models.features): filled by the steps, written to qtool.json by `export`
    runtime: dict[str, Any] = field(default_factory=dict)
    # working state a step keeps between its parts within this run (never saved)
    state: dict[str, Any] = field(default_factory=dict)
    # where `export` writes the checkpoint, and whether it may replace an existing folder
    output: str | Path | None = None
    overwrite: bool = False
    _calibration: torch.Tensor | None = None
    _fp_model: torch.nn.Module | None = None

    @property
    def scheme(self):
        return self.recipe.scheme

    @property
    def scale_dtype(self) -> torch.dtype:
        return DTYPES[self.recipe.checkpoint_dtype]

    def calibration(self) -> torch.Tensor:
        """``[samples, seq_len]`` token ids, drawn once per run (seeded)."""
        if self._calibration is None:
            c = self.recipe.calibration
            self._calibration = calibration_windows(
                self.tokenizer, c.dataset, c.split, c.samples, c.seq_len, c.seed
            )
            logger.info("calibration: %d x %d tokens from %s", c.samples, c.seq_len, c.dataset)
        return self._calibration

    def weight_spec(self, step: str):
        """The scheme's weight ``QSpec``; a clear error when the scheme quantizes no weights."""
        if self.scheme.weights is None:
            raise QtoolError(
                f"`{step}` needs scheme.weights: it quantizes weights (e.g. scheme: {{preset: W4A16}})"
            )
        return self.scheme.weights.spec()

    def pending(self, named: dict[str, Any]) -> dict[str, Any]:
        """The scheme's targets among ``named`` linears whose weights no step quantized yet."""
        return {n: lin for n, lin in named.items() if n in self.scheme.targets and lin.qweight is None}

    def sequential_groups(self, true_sequential: bool) -> tuple[tuple[str, ...], ...]:
        """A decoder layer's linears in solve order (all in one group unless ``true_sequential``)."""
        groups = get_adapter(self.model.config).sequential_groups()
        return groups if true_sequential else (sum(groups, ()),)

    def weights_quantized(self) -> bool:
        """Whether any targeted linear holds quantized weights yet."""
        return any(lin.qweight is not None for _, _, lin in iter_qlinears(self.model))

    def snapshot_fp(self) -> None:
        """Keep a full-precision copy of the model as it is now (e.g. after rotation)."""
        self._fp_model = copy.deepcopy(self.model)
        set_quantization_enabled(self._fp_model, False)

    def fp_reference(self, upto=None) -> torch.nn.Module:
        """The full-precision model in the quantized model's basis (rotated, smoothing folded).

        The snapshot when one exists; a new snapshot when no weight is quantized yet; otherwise
        rebuilt: the model is reloaded and the steps before ``upto`` replay their
        function-preserving part on it (:meth:`StepConfig.replay_on_reference`).
        """
        if self._fp_model is not None:
            return self._fp_model
        if not self.weights_quantized():
            self.snapshot_fp()
            return self._fp_model
        logger.info("rebuilding the full-precision reference (rotations and smoothing replayed)")
        model, tok = load_hf_model(self.recipe.model, self.recipe.dtype, str(self.device))
        prepare_model(model, self.scheme)
        ref = Context(recipe=self.recipe, model=model, tokenizer=tok, device=self.device)
        for step in self.recipe.steps:
            if step is upto:
                break
            step.replay_on_reference(ref, self)
        set_quantization_enabled(model, False)
        self._fp_model = model
        return model

    def use_fp_reference(self, model: torch.nn.Module) -> None:
        """Give the run a full-precision reference built elsewhere (e.g. shared by several runs)."""
        self._fp_model = model

    def has_fp_reference(self) -> bool:
        return self._fp_model is not None

    def record(self, step: str, data: dict[str, Any]) -> None:
        self.results.setdefault(step, {}).update(data)
