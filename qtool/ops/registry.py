"""The ``qtool`` op namespace and which implementation of it runs.

Registration scheme (one name, two implementations):

* every op's schema is defined **once, in Python**, with ``torch.library`` under the namespace
  ``qtool`` (``torch.ops.qtool.<name>``); its pure-PyTorch ``*_ref`` twin is registered as the
  ``CompositeExplicitAutograd`` kernel, so it runs on CPU, CUDA or any other device, and a fake
  (meta) kernel is registered for tracing;
* the optional C++ extension ``qtool_cuda`` (``kernels_cuda/``) defines no schema: it only adds
  CUDA kernels for the same names with ``TORCH_LIBRARY_IMPL(qtool, CUDA, m)``. The dispatcher
  prefers a backend kernel over the composite one, so once the extension is imported, CUDA
  tensors run the kernels and everything else keeps running the references.

``QTOOL_OPS_BACKEND=reference`` keeps the extension from being imported (reference everywhere).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

NAMESPACE = "qtool"
EXTENSION = "qtool_cuda"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

_state: dict[str, object] = {"loaded": False, "module": None, "reason": "extension not loaded yet"}


def define_op(schema: str, ref: Callable, fake: Callable) -> None:
    """Define ``qtool::<schema>`` with ``ref`` as its default kernel and ``fake`` for meta."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, ref, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)


def load_extension(force: bool = False) -> bool:
    """Import ``qtool_cuda`` (registering its CUDA kernels) if possible; True when it loaded."""
    if _state["loaded"] and not force:
        return _state["module"] is not None
    _state["loaded"] = True
    if os.environ.get("QTOOL_OPS_BACKEND", "").lower() == "reference":
        _state["reason"] = "QTOOL_OPS_BACKEND=reference: the CUDA extension is not imported"
        return False
    try:
        _state["module"] = importlib.import_module(EXTENSION)
    except ImportError as exc:
        _state["module"] = None
        _state["reason"] = (
            f"{EXTENSION} is not importable ({exc}); build it with `make kernels` "
            "on a machine with nvcc and a CUDA build of torch"
        )
        logger.debug("qtool ops: %s", _state["reason"])
        return False
    _state["reason"] = f"{EXTENSION} loaded from {getattr(_state['module'], '__file__', '?')}"
    return True


def extension() -> object | None:
    """The imported ``qtool_cuda`` module, or None."""
    load_extension()
    return _state["module"]


def backend() -> str:
    """``"cuda"`` when CUDA tensors will run the qtool kernels, else ``"reference"``."""
    return backend_info()[0]


def backend_reason() -> str:
    """One sentence saying why :func:`backend` returned what it did."""
    return backend_info()[1]


def backend_info() -> tuple[str, str]:
    if not load_extension():
        return "reference", str(_state["reason"])
    if not torch.cuda.is_available():
        return "reference", f"{_state['reason']}, but no CUDA device is visible to torch"
    return "cuda", f"{_state['reason']}; CUDA tensors run its kernels ({torch.cuda.get_device_name()})"


def describe() -> str:
    """A line for logs and CLI output: ``qtool ops: <backend> (<reason>)``."""
    name, reason = backend_info()
    return f"qtool ops: {name} ({reason})"
