// Flash-decoding over the 4-bit KV cache with a 16-bit pivot prefix (IntactKV) and past-only
// quantization (the query's own K/V stay 16-bit).
//
// Split kernel: block (split, kv head x row chunk, batch) serves up to 16 (query head, query)
// rows of one kv head (GQA) and one slice of that sequence's keys: the key axis is
// [pivot (P) | cache positions 0 .. lengths[b] + Tq - 2], cut into num_splits equal slices per
// sequence (so ragged lengths balance themselves). Keys are dequantized into shared memory 32 at
// a time, scores and an online softmax run in fp32; split 0 also seeds each row with its own
// 16-bit key/value (the diagonal). Query i of the new tokens sees cache positions < lengths + i.
// Reduce kernel: combines the splits' (max, sum, unnormalized output) per row.
#include <cmath>

#include "../common.cuh"

namespace qtool {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kRows = kDecodeRowsPerBlock;  // 16
constexpr int kTile = 32;                   // keys per shared-memory tile

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) kv4_decode_split_kernel(const Kv4DecodeArgs a) {
  constexpr int W = D / 8;            // packed words per key row
  constexpr int kAcc = kRows * D / kThreads;  // output elements owned by each thread
  __shared__ float Qs[kRows][D];
  __shared__ float Ks[kTile][D + 1];  // +1: conflict-free column reads in the score loop
  __shared__ float Vs[kTile][D];
  __shared__ float Ps[kRows][kTile];
  __shared__ float row_m[kRows], row_l[kRows], row_alpha[kRows];

  const int split = blockIdx.x;
  const int chunks = kv4_decode_row_chunks(a.Hq, a.Hkv, a.Tq);
  const int hkv = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int b = blockIdx.z;
  const int rep = a.Hq / a.Hkv;
  const int rows = rep * a.Tq;  // rows of this kv head
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int len = a.lengths[b];
  const int total = a.P + len + a.Tq - 1;  // key axis length (the diagonal is separate)
  const int per = ((total + a.num_splits - 1) / a.num_splits + kTile - 1) / kTile * kTile;
  const int start = split * per;
  const int end = min(start + per, total);

  auto row_valid = [&](int r) { return chunk * kRows + r < rows; };
  auto row_head = [&](int r) { return hkv * rep + (chunk * kRows + r) / a.Tq; };
  auto row_query = [&](int r) { return (chunk * kRows + r) % a.Tq; };

  const T* q = static_cast<const T*>(a.q);
  for (int e = threadIdx.x; e < kRows * D; e += kThreads) {
    const int r = e / D, d = e % D;
    float v = 0.f;
    if (row_valid(r)) {
      const size_t off = ((static_cast<size_t>(b) * a.Hq + row_head(r)) * a.Tq + row_query(r)) * D + d;
      v = to_float(q[off]) * a.softmax_scale;
    }
    Qs[r][d] = v;
  }
  __syncthreads();

  // seed: split 0 starts every row from its own 16-bit key (score) and value
  const size_t new_base = (static_cast<size_t>(b) * a.Hkv + hkv) * a.Tq;
  const T* k_new = static_cast<const T*>(a.k_new);
  const T* v_new = static_cast<const T*>(a.v_new);
  for (int r = warp; r < kRows; r += kWarps) {
    float s = -INFINITY;
    if (split == 0 && row_valid(r)) {
      const T* kr = k_new + (new_base + row_query(r)) * D;
      float part = 0.f;
      for (int d = lane; d < D; d += kWarp) part = fmaf(Qs[r][d], to_float(kr[d]), part);
      s = warp_sum(part);
    }
    if (lane == 0) {
      row_m[r] = s;
      row_l[r] = s == -INFINITY ? 0.f : 1.f;
    }
  }
  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int e = threadIdx.x + i * kThreads, r = e / D, d = e % D;
    acc[i] = (split == 0 && row_valid(r)) ? to_float(v_new[(new_base + row_query(r)) * D + d]) : 0.f;
  }
  __syncthreads();

  const size_t cache_base = (static_cast<size_t>(b) * a.Hkv + hkv) * a.Tmax;
  const int group_cols = D / a.G;
  const size_t piv_base = (static_cast<size_t>(a.pivot_batched ? b : 0) * a.Hkv + hkv) * a.P;
  for (int j0 = start; j0 < end; j0 += kTile) {
    // K / V tile -> fp32 shared memory (pivot rows as they are, cache rows dequantized)
    for (int e = threadIdx.x; e < kTile * W; e += kThreads) {
      const int jj = e / W, w = e % W, key = j0 + jj;
      float kv[8], vv[8];
      if (key < end && key < a.P) {
        const T* kp = static_cast<const T*>(a.k_pivot) + (piv_base + key) * D + w * 8;
        const T* vp = static_cast<const T*>(a.v_pivot) + (piv_base + key) * D + w * 8;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          kv[c] = to_float(kp[c]);
          vv[c] = to_float(vp[c]);
        }
      } else if (key < end) {
        const size_t slot = cache_base + (key - a.P);
        const uint32_t kw = static_cast<uint32_t>(__ldg(a.k_cache + slot * W + w));
        const uint32_t vw = static_cast<uint32_t>(__ldg(a.v_cache + slot * W + w));
        const size_t m = (slot * a.G + (w * 8) / group_cols) * 2;
        const float ks = __half2float(a.k_meta[m]), kz = __half2float(a.k_meta[m + 1]);
        const float vs = __half2float(a.v_meta[m]), vz = __half2float(a.v_meta[m + 1]);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          kv[c] = (static_cast<float>(nibble_code(kw, c)) - kz) * ks;
          vv[c] = (static_cast<float>(nibble_code(vw, c)) - vz) * vs;
        }
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c) kv[c] = vv[c] = 0.f;
      }
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        Ks[jj][w * 8 + c] = kv[c];
        Vs[jj][w * 8 + c] = vv[c];
      }
    }
    __syncthreads();

    // scores: warp w takes rows w, w + 4, ...; lane = key within the tile
    for (int r = warp; r < kRows; r += kWarps) {
      const int key = j0 + lane;
      const bool visible = row_valid(r) && key < end && (key < a.P || key - a.P < len + row_query(r));
      float s = -INFINITY;
      if (visible) {
        float dot = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) dot = fmaf(Qs[r][d], Ks[lane][d], dot);
        s = dot;
      }
      // online softmax update of row r
      const float m_old = row_m[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      float p = 0.f, alpha = 1.f;
      if (m_new != -INFINITY) {
        p = s == -INFINITY ? 0.f : expf(s - m_new);
        alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
      }
      Ps[r][lane] = p;
      const float psum = warp_sum(p);
      if (lane == 0) {
        row_l[r] = row_l[r] * alpha + psum;
        row_m[r] = m_new;
        row_alpha[r] = alpha;
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      const int e = threadIdx.x + i * kThreads, r = e / D, d = e % D;
      float v = acc[i] * row_alpha[r];
#pragma unroll 8
      for (int jj = 0; jj < kTile; ++jj) v = fmaf(Ps[r][jj], Vs[jj][d], v);
      acc[i] = v;
    }
    __syncthreads();
  }

  // partial results: unnormalized output, running max and sum per (row, split)
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int e = threadIdx.x + i * kThreads, r = e / D, d = e % D;
    if (row_valid(r)) {
      const size_t row = (static_cast<size_t>(b) * a.Hq + row_head(r)) * a.Tq + row_query(r);
      a.o_part[(row * a.num_splits + split) * D + d] = acc[i];
    }
  }
  if (threadIdx.x < kRows && row_valid(threadIdx.x)) {
    const int r = threadIdx.x;
    const size_t row = (static_cast<size_t>(b) * a.Hq + row_head(r)) * a.Tq + row_query(r);
    a.m_part[row * a.num_splits + split] = row_m[r];
    a.l_part[row * a.num_splits + split] = row_l[r];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kv4_decode_reduce_kernel(const Kv4DecodeArgs a) {
  const size_t row = blockIdx.x;  // (b, hq, i)
  const int S = a.num_splits;
  const float* m = a.m_part + row * S;
  const float* l = a.l_part + row * S;
  float m_max = -INFINITY;
  for (int s = 0; s < S; ++s) m_max = fmaxf(m_max, m[s]);  // finite: split 0 holds the diagonal
  float denom = 0.f;
  for (int s = 0; s < S; ++s) denom += m[s] == -INFINITY ? 0.f : l[s] * expf(m[s] - m_max);
  T* out = static_cast<T*>(a.out);
  for (int d = threadIdx.x; d < a.D; d += kThreads) {
    float v = 0.f;
    for (int s = 0; s < S; ++s) {
      if (m[s] != -INFINITY) v = fmaf(a.o_part[(row * S + s) * a.D + d], expf(m[s] - m_max), v);
    }
    out[row * a.D + d] = from_float<T>(v / denom);
  }
}

template <typename T, int D>
cudaError_t launch_d(const Kv4DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.num_splits, a.Hkv * kv4_decode_row_chunks(a.Hq, a.Hkv, a.Tq), a.B);
  kv4_decode_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned rows = static_cast<unsigned>(a.B) * a.Hq * a.Tq;
  kv4_decode_reduce_kernel<T><<<rows, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_kv4_decode(const Kv4DecodeArgs& a, cudaStream_t stream) {
  if (a.D == 64) return launch_d<T, 64>(a, stream);
  if (a.D == 128) return launch_d<T, 128>(a, stream);
  return cudaErrorInvalidValue;  // the binding only accepts head_dim 64 or 128
}

template cudaError_t launch_kv4_decode<__half>(const Kv4DecodeArgs&, cudaStream_t);
template cudaError_t launch_kv4_decode<__nv_bfloat16>(const Kv4DecodeArgs&, cudaStream_t);

}  // namespace qtool
