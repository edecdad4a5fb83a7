// Attention of one new query per (row, head) over the first t cached positions: the decode step of
// short fixed-length records. PyTorch's scaled_dot_product_attention spends ~1-3 us of set-up per
// (row, head) at this size (a 1 x 32 query against <= 61 keys), more than the arithmetic; this loop
// keeps everything in registers and L1. Built on first use by factory/difflm/attention.py.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float bf2f(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {  // round to nearest even, like torch
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
struct F32 {
  using T = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static inline float load(uint16_t x) { return bf2f(x); }
  static inline uint16_t store(float x) { return f2bf(x); }
};

constexpr int64_t MAX_T = 1024;
constexpr int64_t LINE = 64;           // bytes per cache line
constexpr int64_t PREFETCH_AHEAD = 2;  // (row, head) pairs ahead whose cache rows are prefetched

// Row b, head h: q, k, v at q + b * q_stride + h * HD (likewise k, v). Writes k into K [BH, Tmax, HD]
// and v into V [BH, Tmax, HD] at position t - 1, then attends over positions [0, t): it reads 2 t
// contiguous HD-vectors per (row, head), never the unused tail of the cache (keys stored transposed,
// [HD, Tmax], touched a cache line per dimension whatever t: 1.5-3x slower at t <= 5, measured
// 2026-12-02). out [BH, HD]. Scores, softmax and the sum in float32.
template <typename P, int HD>
void attend(const typename P::T* q, const typename P::T* k, const typename P::T* v, int64_t q_stride,
            int64_t k_stride, int64_t v_stride, typename P::T* K, typename P::T* V, typename P::T* out, int64_t B,
            int64_t heads, int64_t Tmax, int64_t t, float scale) {
  alignas(64) float s[MAX_T];
  alignas(64) float acc[HD];
  for (int64_t i = 0; i < B * heads; ++i) {
    const int64_t b = i / heads, hh = i % heads;
    const typename P::T* qi = q + b * q_stride + hh * HD;
    const typename P::T* ki = k + b * k_stride + hh * HD;
    const typename P::T* vi = v + b * v_stride + hh * HD;
    typename P::T* Ki = K + i * Tmax * HD;
    typename P::T* Vi = V + i * Tmax * HD;
    if (i + PREFETCH_AHEAD < B * heads) {  // a later (row, head)'s cache rows [0, t): contiguous bytes
      const char* Kn = reinterpret_cast<const char*>(K + (i + PREFETCH_AHEAD) * Tmax * HD);
      const char* Vn = reinterpret_cast<const char*>(V + (i + PREFETCH_AHEAD) * Tmax * HD);
      const int64_t bytes = t * HD * static_cast<int64_t>(sizeof(typename P::T));
      for (int64_t off = 0; off < bytes; off += LINE) {
        __builtin_prefetch(Kn + off, 1, 3);  // for writing: position t - 1 is stored there
        __builtin_prefetch(Vn + off, 1, 3);
      }
    }
    for (int d = 0; d < HD; ++d) Ki[(t - 1) * HD + d] = ki[d];
    for (int d = 0; d < HD; ++d) Vi[(t - 1) * HD + d] = vi[d];
    alignas(64) float qscaled[HD];
#pragma omp simd
    for (int d = 0; d < HD; ++d) qscaled[d] = P::load(qi[d]) * scale;
    for (int64_t j = 0; j < t; ++j) {  // one key = HD contiguous values: one or two cache lines
      const typename P::T* kj = Ki + j * HD;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int d = 0; d < HD; ++d) a += qscaled[d] * P::load(kj[d]);
      s[j] = a;
    }
    float m = s[0];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < t; ++j) m = s[j] > m ? s[j] : m;
    float z = 0.f;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < t; ++j) {
      s[j] = expf(s[j] - m);
      z += s[j];
    }
#pragma omp simd
    for (int d = 0; d < HD; ++d) acc[d] = 0.f;
    for (int64_t j = 0; j < t; ++j) {
      const typename P::T* vj = Vi + j * HD;
      const float p = s[j];
#pragma omp simd
      for (int d = 0; d < HD; ++d) acc[d] += p * P::load(vj[d]);
    }
    const float inv = 1.f / z;
    typename P::T* o = out + i * HD;
    for (int d = 0; d < HD; ++d) o[d] = P::store(acc[d] * inv);
  }
}

template <typename P>
void dispatch(int64_t hd, const typename P::T* q, const typename P::T* k, const typename P::T* v, int64_t qs,
              int64_t ks, int64_t vs, typename P::T* K, typename P::T* V, typename P::T* out, int64_t B,
              int64_t heads, int64_t Tmax, int64_t t, float scale) {
  switch (hd) {
    case 16: return attend<P, 16>(q, k, v, qs, ks, vs, K, V, out, B, heads, Tmax, t, scale);
    case 32: return attend<P, 32>(q, k, v, qs, ks, vs, K, V, out, B, heads, Tmax, t, scale);
    case 64: return attend<P, 64>(q, k, v, qs, ks, vs, K, V, out, B, heads, Tmax, t, scale);
    case 128: return attend<P, 128>(q, k, v, qs, ks, vs, K, V, out, B, heads, Tmax, t, scale);
    default: TORCH_CHECK(false, "decode_attention: head dim must be 16, 32, 64 or 128, got ", hd);
  }
}

}  // namespace

// q, k, v [B, h * hd] (rows may be strided, columns contiguous); K and V [B, h, Tmax, hd]
// (contiguous); one dtype (float32 or bfloat16). Stores k, v at position t - 1 of the caches, then
// attends to positions [0, t). Returns [B, h * hd].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor K, torch::Tensor V,
                               int64_t t, double scale) {
  TORCH_CHECK(K.is_contiguous() && V.is_contiguous(), "decode_attention: contiguous caches");
  TORCH_CHECK(q.device().is_cpu(), "decode_attention: CPU tensors");
  for (auto* x : {&q, &k, &v}) {
    TORCH_CHECK(x->dim() == 2 && x->stride(1) == 1, "decode_attention: q, k, v [B, H] with contiguous rows");
    TORCH_CHECK(x->scalar_type() == K.scalar_type(), "decode_attention: one dtype");
  }
  TORCH_CHECK(V.scalar_type() == K.scalar_type() && V.dim() == 4 && K.dim() == 4, "decode_attention: caches");
  const int64_t B = V.size(0), h = V.size(1), Tmax = V.size(2), hd = V.size(3);
  TORCH_CHECK(K.sizes() == V.sizes(), "decode_attention: K and V must have one shape");
  for (auto* x : {&q, &k, &v}) TORCH_CHECK(x->size(0) == B && x->size(1) == h * hd, "decode_attention: q, k, v shape");
  TORCH_CHECK(t >= 1 && t <= Tmax && t <= MAX_T, "decode_attention: t out of range");
  auto out = torch::empty({B, h * hd}, q.options());
  if (q.scalar_type() == torch::kFloat32) {
    dispatch<F32>(hd, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), q.stride(0), k.stride(0),
                  v.stride(0), K.data_ptr<float>(), V.data_ptr<float>(), out.data_ptr<float>(), B, h, Tmax, t,
                  static_cast<float>(scale));
  } else if (q.scalar_type() == torch::kBFloat16) {
    auto p = [](torch::Tensor& x) { return reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()); };
    dispatch<BF16>(hd, p(q), p(k), p(v), q.stride(0), k.stride(0), v.stride(0), p(K), p(V), p(out), B, h, Tmax, t,
                   static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16, got ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
