// Per-token symmetric int4 activation quantization, one block per token:
//   optional orthonormal Hadamard rotation (power-of-two K, in shared memory, fp32 butterflies
//   in the same stage order as qtool.algorithms.hadamard, then one multiply by 1/sqrt(K)),
//   amax over the row, scale = clip * amax / 7 (>= 1e-8), q = clamp(rint(x / scale), -8, 7),
//   written as packed int4 words (qtool layout, ragged tail = code 0) or as int8 codes.
// Matches quantize_act_int4_ref (quantizer.compute_qparams + quantize, round half to even).
#include "../common.cuh"

namespace qtool {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_max(float v, float* red) {
  v = warp_max(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / kWarp ? red[lane] : 0.f;
    v = warp_max(v);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

template <typename T, bool HAD>
__global__ void __launch_bounds__(kThreads) quantize_act_kernel(const QuantizeActArgs a) {
  extern __shared__ float buf[];  // K floats when HAD
  __shared__ float red[kThreads / kWarp];
  const int row = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + static_cast<size_t>(row) * a.K;

  float amax = 0.f;
  if constexpr (HAD) {
    for (int i = threadIdx.x; i < a.K; i += kThreads) buf[i] = to_float(x[i]);
    __syncthreads();
    // Sylvester-ordered fast Walsh-Hadamard transform: K / 2 butterflies per stage
    for (int h = 1; h < a.K; h <<= 1) {
      for (int i = threadIdx.x; i < a.K / 2; i += kThreads) {
        const int j = (i / h) * 2 * h + (i % h);
        const float u = buf[j], w = buf[j + h];
        buf[j] = u + w;
        buf[j + h] = u - w;
      }
      __syncthreads();
    }
    const float norm = a.hadamard_scale;
    for (int i = threadIdx.x; i < a.K; i += kThreads) {
      const float v = buf[i] * norm;
      buf[i] = v;
      amax = fmaxf(amax, fabsf(v));
    }
  } else {
    for (int i = threadIdx.x; i < a.K; i += kThreads) amax = fmaxf(amax, fabsf(to_float(x[i])));
  }
  amax = block_max(amax, red);  // also orders the buf writes above before the reads below
  const float scale = fmaxf(amax * a.clip_ratio / 7.f, 1e-8f);
  if (threadIdx.x == 0) a.scales[row] = scale;

  auto value = [&](int k) -> float {
    if constexpr (HAD) return buf[k];
    else return to_float(x[k]);
  };
  auto code = [&](int k) -> int { return static_cast<int>(fminf(fmaxf(rintf(value(k) / scale), -8.f), 7.f)); };

  if (a.packed != nullptr) {
    int32_t* dst = a.packed + static_cast<size_t>(row) * a.KW;
    for (int wi = threadIdx.x; wi < a.KW; wi += kThreads) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int k = wi * 8 + j;
        const int q = k < a.K ? code(k) : 0;
        word |= static_cast<uint32_t>(q + 8) << (4 * j);
      }
      dst[wi] = static_cast<int32_t>(word);
    }
  } else {
    int8_t* dst = a.codes + static_cast<size_t>(row) * a.K;
    for (int k = threadIdx.x; k < a.K; k += kThreads) dst[k] = static_cast<int8_t>(code(k));
  }
}

template <typename T, bool HAD>
cudaError_t launch(const QuantizeActArgs& a, cudaStream_t stream) {
  const size_t smem = HAD ? static_cast<size_t>(a.K) * sizeof(float) : 0;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(quantize_act_kernel<T, HAD>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  quantize_act_kernel<T, HAD><<<a.M, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_quantize_act(const QuantizeActArgs& a, cudaStream_t stream) {
  return a.hadamard ? launch<T, true>(a, stream) : launch<T, false>(a, stream);
}

template cudaError_t launch_quantize_act<__half>(const QuantizeActArgs&, cudaStream_t);
template cudaError_t launch_quantize_act<__nv_bfloat16>(const QuantizeActArgs&, cudaStream_t);

}  // namespace qtool
