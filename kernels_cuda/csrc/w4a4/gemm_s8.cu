// W4A4 GEMM: packed int4 activations [M, KW] x packed int4 weights [N, KW]^T. Hopper and Ampere
// have no practical int4 tensor-core path here, so each 64x64x64 tile is unpacked to int8 in
// shared memory and multiplied with mma.sync m16n8k32 s8 x s8 -> s32 (exact integer sums). The
// epilogue applies the per-token activation scale and the per-channel weight scale in fp32.
#include "../common.cuh"

namespace qtool {
namespace {

constexpr int BM = 64, BN = 64, BK = 64;  // BK codes = 8 packed words per row
constexpr int LDS = BK + 16;              // row stride in bytes: 80, conflict-free fragments
constexpr int kThreads = 128;
constexpr uint32_t kZeroWord = 0x88888888u;  // eight nibbles of code 0

__device__ __forceinline__ uint32_t lds32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// int4 nibbles (code + 8) of one word -> eight int8 codes as two 32-bit registers
__device__ __forceinline__ uint2 unpack_s8(uint32_t word) {
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    lo |= static_cast<uint32_t>(static_cast<uint8_t>(nibble_code(word, j))) << (8 * j);
    hi |= static_cast<uint32_t>(static_cast<uint8_t>(nibble_code(word, j + 4))) << (8 * j);
  }
  return make_uint2(lo, hi);
}

// rows x 8 words starting at (r0, w0) -> int8 tile; each of the 128 threads unpacks 4 words
__device__ __forceinline__ void load_tile(const int32_t* src, int rows, int KW, int r0, int w0,
                                          int8_t (*dst)[LDS]) {
  const int row = threadIdx.x / 2;
  const int r = r0 + row;
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    const int wl = (threadIdx.x % 2) * 4 + h;
    const int wi = w0 + wl;
    const uint32_t word = (r < rows && wi < KW)
                              ? static_cast<uint32_t>(__ldg(src + static_cast<size_t>(r) * KW + wi))
                              : kZeroWord;
    *reinterpret_cast<uint2*>(&dst[row][wl * 8]) = unpack_s8(word);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) w4a4_gemm_kernel(const W4A4Args a) {
  __shared__ __align__(16) int8_t As[BM][LDS];
  __shared__ __align__(16) int8_t Bs[BN][LDS];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / 2, wn = warp % 2;
  const int gid = lane / 4, tig = lane % 4;
  int acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  for (int w0 = 0; w0 < a.KW; w0 += BK / 8) {
    load_tile(a.x, a.M, a.KW, m0, w0, As);
    load_tile(a.w, a.N, a.KW, n0, w0, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 32) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = wm * 32 + mt * 16 + gid;
        af[mt][0] = lds32(&As[r][kk + tig * 4]);
        af[mt][1] = lds32(&As[r + 8][kk + tig * 4]);
        af[mt][2] = lds32(&As[r][kk + 16 + tig * 4]);
        af[mt][3] = lds32(&As[r + 8][kk + 16 + tig * 4]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c = wn * 32 + nt * 8 + gid;
        bf[nt][0] = lds32(&Bs[c][kk + tig * 4]);
        bf[nt][1] = lds32(&Bs[c][kk + 16 + tig * 4]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_m16n8k32_s8(acc[mt][nt], af[mt], bf[nt]);
    }
    __syncthreads();
  }

  const T* w_scales = static_cast<const T*>(a.w_scales);
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm * 32 + mt * 16 + gid + (e >= 2 ? 8 : 0);
        const int n = n0 + wn * 32 + nt * 8 + tig * 2 + (e & 1);
        if (m < a.M && n < a.N) {
          const float y = static_cast<float>(acc[mt][nt][e]) * a.x_scales[m] * to_float(w_scales[n]);
          out[static_cast<size_t>(m) * a.N + n] = from_float<T>(y);
        }
      }
}

}  // namespace

template <typename T>
cudaError_t launch_w4a4_gemm(const W4A4Args& a, cudaStream_t stream) {
  const dim3 grid((a.N + BN - 1) / BN, (a.M + BM - 1) / BM);
  w4a4_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template cudaError_t launch_w4a4_gemm<__half>(const W4A4Args&, cudaStream_t);
template cudaError_t launch_w4a4_gemm<__nv_bfloat16>(const W4A4Args&, cudaStream_t);

}  // namespace qtool
