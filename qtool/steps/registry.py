"""The step registry: the options base class, ``register``, and parsing a recipe's step entries.

Imports nothing of qtool above ``qtool.config`` / ``qtool.errors``: the recipe validates its steps
through this module, and step modules register themselves into it. The built-in steps are
imported on first use of :func:`parse_step` (by name, so this module does not depend on them).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError

from qtool.config import Closed

STEPS: dict[str, type[StepConfig]] = {}


class StepConfig(Closed):
    """Base class of every step's options; subclasses add their fields and ``apply(ctx)``.

    ``quantizes_weights``: the step sets the quantized weights of the targeted linears (a recipe
    whose scheme quantizes weights needs one such step).
    """

    step_name: ClassVar[str] = ""
    quantizes_weights: ClassVar[bool] = False
    # the step can run layer-major over a model streamed from its shards (``--stream``):
    # stream_start (global part), stream_layer for each decoder layer in order, stream_end;
    # ``apply`` is the same three parts over the model in memory
    streams: ClassVar[bool] = False
    # the step needs the calibration stream (a LayerwiseRunner) in stream_layer
    needs_runner: ClassVar[bool] = False
    # the step changes tensors outside the decoder layers (embeddings, final norm, lm_head); when
    # none does, a streamed run keeps them in the checkpoint's dtype (less host memory)
    modifies_outer: ClassVar[bool] = False
    # under torchrun the step splits its calibration windows over ranks (or has none); otherwise
    # every rank runs it on all windows (same result on every rank, no speed-up)
    data_parallel: ClassVar[bool] = False

    def runs_data_parallel(self) -> bool:
        """Whether this configuration of the step splits its windows over ranks (``data_parallel``
        unless a step's option, e.g. ``kv_smooth``'s ``learn``, makes it run everywhere)."""
        return type(self).data_parallel

    def apply(self, ctx) -> None:  # pragma: no cover - every registered step overrides it
        raise NotImplementedError

    def stream_refusal(self) -> str | None:
        """Why this configuration of the step cannot stream (None when it can)."""
        if type(self).streams:
            return None
        return (
            f"step `{self.step_name}` cannot run on a streamed model yet (it needs the whole model or a "
            "second full-precision model); run without --stream (the model is then loaded into host "
            "memory whole)"
        )

    def stream_start(self, ctx) -> None:
        """The part before the first decoder layer (embeddings, head, run-time entries)."""

    def stream_layer(self, ctx, runner, i: int, layer) -> None:  # pragma: no cover
        raise NotImplementedError(f"`{self.step_name}` does not stream")

    def stream_end(self, ctx) -> None:
        """The part after the last decoder layer (records)."""

    def stream_fp_layer(self, ctx, i: int, layer) -> None:
        """Decoder layer ``i`` in full precision, in the quantized model's basis: called after the
        steps that change the basis (``rotate``) and before the first weight-quantizing step has
        touched it, for steps that read the full-precision model (``intactkv``'s pivot)."""

    def stream_extra(self, ctx, i: int, layer) -> dict:
        """Tensors of decoder layer ``i`` that go into a sidecar file rather than the weight shards
        (low-rank factors, pivot K/V); saved with the layer's resume state."""
        return {}

    def stream_restore(self, ctx, tensors: dict) -> None:
        """On ``--resume``: this step's :meth:`stream_extra` tensors of the finished layers, in order."""

    def stream_sidecar(self, ctx, tensors: dict, folder) -> str | None:
        """After the last layer: write the sidecar of the gathered :meth:`stream_extra` tensors into
        ``folder`` and return its run-time feature name (the writer then skips it), or prepare the
        model for the writer's own sidecar code and return None."""
        return None

    def replay_on_reference(self, ref_ctx, ctx) -> None:
        """Re-apply this step's function-preserving part to a freshly loaded full-precision model.

        :meth:`~qtool.steps.base.Context.fp_reference` calls it, in recipe order, for the steps
        before the one asking, when it has to rebuild the reference (``rotate`` rotates,
        ``kv_smooth`` folds its recorded smoothing); other steps change nothing.
        """


def step_name(step: StepConfig) -> str:
    return type(step).step_name


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
