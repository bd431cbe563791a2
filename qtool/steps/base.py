"""The context a recipe's steps share: model, tokenizer, calibration data, results."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from qtool.data.datasets import calibration_windows
from qtool.models.loading import DTYPES
from qtool.recipe import Recipe

logger = logging.getLogger("qtool")


@dataclass
class Context:
    recipe: Recipe
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    results: dict[str, Any] = field(default_factory=dict)
    # what the runtime must still apply online, filled by `rotate`, saved by `export`
    runtime: dict[str, Any] = field(default_factory=dict)
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

    def snapshot_fp(self) -> None:
        """Keep a full-precision copy of the model as it is now (e.g. after rotation)."""
        self._fp_model = copy.deepcopy(self.model)
        from qtool.models.prepare import set_quantization_enabled

        set_quantization_enabled(self._fp_model, False)

    def fp_model(self) -> torch.nn.Module:
        """The full-precision reference (rotated when `rotate` ran; never quantized)."""
        if self._fp_model is None:
            raise RuntimeError("no full-precision snapshot: call snapshot_fp() before quantizing")
        return self._fp_model

    def record(self, step: str, data: dict[str, Any]) -> None:
        self.results.setdefault(step, {}).update(data)
