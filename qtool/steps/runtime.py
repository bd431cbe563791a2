"""What a quantized model must still apply at run time, recorded in ``ctx.runtime``.

Steps that change the model's function in ways the weights alone do not carry (online
rotations, KV smoothing, ...) record a JSON-able entry under their name and register a handler
here that re-applies it to a freshly built model. ``export`` writes the entries to
``qtool.json``; the loader calls :func:`apply_runtime`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HANDLERS: dict[str, Callable[[Any, Any], None]] = {}


def runtime_handler(name: str):
    def wrap(fn):
        HANDLERS[name] = fn
        return fn

    return wrap


def apply_runtime(model, runtime: dict[str, Any]) -> None:
    from qtool.errors import QtoolError
    from qtool.steps import _load_builtin_steps

    _load_builtin_steps()
    for name, entry in runtime.items():
        if name not in HANDLERS:
            raise QtoolError(
                f"checkpoint needs runtime feature {name!r}, which this qtool does not know; upgrade qtool"
            )
        HANDLERS[name](model, entry)
