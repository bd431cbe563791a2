"""qtool's ``torch.library`` ops (namespace ``qtool``): pure-PyTorch defaults, CUDA when built.

Importing this package defines ``torch.ops.qtool.{int4_matmul, quantize_act_int4, w4a4_matmul,
kv4_append, kv4_attention_decode}`` and then tries to import the optional ``qtool_cuda``
extension, which registers CUDA kernels for the same names. ``backend()`` says which path CUDA
tensors take and ``backend_reason()`` why. Call the ops as ``torch.ops.qtool.<name>`` or through
the thin wrappers in the submodules (``qtool.ops.int4_matmul.int4_matmul``, ...).
"""

from qtool.ops import int4_matmul as _int4_matmul_mod  # noqa: F401  (defines the ops)
from qtool.ops import kv4_attention as _kv4_mod  # noqa: F401
from qtool.ops import w4a4 as _w4a4_mod  # noqa: F401
from qtool.ops.int4_matmul import dequantize_int4_weight, int4_matmul_ref, quantize_weight_int4
from qtool.ops.kv4_attention import (
    kv4_append_ref,
    kv4_attention_decode_ref,
    kv4_dequantize,
    kv4_quantize,
)
from qtool.ops.kv_cache import QuantizedKVCache
from qtool.ops.registry import backend, backend_info, backend_reason, describe, load_extension
from qtool.ops.w4a4 import quantize_act_int4, quantize_act_int4_ref, w4a4_linear, w4a4_matmul_ref

load_extension()

__all__ = [
    "QuantizedKVCache",
    "backend",
    "backend_info",
    "backend_reason",
    "dequantize_int4_weight",
    "describe",
    "int4_matmul_ref",
    "kv4_append_ref",
    "kv4_attention_decode_ref",
    "kv4_dequantize",
    "kv4_quantize",
    "quantize_act_int4",
    "quantize_act_int4_ref",
    "quantize_weight_int4",
    "w4a4_linear",
    "w4a4_matmul_ref",
]
