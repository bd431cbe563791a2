"""Recipes: YAML -> validated, closed configuration; ``to_yaml()`` round-trips.

A recipe names the model, the calibration data, the quantization scheme (what is quantized,
with which grid) and an ordered list of steps (how the quantized values are found). Keys equal
field names and unknown keys fail with the line they are on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from qtool.config import Closed
from qtool.errors import RecipeError
from qtool.quant.scheme import PRESETS, ActScheme, KVScheme, Scheme, WeightScheme
from qtool.steps.registry import STEPS, StepConfig, parse_step, step_name

# re-exported: the recipe is where users (and tests) meet these names
__all__ = [
    "PRESETS",
    "ActScheme",
    "Calibration",
    "Closed",
    "KVScheme",
    "Recipe",
    "Scheme",
    "StepConfig",
    "WeightScheme",
    "load_recipe",
    "parse_recipe",
    "step_name",
]


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
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ValueError("steps must be a list, e.g. [rtn, export]")
        return [s if isinstance(s, StepConfig) else parse_step(s, i) for i, s in enumerate(raw)]

    @model_validator(mode="after")
    def _check_consistency(self) -> Recipe:
        names = [step_name(s) for s in self.steps]
        if self.scheme.weights is not None and not any(type(s).quantizes_weights for s in self.steps):
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
    return STEPS.get(name)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    return parse_recipe(path.read_text(), source=str(path))
