// Binding layer of the qtool CUDA extension: checks every tensor (dtype, device, shape,
// contiguity) with a TORCH_CHECK that says what to change, guards the device, dispatches on
// fp16 / bf16 and calls the launchers declared in qtool_kernels.h.
//
// Registration scheme: the op schemas are defined once in Python (qtool/ops/*.py, namespace
// "qtool", with the pure-PyTorch reference as the CompositeExplicitAutograd kernel). This file
// defines no schema; it only adds CUDA kernels with TORCH_LIBRARY_IMPL(qtool, CUDA, m), so the
// C++ signatures below must stay in step with the Python schema strings.
#include <optional>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "qtool_kernels.h"

namespace qtool {
namespace {

// ---- int4_matmul(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros=None, int group_size=-1)
at::Tensor int4_matmul_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t group_size) {
  constexpr const char* name = "qtool::int4_matmul (CUDA)";
  const at::Device device = x.device();
  check_cuda(x, name, "x", device);
  check_cuda(w_packed, name, "w_packed", device);
  check_cuda(scales, name, "scales", device);
  check_dtype(w_packed, at::kInt, name, "w_packed");
  check_dtype(scales, x.scalar_type(), name, "scales (same dtype as x)");
  TORCH_CHECK(x.dim() >= 1, name, ": x must have at least one dimension");
  TORCH_CHECK(w_packed.dim() == 2, name, ": w_packed must be int32 [N, ceil(K / 8)]");
  const int64_t K = x.size(-1), N = w_packed.size(0), KW = (K + 7) / 8;
  TORCH_CHECK(w_packed.size(1) == KW, name, ": w_packed has ", w_packed.size(1), " words per row, input width ",
              K, " needs ", KW);
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 32 == 0), name,
              ": group_size must be -1 (per channel) or a positive multiple of 32, got ", group_size);
  const int64_t G = group_size == -1 ? 1 : (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, name, ": scales must be [", N,
              ", ", G, "], got ", scales.sizes());
  const int32_t* zp = nullptr;
  if (zeros.has_value()) {
    check_cuda(*zeros, name, "zeros", device);
    check_dtype(*zeros, at::kInt, name, "zeros");
    TORCH_CHECK(zeros->dim() == 2 && zeros->size(0) == (N + 7) / 8 && zeros->size(1) == G, name,
                ": zeros must be int32 [", (N + 7) / 8, ", ", G, "] (packed along the output dim), got ",
                zeros->sizes());
    zp = zeros->data_ptr<int32_t>();
  }
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, name, ": sizes exceed int32 indexing");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();

  const c10::cuda::CUDAGuard guard(device);
  Int4MatmulArgs a{};
  a.x = x.data_ptr();
  a.w = w_packed.data_ptr<int32_t>();
  a.scales = scales.data_ptr();
  a.zeros = zp;
  a.out = out.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.KW = static_cast<int>(KW);
  a.G = static_cast<int>(G);
  a.group_size = group_size == -1 ? static_cast<int>(K) : static_cast<int>(group_size);
  a.vec = K % 32 == 0 && aligned16(x) && aligned16(w_packed);
  a.x_vec8 = K % 8 == 0 && aligned16(x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  QTOOL_DISPATCH_16BIT(x.scalar_type(), name,
                       check_launch(M <= kGemvMaxRows ? launch_int4_gemv<T>(a, stream)
                                                      : launch_int4_gemm_tc<T>(a, stream),
                                    name));
  return out;
}

