// W4A16 GEMV for 1..16 rows: each warp owns one output feature n, streams its packed int4 row
// with 128-bit loads (32 codes per lane per step), dequantizes in registers and accumulates
// every activation row in fp32; a warp reduction finishes each dot product.
#include "../common.cuh"

namespace qtool {
namespace {

constexpr int kGemvWarps = 4;

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t parts[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T* h = reinterpret_cast<const T*>(&parts[i]);
    v[2 * i] = to_float(h[0]);
    v[2 * i + 1] = to_float(h[1]);
  }
}

template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(kGemvWarps * kWarp) int4_gemv_kernel(const Int4MatmulArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kGemvWarps + threadIdx.x / kWarp;
  if (n >= a.N) return;  // uniform per warp
  const T* x = static_cast<const T*>(a.x);
  const T* srow = static_cast<const T*>(a.scales) + static_cast<size_t>(n) * a.G;
  const int32_t* wrow = a.w + static_cast<size_t>(n) * a.KW;
  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;

  if constexpr (VEC) {
    const int chunks = a.K / 32;  // K % 32 == 0 on this path
    for (int c = lane; c < chunks; c += kWarp) {
      const uint4 wv = __ldg(reinterpret_cast<const uint4*>(wrow) + c);
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
      const int k0 = c * 32;
      const int g = k0 / a.group_size;  // group_size % 32 == 0: one group per chunk
      const float s = to_float(srow[g]);
      const float zf = 8.f + static_cast<float>(zero_code(a.zeros, n, g, a.G));
      float wq[32];  // q - z for the 32 columns of this chunk
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) wq[i * 8 + j] = static_cast<float>((words[i] >> (4 * j)) & 0xFu) - zf;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < a.M) {
          const T* xr = x + static_cast<size_t>(r) * a.K + k0;
          float part = 0.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            float xv[8];
            load8(xr + 8 * i, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) part = fmaf(xv[j], wq[i * 8 + j], part);
          }
          acc[r] = fmaf(part, s, acc[r]);
        }
      }
    }
  } else {
    for (int wi = lane; wi < a.KW; wi += kWarp) {
      const uint32_t word = static_cast<uint32_t>(__ldg(wrow + wi));
      const int k0 = wi * 8;
      const int g = k0 / a.group_size;
      const float s = to_float(srow[g]);
      const float zf = 8.f + static_cast<float>(zero_code(a.zeros, n, g, a.G));
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < a.M) {
          const T* xr = x + static_cast<size_t>(r) * a.K;
          float part = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (k0 + j < a.K) {
              const float wv = static_cast<float>((word >> (4 * j)) & 0xFu) - zf;
              part = fmaf(to_float(xr[k0 + j]), wv, part);
            }
          }
          acc[r] = fmaf(part, s, acc[r]);
        }
      }
    }
  }

  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = warp_sum(acc[r]);
    if (lane == 0 && r < a.M) out[static_cast<size_t>(r) * a.N + n] = from_float<T>(v);
  }
}

template <typename T, int ROWS>
cudaError_t gemv_rows(const Int4MatmulArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + kGemvWarps - 1) / kGemvWarps);
  const dim3 block(kGemvWarps * kWarp);
  if (a.vec) {
    int4_gemv_kernel<T, ROWS, true><<<grid, block, 0, stream>>>(a);
  } else {
    int4_gemv_kernel<T, ROWS, false><<<grid, block, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_int4_gemv(const Int4MatmulArgs& a, cudaStream_t stream) {
  if (a.M <= 1) return gemv_rows<T, 1>(a, stream);
  if (a.M <= 2) return gemv_rows<T, 2>(a, stream);
  if (a.M <= 4) return gemv_rows<T, 4>(a, stream);
  if (a.M <= 8) return gemv_rows<T, 8>(a, stream);
  return gemv_rows<T, kGemvMaxRows>(a, stream);
}

template cudaError_t launch_int4_gemv<__half>(const Int4MatmulArgs&, cudaStream_t);
template cudaError_t launch_int4_gemv<__nv_bfloat16>(const Int4MatmulArgs&, cudaStream_t);

}  // namespace qtool
