"""What is quantized: the recipe's ``scheme`` (weights, activations, KV cache, targets, presets).

Each part turns into the :class:`~qtool.quant.quantizer.QSpec` the quantizers use. It lives below
the recipe because a checkpoint's loader rebuilds the scheme from ``qtool.json`` without a recipe.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from qtool.config import Closed
from qtool.quant.quantizer import QSpec

GRID_DOC = (
    "symmetric scale: qmax = amax / 7 at 4 bits (the largest magnitude lands on a code); half_range = "
    "amax / 7.5 with codes in [-8, 7] (compressed-tensors' and llm-compressor's convention)"
)


class WeightScheme(Closed):
    """Static weight quantization of every targeted linear."""

    bits: int = Field(4, ge=2, le=8)
    symmetric: bool = True
    group_size: int | None = Field(None, ge=8, description="None = per output channel")
    ragged: bool = Field(
        False, description="allow a shorter last group when group_size does not divide the width"
    )
    clip_ratio: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="range = clip_ratio x min/max of each row or group (GPTQ's mse_clip searches below it)",
    )
    grid: Literal["qmax", "half_range"] = Field("qmax", description=GRID_DOC)

    def spec(self) -> QSpec:
        half = self.grid == "half_range"
        if self.group_size is None:
            return QSpec(self.bits, self.symmetric, "channel", clip_ratio=self.clip_ratio, half_range=half)
        return QSpec(
            self.bits,
            self.symmetric,
            "group",
            self.group_size,
            clip_ratio=self.clip_ratio,
            ragged=self.ragged,
            half_range=half,
        )

    @model_validator(mode="after")
    def _grid_needs_symmetric(self) -> WeightScheme:
        if self.grid == "half_range" and not self.symmetric:
            raise ValueError(
                "weights.grid: half_range is a symmetric grid; set symmetric: true or grid: qmax"
            )
        return self


class ActScheme(Closed):
    """Dynamic per-token symmetric quantization of the inputs of every targeted linear."""

    bits: int = Field(4, ge=2, le=8)
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)
    group_size: int | None = Field(None, ge=8, description="None = one scale per token")
    ragged: bool = Field(
        False, description="allow a shorter last group when group_size does not divide the width"
    )
    grid: Literal["qmax", "half_range"] = Field("qmax", description=GRID_DOC)

    def spec(self) -> QSpec:
        half = self.grid == "half_range"
        if self.group_size is None:
            return QSpec(self.bits, True, "token", clip_ratio=self.clip_ratio, half_range=half)
        return QSpec(
            self.bits,
            True,
            "group",
            self.group_size,
            clip_ratio=self.clip_ratio,
            ragged=self.ragged,
            half_range=half,
        )


class KVScheme(Closed):
    """Dynamic per-token KV-cache quantization (K after RoPE), per head or per group of head_dim."""

    bits: int = Field(4, ge=2, le=8)
    symmetric: bool = False
    group_size: int | None = Field(None, ge=8, description="None = one scale per token and head")
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)
    past_only: bool = Field(False, description="a token attends to its own K/V unquantized (WKVQuant)")

    def spec(self) -> QSpec:
        if self.group_size is None:
            return QSpec(self.bits, self.symmetric, "token", clip_ratio=self.clip_ratio)
        return QSpec(self.bits, self.symmetric, "group", self.group_size, clip_ratio=self.clip_ratio)


PRESETS: dict[str, dict[str, Any]] = {
    "W4A16": {"weights": {"bits": 4}},
    "W8A16": {"weights": {"bits": 8}},
    "W4A8": {"weights": {"bits": 4}, "activations": {"bits": 8}},
    "W8A8": {"weights": {"bits": 8}, "activations": {"bits": 8}},
    "W4A4": {"weights": {"bits": 4}, "activations": {"bits": 4}},
    "W4KV4": {"weights": {"bits": 4}, "kv_cache": {"bits": 4}},
    "W4A4KV4": {"weights": {"bits": 4}, "activations": {"bits": 4}, "kv_cache": {"bits": 4}},
    "W3A3": {"weights": {"bits": 3}, "activations": {"bits": 3}},
    "W3A3KV3": {"weights": {"bits": 3}, "activations": {"bits": 3}, "kv_cache": {"bits": 3}},
    "FP": {},
}


class Scheme(Closed):
    """What is quantized. ``preset`` fills in the parts; explicit keys override the preset's."""

    preset: str | None = None
    weights: WeightScheme | None = None
    activations: ActScheme | None = None
    kv_cache: KVScheme | None = None
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="decoder linears to quantize (lm_head and embeddings stay 16-bit)",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if isinstance(data, dict) and data.get("preset") is not None:
            name = str(data["preset"]).upper()
            if name not in PRESETS:
                raise ValueError(f"unknown preset {data['preset']!r}; known presets: {', '.join(PRESETS)}")
            merged: dict[str, Any] = {k: dict(v) for k, v in PRESETS[name].items()}
            for key, value in data.items():
                if key == "preset":
                    continue
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            merged["preset"] = name
            return merged
        return data

    def label(self) -> str:
        w = f"W{self.weights.bits}" if self.weights else "W16"
        a = f"A{self.activations.bits}" if self.activations else "A16"
        kv = f"KV{self.kv_cache.bits}" if self.kv_cache else ""
        return w + a + kv