// ---- quantize_act_int4(Tensor x, float clip_ratio=1.0, bool hadamard=False, bool pack=True)
std::tuple<at::Tensor, at::Tensor> quantize_act_int4_cuda(const at::Tensor& x, double clip_ratio, bool hadamard,
                                                          bool pack) {
  constexpr const char* name = "qtool::quantize_act_int4 (CUDA)";
  check_cuda(x, name, "x", x.device());
  TORCH_CHECK(x.dim() >= 1, name, ": x must have at least one dimension");
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, name, ": clip_ratio must be in (0, 1], got ", clip_ratio);
  const int64_t K = x.size(-1), KW = (K + 7) / 8, M = x.numel() / std::max<int64_t>(K, 1);
  TORCH_CHECK(K > 0 && K <= INT32_MAX && M <= INT32_MAX, name, ": bad input width ", K);
  if (hadamard) {
    TORCH_CHECK((K & (K - 1)) == 0 && K <= kMaxHadamard, name,
                ": the in-kernel Hadamard needs a power-of-two width <= ", kMaxHadamard, ", got ", K,
                "; rotate with qtool.algorithms.hadamard first and pass hadamard=False");
  }
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> code_shape = lead, scale_shape = lead;
  code_shape.push_back(pack ? KW : K);
  scale_shape.push_back(1);
  at::Tensor codes = at::empty(code_shape, x.options().dtype(pack ? at::kInt : at::kChar));
  at::Tensor scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (M == 0) return {codes, scales};

  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeActArgs a{};
  a.x = x.data_ptr();
  a.packed = pack ? codes.data_ptr<int32_t>() : nullptr;
  a.codes = pack ? nullptr : codes.data_ptr<int8_t>();
  a.scales = scales.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.K = static_cast<int>(K);
  a.KW = static_cast<int>(KW);
  a.clip_ratio = static_cast<float>(clip_ratio);
  a.hadamard = hadamard;
  a.hadamard_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(K)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  QTOOL_DISPATCH_16BIT(x.scalar_type(), name, check_launch(launch_quantize_act<T>(a, stream), name));
  return {codes, scales};
}

// ---- w4a4_matmul(Tensor x_codes, Tensor x_scales, Tensor w_packed, Tensor w_scales,
//                  Tensor? x=None, Tensor? lr_u=None, Tensor? lr_v=None)
at::Tensor w4a4_matmul_cuda(const at::Tensor& x_codes, const at::Tensor& x_scales, const at::Tensor& w_packed,
                            const at::Tensor& w_scales, const std::optional<at::Tensor>& x,
                            const std::optional<at::Tensor>& lr_u, const std::optional<at::Tensor>& lr_v) {
  constexpr const char* name = "qtool::w4a4_matmul (CUDA)";
  const at::Device device = x_codes.device();
  for (const auto& [t, arg] : {std::pair{&x_codes, "x_codes"}, {&x_scales, "x_scales"}, {&w_packed, "w_packed"},
                               {&w_scales, "w_scales"}}) {
    check_cuda(*t, name, arg, device);
  }
  check_dtype(x_codes, at::kInt, name, "x_codes (packed, from quantize_act_int4(..., pack=True))");
  check_dtype(w_packed, at::kInt, name, "w_packed");
  check_dtype(x_scales, at::kFloat, name, "x_scales");
  TORCH_CHECK(x_codes.dim() == 2 && w_packed.dim() == 2 && x_codes.size(1) == w_packed.size(1), name,
              ": x_codes [M, KW] and w_packed [N, KW] must share KW, got ", x_codes.sizes(), " and ",
              w_packed.sizes());
  const int64_t M = x_codes.size(0), N = w_packed.size(0), KW = x_codes.size(1);
  TORCH_CHECK(x_scales.numel() == M, name, ": x_scales must be [", M, ", 1], got ", x_scales.sizes());
  TORCH_CHECK(w_scales.numel() == N && w_scales.size(0) == N, name, ": w_scales must be [", N,
              ", 1] (symmetric per-channel weights), got ", w_scales.sizes());
  const bool low_rank = x.has_value() || lr_u.has_value() || lr_v.has_value();
  TORCH_CHECK(!low_rank || (x.has_value() && lr_u.has_value() && lr_v.has_value()), name,
              ": the low-rank term needs all of x [M, K], lr_u [N, r] and lr_v [K, r]");
  at::Tensor out = at::empty({M, N}, w_scales.options());
  if (M == 0 || N == 0) return out;

  const c10::cuda::CUDAGuard guard(device);
  W4A4Args a{};
  a.x = x_codes.data_ptr<int32_t>();
  a.x_scales = x_scales.data_ptr<float>();
  a.w = w_packed.data_ptr<int32_t>();
  a.w_scales = w_scales.data_ptr();
  a.out = out.data_ptr();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.KW = static_cast<int>(KW);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  QTOOL_DISPATCH_16BIT(w_scales.scalar_type(), name, check_launch(launch_w4a4_gemm<T>(a, stream), name));
  if (low_rank) {
    for (const auto& [t, arg] : {std::pair{&*x, "x"}, {&*lr_u, "lr_u"}, {&*lr_v, "lr_v"}}) {
      TORCH_CHECK(t->device() == device, name, ": ", arg, " is on ", t->device(), " but x_codes is on ", device);
    }
    TORCH_CHECK(x->dim() == 2 && x->size(0) == M && (x->size(1) + 7) / 8 == KW, name,
                ": x must be the unquantized input [", M, ", K], got ", x->sizes());
    TORCH_CHECK(lr_v->dim() == 2 && lr_u->dim() == 2 && lr_v->size(0) == x->size(1) && lr_u->size(0) == N &&
                    lr_u->size(1) == lr_v->size(1),
                name, ": lr_u must be [", N, ", r] and lr_v [", x->size(1), ", r], got ", lr_u->sizes(), " and ",
                lr_v->sizes());
    // (x @ V) @ U^T through cuBLAS, accumulated into the output in one rounding
    out.addmm_(at::mm(x->to(out.scalar_type()), lr_v->to(out.scalar_type())), lr_u->to(out.scalar_type()).t());
  }
  return out;
}

