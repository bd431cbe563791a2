// W4A16 tensor-core GEMM for more than 16 rows: 64x64 output tiles, 4 warps of 32x32, K in
// steps of 32. Each step stages the activation tile and the *dequantized* weight tile (16-bit,
// (q - z) * s) in shared memory, then every warp runs mma.sync m16n8k16 with fp32 accumulators.
// A plain correct tiling (no cp.async pipeline, no ldmatrix): the GEMV kernel covers decode.
#include "../common.cuh"

namespace qtool {
namespace {

constexpr int BM = 64, BN = 64, BK = 32;
constexpr int LDS = BK + 8;  // row stride in 16-bit elements: 80 bytes, conflict-free fragments
constexpr int kThreads = 128;

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ void load_x_tile(const Int4MatmulArgs& a, uint16_t (*As)[LDS], int m0, int k0) {
  const T* x = static_cast<const T*>(a.x);
  const int row = threadIdx.x / 2;
  const int m = m0 + row;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = (threadIdx.x % 2) * 16 + h * 8;
    const int k = k0 + c;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (m < a.M && k < a.K) {
      const T* src = x + static_cast<size_t>(m) * a.K + k;
      if (a.x_vec8 && k + 8 <= a.K) {
        v = *reinterpret_cast<const uint4*>(src);
      } else {
        float f[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = (k + j < a.K) ? to_float(src[j]) : 0.f;
        v = make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
      }
    }
    *reinterpret_cast<uint4*>(&As[row][c]) = v;
  }
}

template <typename T>
__device__ __forceinline__ void load_w_tile(const Int4MatmulArgs& a, uint16_t (*Bs)[LDS], int n0, int k0) {
  const T* scales = static_cast<const T*>(a.scales);
  const int row = threadIdx.x / 2;
  const int n = n0 + row;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int wl = (threadIdx.x % 2) * 2 + h;  // word within the tile (8 columns each)
    const int wi = k0 / 8 + wl;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (n < a.N && wi < a.KW) {
      const uint32_t word = static_cast<uint32_t>(__ldg(a.w + static_cast<size_t>(n) * a.KW + wi));
      const int g = (wi * 8) / a.group_size;
      const float s = to_float(scales[static_cast<size_t>(n) * a.G + g]);
      const int z = zero_code(a.zeros, n, g, a.G);
      float f[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = static_cast<float>(nibble_code(word, j) - z) * s;
      v = make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
    }
    *reinterpret_cast<uint4*>(&Bs[row][wl * 8]) = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) int4_gemm_tc_kernel(const Int4MatmulArgs a) {
  __shared__ __align__(16) uint16_t As[BM][LDS];
  __shared__ __align__(16) uint16_t Bs[BN][LDS];
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp / 2, wn = warp % 2;
  const int gid = lane / 4, tig = lane % 4;
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  for (int k0 = 0; k0 < a.K; k0 += BK) {
    load_x_tile<T>(a, As, m0, k0);
    load_w_tile<T>(a, Bs, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = wm * 32 + mt * 16 + gid;
        af[mt][0] = lds32(&As[r][kk + tig * 2]);
        af[mt][1] = lds32(&As[r + 8][kk + tig * 2]);
        af[mt][2] = lds32(&As[r][kk + tig * 2 + 8]);
        af[mt][3] = lds32(&As[r + 8][kk + tig * 2 + 8]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int c = wn * 32 + nt * 8 + gid;
        bf[nt][0] = lds32(&Bs[c][kk + tig * 2]);
        bf[nt][1] = lds32(&Bs[c][kk + tig * 2 + 8]);
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt]);
    }
    __syncthreads();
  }

  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = m0 + wm * 32 + mt * 16 + gid + (e >= 2 ? 8 : 0);
        const int n = n0 + wn * 32 + nt * 8 + tig * 2 + (e & 1);
        if (m < a.M && n < a.N) out[static_cast<size_t>(m) * a.N + n] = from_float<T>(acc[mt][nt][e]);
      }
}

}  // namespace

template <typename T>
cudaError_t launch_int4_gemm_tc(const Int4MatmulArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + BN - 1) / BN, (a.M + BM - 1) / BM);
  int4_gemm_tc_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template cudaError_t launch_int4_gemm_tc<__half>(const Int4MatmulArgs&, cudaStream_t);
template cudaError_t launch_int4_gemm_tc<__nv_bfloat16>(const Int4MatmulArgs&, cudaStream_t);

}  // namespace qtool
