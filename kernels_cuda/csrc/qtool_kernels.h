// Launch interface between the binding layer (bindings.cpp, compiled by the host compiler with
// the torch headers) and the CUDA kernels (*.cu, compiled by nvcc without the torch headers).
// Only plain pointers and sizes cross this boundary; every tensor is contiguous, row-major.
// T is __half or __nv_bfloat16; each launcher is explicitly instantiated for both in its .cu and
// returns cudaGetLastError() after its launches, which the binding turns into a TORCH_CHECK.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qtool {

// ---- W4A16: y[M, N] = x[M, K] @ ((q - z) * s)^T -------------------------------------------
struct Int4MatmulArgs {
  const void* x;          // [M, K] T
  const int32_t* w;       // [N, KW] packed int4 (qtool layout), KW = ceil(K / 8)
  const void* scales;     // [N, G] T
  const int32_t* zeros;   // [ceil(N / 8), G] int4 zero points packed along N, or nullptr
  void* out;              // [M, N] T
  int M, N, K, KW, G;
  int group_size;         // columns per group; K for per-channel (G == 1)
  bool vec;               // GEMV 128-bit loads: K % 32 == 0 and 16-byte aligned x and w
  bool x_vec8;            // MMA kernel 128-bit x loads: K % 8 == 0 and 16-byte aligned x
};
constexpr int kGemvMaxRows = 16;  // rows up to this use the GEMV kernel, more the MMA kernel
template <typename T> cudaError_t launch_int4_gemv(const Int4MatmulArgs& a, cudaStream_t stream);
template <typename T> cudaError_t launch_int4_gemm_tc(const Int4MatmulArgs& a, cudaStream_t stream);

// ---- W4A4: per-token activation quantization and int4 x int4 GEMM ----------------------------
struct QuantizeActArgs {
  const void* x;          // [M, K] T
  int32_t* packed;        // [M, KW] when pack, else nullptr
  int8_t* codes;          // [M, K] when !pack, else nullptr
  float* scales;          // [M]
  int M, K, KW;
  float clip_ratio;
  bool hadamard;          // K must be a power of two <= kMaxHadamard
  float hadamard_scale;   // float(1 / sqrt(K)), rounded once on the host like the reference
};
constexpr int kMaxHadamard = 32768;
template <typename T> cudaError_t launch_quantize_act(const QuantizeActArgs& a, cudaStream_t stream);

struct W4A4Args {
  const int32_t* x;       // [M, KW] packed activation codes
  const float* x_scales;  // [M]
  const int32_t* w;       // [N, KW] packed weight codes (symmetric)
  const void* w_scales;   // [N] T
  void* out;              // [M, N] T
  int M, N, KW;
};
template <typename T> cudaError_t launch_w4a4_gemm(const W4A4Args& a, cudaStream_t stream);

// ---- 4-bit KV cache ----------------------------------------------------------------------
struct Kv4AppendArgs {
  const void* k;          // [B, H, T, D] T
  const void* v;
  int32_t* k_cache;       // [B, H, Tmax, D / 8]
  int32_t* v_cache;
  __half* k_meta;         // [B, H, Tmax, G, 2] (scale, zero)
  __half* v_meta;
  const int32_t* lengths; // [B]
  int B, H, T, D, Tmax, G;
  float clip_ratio;
};
template <typename T> cudaError_t launch_kv4_append(const Kv4AppendArgs& a, cudaStream_t stream);

struct Kv4DecodeArgs {
  const void* q;          // [B, Hq, Tq, D] T
  const void* k_new;      // [B, Hkv, Tq, D] T
  const void* v_new;
  const int32_t* k_cache; // [B, Hkv, Tmax, D / 8]
  const int32_t* v_cache;
  const __half* k_meta;   // [B, Hkv, Tmax, G, 2]
  const __half* v_meta;
  const int32_t* lengths; // [B] past tokens before the Tq new ones
  const void* k_pivot;    // [Bp, Hkv, P, D] T or nullptr
  const void* v_pivot;
  float* o_part;          // [B, Hq, Tq, S, D] workspace
  float* m_part;          // [B, Hq, Tq, S]
  float* l_part;          // [B, Hq, Tq, S]
  void* out;              // [B, Hq, Tq, D] T
  int B, Hq, Hkv, Tq, D, Tmax, G, P;
  int pivot_batched;      // 1 when Bp == B, 0 when the prefix is shared (Bp == 1)
  int num_splits;
  float softmax_scale;
};
constexpr int kDecodeRowsPerBlock = 16;  // (query head, query) rows one block serves
// blocks per kv head: ceil((Hq / Hkv) * Tq / kDecodeRowsPerBlock)
__host__ __device__ inline int kv4_decode_row_chunks(int Hq, int Hkv, int Tq) {
  return ((Hq / Hkv) * Tq + kDecodeRowsPerBlock - 1) / kDecodeRowsPerBlock;
}
template <typename T> cudaError_t launch_kv4_decode(const Kv4DecodeArgs& a, cudaStream_t stream);

}  // namespace qtool