// ---- kv4_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) k_meta, Tensor(c!) v_cache,
//                 Tensor(d!) v_meta, Tensor lengths, int group_size=-1, float clip_ratio=1.0) -> ()
void kv4_append_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& k_meta,
                     const at::Tensor& v_cache, const at::Tensor& v_meta, const at::Tensor& lengths,
                     int64_t group_size, double clip_ratio) {
  constexpr const char* name = "qtool::kv4_append (CUDA)";
  const at::Device device = k.device();
  check_cuda(k, name, "k", device);
  check_cuda(v, name, "v", device);
  check_cuda(lengths, name, "lengths", device);
  check_dtype(v, k.scalar_type(), name, "v (same dtype as k)");
  check_dtype(lengths, at::kInt, name, "lengths");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), name, ": k and v must both be [B, H_kv, T, D], got ",
              k.sizes(), " and ", v.sizes());
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  TORCH_CHECK(D % 8 == 0 && D <= 256, name, ": head_dim must be a multiple of 8 and at most 256, got ", D);
  TORCH_CHECK(lengths.numel() == B, name, ": lengths must be int32 [", B, "]");
  check_cache(k_cache, k_meta, B, H, D, name, "k", device);
  check_cache(v_cache, v_meta, B, H, D, name, "v", device);
  const int64_t gs = (group_size <= 0 || group_size == D) ? D : group_size;
  const int64_t group_words = gs / 8;
  TORCH_CHECK(gs % 8 == 0 && D % gs == 0 && group_words <= 32 && (group_words & (group_words - 1)) == 0, name,
              ": group_size must be -1 or divide head_dim with group_size / 8 a power of two <= 32, got ",
              group_size);
  TORCH_CHECK(k_meta.size(3) == D / gs && v_meta.size(3) == D / gs, name, ": metas must hold ", D / gs,
              " groups per row for group_size ", group_size);
  TORCH_CHECK(clip_ratio > 0.0 && clip_ratio <= 1.0, name, ": clip_ratio must be in (0, 1], got ", clip_ratio);
  if (B * H * T == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  Kv4AppendArgs a{};
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.k_cache = k_cache.data_ptr<int32_t>();
  a.v_cache = v_cache.data_ptr<int32_t>();
  a.k_meta = reinterpret_cast<__half*>(k_meta.data_ptr<at::Half>());
  a.v_meta = reinterpret_cast<__half*>(v_meta.data_ptr<at::Half>());
  a.lengths = lengths.data_ptr<int32_t>();
  a.B = static_cast<int>(B);
  a.H = static_cast<int>(H);
  a.T = static_cast<int>(T);
  a.D = static_cast<int>(D);
  a.Tmax = static_cast<int>(k_cache.size(2));
  a.G = static_cast<int>(D / gs);
  a.clip_ratio = static_cast<float>(clip_ratio);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  QTOOL_DISPATCH_16BIT(k.scalar_type(), name, check_launch(launch_kv4_append<T>(a, stream), name));
}

