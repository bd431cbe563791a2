// Fused quantize-and-append for the 4-bit KV cache. One thread per packed word (8 values of
// one (batch, head, token) row); the threads of one quantization group (group_size / 8 of them,
// a power of two <= 32, aligned inside a warp) share min / max through warp shuffles.
// Per group, as kv4_quantize (qtool/ops/kv4_attention.py):
//   xmin = min(x, 0) * clip, xmax = max(x, 0) * clip, scale = max((xmax - xmin) / 15, 1e-8),
//   zero = clamp(rint(-xmin / scale) - 8, -8, 7), stored scale s = fp16(max(scale, 2^-14)),
//   q = clamp(rint(x / s) + zero, -8, 7); written at position lengths[b] + t.
#include "../common.cuh"

namespace qtool {
namespace {

constexpr int kThreads = 256;
constexpr float kMinScale = 6.103515625e-05f;  // 2^-14, the smallest normal fp16

template <typename T>
__device__ __forceinline__ void quantize_word(const T* src, int group_words, float clip, uint32_t& word,
                                              __half& s16, float& zero) {
  float v[8];
  float mn = 0.f, mx = 0.f;  // the clamps min(., 0) / max(., 0) folded into the start values
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    v[j] = to_float(src[j]);
    mn = fminf(mn, v[j]);
    mx = fmaxf(mx, v[j]);
  }
  for (int off = group_words / 2; off > 0; off >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
  }
  const float xmin = mn * clip, xmax = mx * clip;
  const float scale = fmaxf((xmax - xmin) / 15.f, 1e-8f);
  zero = fminf(fmaxf(rintf(-xmin / scale) - 8.f, -8.f), 7.f);
  s16 = __float2half_rn(fmaxf(scale, kMinScale));
  const float s = __half2float(s16);
  word = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float q = fminf(fmaxf(rintf(v[j] / s) + zero, -8.f), 7.f);
    word |= static_cast<uint32_t>(static_cast<int>(q) + 8) << (4 * j);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kv4_append_kernel(const Kv4AppendArgs a, int group_words) {
  const int W = a.D / 8;
  const long long total = static_cast<long long>(a.B) * a.H * a.T * W;
  const long long idx = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  const bool valid = idx < total;
  const long long safe = valid ? idx : 0;  // out-of-range threads still join the shuffles
  const int w = static_cast<int>(safe % W);
  const long long row = safe / W;  // (b, h, t)
  const int t = static_cast<int>(row % a.T);
  const int h = static_cast<int>((row / a.T) % a.H);
  const int b = static_cast<int>(row / (static_cast<long long>(a.T) * a.H));
  const size_t src_off = static_cast<size_t>(row) * a.D + static_cast<size_t>(w) * 8;

  uint32_t kword, vword;
  __half ks, vs;
  float kz, vz;
  quantize_word(static_cast<const T*>(a.k) + src_off, group_words, a.clip_ratio, kword, ks, kz);
  quantize_word(static_cast<const T*>(a.v) + src_off, group_words, a.clip_ratio, vword, vs, vz);
  if (!valid) return;
  const int pos = a.lengths[b] + t;
  if (pos < 0 || pos >= a.Tmax) return;  // the Python side checks capacity before launching
  const size_t slot = (static_cast<size_t>(b) * a.H + h) * a.Tmax + pos;
  a.k_cache[slot * W + w] = static_cast<int32_t>(kword);
  a.v_cache[slot * W + w] = static_cast<int32_t>(vword);
  if (w % group_words == 0) {
    const size_t m = (slot * a.G + w / group_words) * 2;
    a.k_meta[m] = ks;
    a.k_meta[m + 1] = __float2half_rn(kz);
    a.v_meta[m] = vs;
    a.v_meta[m + 1] = __float2half_rn(vz);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_kv4_append(const Kv4AppendArgs& a, cudaStream_t stream) {
  const long long total = static_cast<long long>(a.B) * a.H * a.T * (a.D / 8);
  if (total == 0) return cudaSuccess;
  const int group_words = a.D / a.G / 8;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads);
  kv4_append_kernel<T><<<blocks, kThreads, 0, stream>>>(a, group_words);
  return cudaGetLastError();
}

template cudaError_t launch_kv4_append<__half>(const Kv4AppendArgs&, cudaStream_t);
template cudaError_t launch_kv4_append<__nv_bfloat16>(const Kv4AppendArgs&, cudaStream_t);

}  // namespace qtool
