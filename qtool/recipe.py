"""Recipes: YAML -> validated, closed configuration; ``to_yaml()`` round-trips.

A recipe names the model, the calibration data, the quantization scheme (what is quantized,
with which grid) and an ordered list of steps (how the quantized values are found). Keys equal
field names and unknown keys fail with the line they are on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qtool.errors import RecipeError
from qtool.quant.quantizer import QSpec


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WeightScheme(Closed):
    """Static weight quantization of every targeted linear."""

    bits: int = Field(4, ge=2, le=8)
    symmetric: bool = True
    group_size: int | None = Field(None, ge=8, description="None = per output channel")
    ragged: bool = Field(
        False, description="allow a shorter last group when group_size does not divide the width"
    )

    def spec(self) -> QSpec:
        if self.group_size is None:
            return QSpec(self.bits, self.symmetric, "channel")
        return QSpec(self.bits, self.symmetric, "group", self.group_size, ragged=self.ragged)


class ActScheme(Closed):
    """Dynamic per-token symmetric quantization of the inputs of every targeted linear."""

    bits: int = Field(4, ge=2, le=8)
    clip_ratio: float = Field(1.0, gt=0.0, le=1.0)
    group_size: int | None = Field(None, ge=8, description="None = one scale per token")
    ragged: bool = Field(
        False, description="allow a shorter last group when group_size does not divide the width"
    )

    def spec(self) -> QSpec:
        if self.group_size is None:
            return QSpec(self.bits, True, "token", clip_ratio=self.clip_ratio)
        return QSpec(
            self.bits, True, "group", self.group_size, clip_ratio=self.clip_ratio, ragged=self.ragged
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


class Calibration(Closed):
    """Calibration samples: ``samples`` random windows of ``seq_len`` tokens (never the test split)."""

    dataset: str = Field("wikitext2", description="wikitext2, c4, or a local .jsonl/.txt/.parquet file")
    split: str = Field("auto", description="auto = train when available, else validation")
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: int = 0

    @field_validator("split")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if v == "test":
            raise ValueError(
                "calibrating on the test split would leak the evaluation data; use train or validation"
            )
        return v


class StepConfig(Closed):
    """Base class of every step's options; subclasses add their fields."""


class Recipe(Closed):
    model: str = Field("smollm2-135m", description="hub id, local HF folder, or smollm2-135m (embedded)")
    output: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the quantization math and in-memory model"
    )
    checkpoint_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of scales and unquantized tensors in the exported checkpoint"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    seed: int = 0
    calibration: Calibration = Field(default_factory=Calibration)
    scheme: Scheme = Field(default_factory=Scheme)
    steps: list[Any] = Field(default_factory=list)

    @field_validator("steps", mode="before")
    @classmethod
    def _parse_steps(cls, raw: Any) -> list[Any]:
        from qtool.steps import parse_step

        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ValueError("steps must be a list, e.g. [rtn, export]")
        return [s if isinstance(s, StepConfig) else parse_step(s, i) for i, s in enumerate(raw)]

    @model_validator(mode="after")
    def _check_consistency(self) -> Recipe:
        names = [step_name(s) for s in self.steps]
        if self.scheme.weights is not None and not {"rtn", "gptq", "lowrank", "bisup"} & set(names):
            raise ValueError("the scheme quantizes weights but no step does: add `rtn` or `gptq` to steps")
        if "export" in names and names.index("export") != len(names) - 1:
            raise ValueError("`export` must be the last step")
        return self

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"steps"})
        data["steps"] = [{step_name(s): s.model_dump(mode="json")} for s in self.steps]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def step_name(step: StepConfig) -> str:
    return type(step).step_name  # type: ignore[attr-defined]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, to point errors at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=True)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    loader.key_lines[id(mapping)] = lines
    return mapping


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> list:
    seq = yaml.SafeLoader.construct_sequence(loader, node, deep=True)
    loader.item_lines[id(seq)] = [item.start_mark.line + 1 for item in node.value]
    return seq


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _line_of(data: Any, path: tuple, loader: _LineLoader) -> int | None:
    """The line of the deepest element of ``path`` (keys and list indices) found in ``data``."""
    obj, line = data, None
    for part in path:
        if isinstance(obj, dict) and part in obj:
            line = loader.key_lines.get(id(obj), {}).get(part, line)
            obj = obj[part]
        elif isinstance(obj, list) and isinstance(part, int) and 0 <= part < len(obj):
            items = loader.item_lines.get(id(obj))
            line = items[part] if items else line
            obj = obj[part]
        else:
            break
    return line


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe text; errors name the key, its line and what is allowed."""
    loader = _LineLoader(text)
    loader.key_lines, loader.item_lines = {}, {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: malformed YAML: {exc}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with keys model, scheme, steps, ...")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = ".".join(str(p) for p in loc) or "(top level)"
            cause = (err.get("ctx") or {}).get("error")
            path = loc
            if getattr(cause, "index", None) is not None:  # a step's own error: steps[i].name.key
                path = ("steps", cause.index, cause.step, cause.key)
            line = _line_of(data, tuple(p for p in path if p is not None), loader)
            at = f" (line {line})" if line else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}; allowed keys: {_allowed_keys(loc)}"
            msgs.append(f"  {where}{at}: {msg}")
        raise RecipeError(f"{source}: invalid recipe\n" + "\n".join(msgs)) from None
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None


def _allowed_keys(loc: tuple) -> str:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or not isinstance(part, str):
            break
        field = model.model_fields.get(part)
        if field is None:
            model = _step_model(part)
            continue
        ann = field.annotation
        args = getattr(ann, "__args__", (ann,))
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return ", ".join(model.model_fields) if model else "see the README"


def _step_model(name: str) -> type[BaseModel] | None:
    from qtool.steps import STEPS

    return STEPS.get(name)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    return parse_recipe(path.read_text(), source=str(path))
