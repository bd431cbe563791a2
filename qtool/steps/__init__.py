"""Recipe steps, registered under their YAML name. Each module: config fields + ``apply(ctx)``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from qtool.recipe import StepConfig

STEPS: dict[str, type[StepConfig]] = {}


def register(name: str):
    """Class decorator: make a StepConfig subclass available in recipes as ``name``."""

    def wrap(cls: type[StepConfig]) -> type[StepConfig]:
        if name in STEPS:
            raise RuntimeError(f"step {name!r} registered twice")
        cls.step_name = name
        STEPS[name] = cls
        return cls

    return wrap


class StepError(ValueError):
    """A step's options are invalid; ``key`` names the offending key (for the line number)."""

    def __init__(self, message: str, index: int, step: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.index, self.step, self.key = index, step, key


def parse_step(raw: Any, index: int) -> StepConfig:
    """``rtn`` | ``{rtn: {...}}`` | ``{rtn: null}`` -> the step's validated config."""
    _load_builtin_steps()
    if isinstance(raw, str):
        name, options = raw, {}
    elif isinstance(raw, dict) and len(raw) == 1:
        name, options = next(iter(raw.items()))
        options = options or {}
    else:
        raise StepError(
            f"step {index + 1}: write a step as `name` or `name: {{options}}`, got {raw!r}", index
        )
    if name not in STEPS:
        raise StepError(
            f"step {index + 1}: unknown step {name!r}; known steps: {', '.join(sorted(STEPS))}", index
        )
    if not isinstance(options, dict):
        raise StepError(f"step {index + 1} `{name}`: options must be a mapping, got {options!r}", index, name)
    try:
        return STEPS[name].model_validate(options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {key!r}; allowed keys: {', '.join(STEPS[name].model_fields)}"
        else:
            msg = f"{key}: {err['msg']}"
        raise StepError(
            f"step {index + 1} `{name}`: {msg}", index, name, str(err["loc"][0]) if err["loc"] else None
        ) from None


_BUILTINS_LOADED = False


def _load_builtin_steps() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib

    for module in (
        "rtn",
        "export",
        "rotate",
        "clip_search",
        "gptq",
        "intactkv",
        "kv_smooth",
        "lowrank",
        "bisup",
    ):
        try:
            importlib.import_module(f"qtool.steps.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"qtool.steps.{module}":
                raise
