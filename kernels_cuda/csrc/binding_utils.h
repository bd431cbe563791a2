// Helpers of the binding layer (bindings.cpp): argument checks that say what to change, and the
// fp16 / bf16 dispatch onto the CUDA element types the launchers are instantiated for.
#pragma once

#include <cstdint>

#include <torch/extension.h>

#include "qtool_kernels.h"

namespace qtool {

#define QTOOL_DISPATCH_16BIT(DTYPE, NAME, ...)                                                  \
  switch (DTYPE) {                                                                            \
    case at::kHalf: {                                                                         \
      using T = __half;                                                                       \
      __VA_ARGS__;                                                                            \
      break;                                                                                  \
    }                                                                                         \
    case at::kBFloat16: {                                                                     \
      using T = __nv_bfloat16;                                                                \
      __VA_ARGS__;                                                                            \
      break;                                                                                  \
    }                                                                                         \
    default:                                                                                  \
      TORCH_CHECK(false, NAME, ": expected float16 or bfloat16, got ", DTYPE,                 \
                  " (the pure-PyTorch reference on CPU also accepts float32)");              \
  }

inline void check_launch(cudaError_t err, const char* name) {
  TORCH_CHECK(err == cudaSuccess, name, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline void check_cuda(const at::Tensor& t, const char* name, const char* arg, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, ": ", arg, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, name, ": ", arg, " is on ", t.device(), " but the input is on ", device,
              "; move all arguments to one device");
  TORCH_CHECK(t.is_contiguous(), name, ": ", arg, " must be contiguous (call .contiguous())");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name, const char* arg) {
  TORCH_CHECK(t.scalar_type() == want, name, ": ", arg, " must be ", want, ", got ", t.scalar_type());
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// a packed 4-bit KV cache int32 [B, H, T_max, D / 8] and its float16 meta [B, H, T_max, G, 2]
inline void check_cache(const at::Tensor& cache, const at::Tensor& meta, int64_t B, int64_t H, int64_t D,
                 const char* name, const char* which, const at::Device& device) {
  check_cuda(cache, name, which, device);
  check_cuda(meta, name, which, device);
  check_dtype(cache, at::kInt, name, "the packed caches");
  check_dtype(meta, at::kHalf, name, "the cache metas (scale, zero)");
  TORCH_CHECK(cache.dim() == 4 && cache.size(0) == B && cache.size(1) == H && cache.size(3) * 8 == D, name, ": ",
              which, " cache must be int32 [", B, ", ", H, ", T_max, ", D / 8, "], got ", cache.sizes());
  TORCH_CHECK(meta.dim() == 5 && meta.size(0) == B && meta.size(1) == H && meta.size(2) == cache.size(2) &&
                  meta.size(4) == 2,
              name, ": ", which, " meta must be float16 [", B, ", ", H, ", ", cache.size(2), ", G, 2], got ",
              meta.sizes());
}

}  // namespace qtool
