"""qtool: post-training quantization of Llama-family LLMs (W4A4KV4 and friends)."""

__version__ = "0.1.0"

from qtool.errors import QtoolError  # noqa: E402

__all__ = ["QtoolError", "__version__"]