// ---- kv4_attention_decode(Tensor q, Tensor k_new, Tensor v_new, Tensor k_cache, Tensor k_meta,
//        Tensor v_cache, Tensor v_meta, Tensor lengths, Tensor? k_pivot=None, Tensor? v_pivot=None,
//        int group_size=-1, float? softmax_scale=None) -> Tensor
at::Tensor kv4_attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                     const at::Tensor& k_cache, const at::Tensor& k_meta, const at::Tensor& v_cache,
                                     const at::Tensor& v_meta, const at::Tensor& lengths,
                                     const std::optional<at::Tensor>& k_pivot,
                                     const std::optional<at::Tensor>& v_pivot, int64_t group_size,
                                     std::optional<double> softmax_scale) {
  constexpr const char* name = "qtool::kv4_attention_decode (CUDA)";
  const at::Device device = q.device();
  check_cuda(q, name, "q", device);
  check_cuda(k_new, name, "k_new", device);
  check_cuda(v_new, name, "v_new", device);
  check_cuda(lengths, name, "lengths", device);
  check_dtype(k_new, q.scalar_type(), name, "k_new (same dtype as q)");
  check_dtype(v_new, q.scalar_type(), name, "v_new (same dtype as q)");
  check_dtype(lengths, at::kInt, name, "lengths");
  TORCH_CHECK(q.dim() == 4 && k_new.dim() == 4, name, ": q must be [B, H_q, Tq, D] and k_new [B, H_kv, Tq, D]");
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k_new.size(1);
  TORCH_CHECK(D == 64 || D == 128, name, ": head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, name, ": query heads ", Hq, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(k_new.size(0) == B && k_new.size(2) == Tq && k_new.size(3) == D && v_new.sizes() == k_new.sizes(),
              name, ": k_new and v_new must be [", B, ", ", Hkv, ", ", Tq, ", ", D, "]");
  TORCH_CHECK(lengths.numel() == B, name, ": lengths must be int32 [", B, "]");
  check_cache(k_cache, k_meta, B, Hkv, D, name, "k", device);
  check_cache(v_cache, v_meta, B, Hkv, D, name, "v", device);
  const int64_t G = k_meta.size(3);
  TORCH_CHECK(G > 0 && D % G == 0 && (D / G) % 8 == 0 && v_meta.size(3) == G, name,
              ": metas must hold G groups per row with head_dim / G a multiple of 8, got G = ", G);
  TORCH_CHECK(group_size <= 0 || D / group_size == G, name, ": group_size ", group_size, " does not match the ",
              G, " groups stored in k_meta");
  TORCH_CHECK(k_pivot.has_value() == v_pivot.has_value(), name, ": give both k_pivot and v_pivot, or neither");
  int64_t P = 0, Bp = 1;
  if (k_pivot.has_value()) {
    for (const at::Tensor* t : {&*k_pivot, &*v_pivot}) {
      check_cuda(*t, name, "pivot", device);
      check_dtype(*t, q.scalar_type(), name, "k_pivot / v_pivot (same dtype as q)");
      TORCH_CHECK(t->dim() == 4 && (t->size(0) == 1 || t->size(0) == B) && t->size(1) == Hkv && t->size(3) == D &&
                      t->sizes() == k_pivot->sizes(),
                  name, ": pivots must be [1 or ", B, ", ", Hkv, ", P, ", D, "], got ", t->sizes());
    }
    P = k_pivot->size(2);
    Bp = k_pivot->size(0);
  }
  at::Tensor out = at::empty_like(q);
  if (B * Hq * Tq == 0) return out;

  const c10::cuda::CUDAGuard guard(device);
  // splits: about two blocks per SM, at least 256 keys per split at full cache capacity
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()) == cudaSuccess, name,
              ": cannot query the SM count");
  const int64_t base_blocks = B * Hkv * kv4_decode_row_chunks(static_cast<int>(Hq), static_cast<int>(Hkv),
                                                              static_cast<int>(Tq));
  const int64_t max_keys = P + k_cache.size(2);
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>({(2 * sms + base_blocks - 1) / base_blocks, (max_keys + 255) / 256, 128}));
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o_part = at::empty({B, Hq, Tq, splits, D}, f32);
  at::Tensor m_part = at::empty({B, Hq, Tq, splits}, f32);
  at::Tensor l_part = at::empty({B, Hq, Tq, splits}, f32);

  Kv4DecodeArgs a{};
  a.q = q.data_ptr();
  a.k_new = k_new.data_ptr();
  a.v_new = v_new.data_ptr();
  a.k_cache = k_cache.data_ptr<int32_t>();
  a.v_cache = v_cache.data_ptr<int32_t>();
  a.k_meta = reinterpret_cast<const __half*>(k_meta.data_ptr<at::Half>());
  a.v_meta = reinterpret_cast<const __half*>(v_meta.data_ptr<at::Half>());
  a.lengths = lengths.data_ptr<int32_t>();
  a.k_pivot = P > 0 ? k_pivot->data_ptr() : nullptr;
  a.v_pivot = P > 0 ? v_pivot->data_ptr() : nullptr;
  a.o_part = o_part.data_ptr<float>();
  a.m_part = m_part.data_ptr<float>();
  a.l_part = l_part.data_ptr<float>();
  a.out = out.data_ptr();
  a.B = static_cast<int>(B);
  a.Hq = static_cast<int>(Hq);
  a.Hkv = static_cast<int>(Hkv);
  a.Tq = static_cast<int>(Tq);
  a.D = static_cast<int>(D);
  a.Tmax = static_cast<int>(k_cache.size(2));
  a.G = static_cast<int>(G);
  a.P = static_cast<int>(P);
  a.pivot_batched = Bp == B && B > 1 ? 1 : 0;
  a.num_splits = static_cast<int>(splits);
  a.softmax_scale = static_cast<float>(softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(D))));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  QTOOL_DISPATCH_16BIT(q.scalar_type(), name, check_launch(launch_kv4_decode<T>(a, stream), name));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qtool, CUDA, m) {
  m.impl("int4_matmul", &int4_matmul_cuda);
  m.impl("quantize_act_int4", &quantize_act_int4_cuda);
  m.impl("w4a4_matmul", &w4a4_matmul_cuda);
  m.impl("kv4_append", &kv4_append_cuda);
  m.impl("kv4_attention_decode", &kv4_attention_decode_cuda);
}

}  // namespace qtool

// A small Python module so that `import qtool_cuda` loads the library (and with it the
// registrations above); the ops themselves are reached through torch.ops.qtool.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qtool CUDA kernels: importing this registers CUDA implementations of torch.ops.qtool.*";
  m.def("ops", []() {
    return std::vector<std::string>{"int4_matmul", "quantize_act_int4", "w4a4_matmul", "kv4_append",
                                    "kv4_attention_decode"};
  });
}
