// The decode step of short fixed-length records, fused where PyTorch's per-op cost exceeds the work:
// - attention of one new query per (row, head) over the first t cached positions, with the rotary
//   embedding of q and k applied on the way in. PyTorch's scaled_dot_product_attention spends ~1-3 us
//   of set-up per (row, head) at this size (a 1 x 32 query against <= 61 keys), more than the
//   arithmetic; this loop keeps everything in registers and L1;
// - the residual add + RMSNorm, and SiLU(gate) * up: each a pass over [B, H] instead of the 5-9 aten
//   ops (and their float32 copies) of transformers' LlamaRMSNorm and MLP.
// Every elementwise result is rounded to the model dtype where PyTorch rounds it (bf16 after each
// op), so the step stays transformers' LlamaDecoderLayer op for op; only float32 reductions (the
// RMS mean, exp inside SiLU) may differ from PyTorch's in the last bit. Built on first use by
// factory/difflm/fused.py.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <tuple>
#include <type_traits>
#include <vector>

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
// exp and log as branch-free polynomials (Cephes' expf / logf, ~1 ulp), so the loops that call them
// vectorize: libm's expf / logf are calls GCC cannot vectorize without OpenMP's libmvec, and were
// 70% of SiLU's and the Gumbel noise's time.
inline float exp_poly(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}
inline float log_poly(float x) {  // x > 0 normal, or 0 (-> -inf)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  float e = static_cast<float>(static_cast<int32_t>(u >> 23) - 126);
  u = (u & 0x007fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &u, 4);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  const float out = m + y + 0.693359375f * e;
  return x > 0.f ? out : -INFINITY;
}

struct F32 {
  using T = float;
  static inline float load(float x) { return x; }
  static inline float store(float x) { return x; }
  static inline float round(float x) { return x; }
};
struct BF16 {
  using T = uint16_t;
  static inline float load(uint16_t x) { return bf2f(x); }
  static inline uint16_t store(float x) { return f2bf(x); }
  static inline float round(float x) { return bf2f(f2bf(x)); }  // what a bf16 tensor op stores
};

constexpr int64_t MAX_T = 1024;
constexpr int64_t LINE = 64;           // bytes per cache line
constexpr int64_t PREFETCH_AHEAD = 2;  // (row, head) pairs ahead whose cache rows are prefetched

// The position's rotary embedding, as transformers applies it: x * cos + rotate_half(x) * sin, each
// product and the sum rounded to the model dtype.
template <typename P, int HD>
struct Rotary {
  alignas(64) float c[HD], sn[HD];
  Rotary(const typename P::T* cos, const typename P::T* sin) {
    for (int d = 0; d < HD; ++d) c[d] = P::load(cos[d]), sn[d] = P::load(sin[d]);
  }
  void apply(const typename P::T* x, float* out) const {
    constexpr int HALF = HD / 2;
#pragma omp simd
    for (int d = 0; d < HD; ++d) {
      const float xr = d < HALF ? -P::load(x[d + HALF]) : P::load(x[d - HALF]);
      out[d] = P::round(P::round(P::load(x[d]) * c[d]) + P::round(xr * sn[d]));
    }
  }
};

// s[0, t) <- exp(s - max s), in place; returns their sum.
inline float softmax_numerators(float* s, int64_t t) {
  float m = s[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < t; ++j) m = s[j] > m ? s[j] : m;
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < t; ++j) {
    s[j] = exp_poly(s[j] - m);
    z += s[j];
  }
  return z;
}

// Row b, head h: q, k, v at q + b * stride + h * HD (likewise k, v), before the rotary embedding.
// Rotates q and k by the position's cos, sin [HD] as transformers does (q * cos + rotate_half(q) * sin,
// each product and the sum rounded to the model dtype), writes the rotated k into K [BH, Tmax, HD]
// and v into V [BH, Tmax, HD] at position t - 1, then attends over positions [0, t): it reads 2 t
// contiguous HD-vectors per (row, head), never the unused tail of the cache (keys stored transposed,
// [HD, Tmax], touched a cache line per dimension whatever t: 1.5-3x slower at t <= 5, measured
// 2026-12-02). out [BH, HD]. Scores, softmax and the sum in float32.
template <typename P, int HD>
void attend(const typename P::T* q, const typename P::T* k, const typename P::T* v, int64_t stride,
            const typename P::T* cos, const typename P::T* sin,
            typename P::T* K, typename P::T* V, typename P::T* out, int64_t B, int64_t heads, int64_t Tmax,
            int64_t t, float scale) {
  alignas(64) float s[MAX_T];
  alignas(64) float acc[HD];
  const Rotary<P, HD> rotary(cos, sin);
  for (int64_t i = 0; i < B * heads; ++i) {
    const int64_t b = i / heads, hh = i % heads;
    const int64_t at = b * stride + hh * HD;  // row b, head hh of q, k and v
    const typename P::T* qi = q + at;
    const typename P::T* ki = k + at;
    const typename P::T* vi = v + at;
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
    alignas(64) float qscaled[HD], kr[HD];
    rotary.apply(ki, kr);
    for (int d = 0; d < HD; ++d) Ki[(t - 1) * HD + d] = P::store(kr[d]);
    for (int d = 0; d < HD; ++d) Vi[(t - 1) * HD + d] = vi[d];
    rotary.apply(qi, qscaled);
#pragma omp simd
    for (int d = 0; d < HD; ++d) qscaled[d] *= scale;
    for (int64_t j = 0; j < t; ++j) {  // one key = HD contiguous values: one or two cache lines
      const typename P::T* kj = Ki + j * HD;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int d = 0; d < HD; ++d) a += qscaled[d] * P::load(kj[d]);
      s[j] = a;
    }
    const float z = softmax_numerators(s, t);
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

// ---- attention over an int8 cache ------------------------------------------------------------
// The float cache above is read in full at every step: ~128 bytes per cached key and head in bf16,
// the bound of the whole decode loop at 2,000 rows (its caches do not fit in a core's L2). Here
// each cached k and v is stored as int8 with one float scale (its absolute maximum / 127): ~72
// bytes. Keys are stored in tiles of 16 positions, [Tmax / 16, HD, 16], so 16 scores are 16 lanes
// of one vector and a score needs no horizontal sum; values stay [Tmax, HD].
typedef float v16 __attribute__((vector_size(64)));
constexpr int LANES = 16;

inline v16 load_i8(const int8_t* p) {  // 16 int8 -> 16 floats
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  const __m256 hi =
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  const struct { __m256 a, b; } f = {lo, hi};
#else
  float f[LANES];
  for (int l = 0; l < LANES; ++l) f[l] = static_cast<float>(p[l]);
#endif
  v16 r;
  std::memcpy(&r, &f, sizeof(r));
  return r;
}

// x [n] float -> int8 q [n] (at stride `step`) and the scale: x ~ q * scale.
inline float quantize(const float* x, int n, int8_t* q, int step) {
  float amax = 0.f;
#pragma omp simd reduction(max : amax)
  for (int d = 0; d < n; ++d) amax = std::fabs(x[d]) > amax ? std::fabs(x[d]) : amax;
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  for (int d = 0; d < n; ++d) q[d * step] = static_cast<int8_t>(std::nearbyint(x[d] / scale));
  return scale;
}

// As `attend`, over the int8 cache: Kq [BH, Tmax / 16, HD, 16] and Ks [BH, Tmax] (keys, scales),
// Vq [BH, Tmax, HD] and Vs [BH, Tmax] (values, scales); Tmax a multiple of 16.
template <typename P, int HD>
void attend_q8(const typename P::T* q, const typename P::T* k, const typename P::T* v, int64_t stride,
               const typename P::T* cos, const typename P::T* sin, int8_t* Kq, float* Ks, int8_t* Vq, float* Vs,
               typename P::T* out, int64_t B, int64_t heads, int64_t Tmax, int64_t t, float scale) {
  static_assert(HD % LANES == 0, "head dim: a multiple of 16");
  constexpr int NV = HD / LANES;
  alignas(64) float s[MAX_T];
  alignas(64) float qr[HD], kr[HD], vr[HD];
  const Rotary<P, HD> rotary(cos, sin);
  const int64_t tiles = (t + LANES - 1) / LANES, tile_bytes = HD * LANES;
  const int64_t j = t - 1;  // the new position
  for (int64_t i = 0; i < B * heads; ++i) {
    const int64_t b = i / heads, hh = i % heads;
    int8_t* Ki = Kq + i * Tmax * HD;
    int8_t* Vi = Vq + i * Tmax * HD;
    float* Ksi = Ks + i * Tmax;
    float* Vsi = Vs + i * Tmax;
    if (i + PREFETCH_AHEAD < B * heads) {  // a later (row, head)'s cache: the tiles and rows [0, t)
      const char* Kn = reinterpret_cast<const char*>(Ki + PREFETCH_AHEAD * Tmax * HD);
      const char* Vn = reinterpret_cast<const char*>(Vi + PREFETCH_AHEAD * Tmax * HD);
      for (int64_t off = 0; off < tiles * tile_bytes; off += LINE) __builtin_prefetch(Kn + off, 1, 3);
      for (int64_t off = 0; off < t * HD; off += LINE) __builtin_prefetch(Vn + off, 1, 3);
      __builtin_prefetch(Ksi + PREFETCH_AHEAD * Tmax, 1, 3);
      __builtin_prefetch(Vsi + PREFETCH_AHEAD * Tmax, 1, 3);
    }
    const int64_t off = b * stride + hh * HD;
    rotary.apply(k + off, kr);
    Ksi[j] = quantize(kr, HD, Ki + (j / LANES) * tile_bytes + j % LANES, LANES);
#pragma omp simd
    for (int d = 0; d < HD; ++d) vr[d] = P::load(v[off + d]);
    Vsi[j] = quantize(vr, HD, Vi + j * HD, 1);
    rotary.apply(q + off, qr);
    for (int64_t tt = 0; tt < tiles; ++tt) {  // 16 scores per tile: one FMA per dimension
      const int8_t* tile = Ki + tt * tile_bytes;
      v16 acc = {};
      for (int d = 0; d < HD; ++d) acc += (qr[d] * scale) * load_i8(tile + d * LANES);
      v16 ks;
      std::memcpy(&ks, Ksi + tt * LANES, sizeof(ks));
      acc *= ks;
      std::memcpy(s + tt * LANES, &acc, sizeof(acc));
    }
    const float z = softmax_numerators(s, t);
#pragma omp simd
    for (int64_t jj = 0; jj < t; ++jj) s[jj] *= Vsi[jj];  // the value's scale, folded into its weight
    v16 acc[NV] = {};
    for (int64_t jj = 0; jj < t; ++jj) {
      const int8_t* vj = Vi + jj * HD;
      for (int w = 0; w < NV; ++w) acc[w] += s[jj] * load_i8(vj + w * LANES);
    }
    const float inv = 1.f / z;
    alignas(64) float o[HD];
    for (int w = 0; w < NV; ++w) {
      const v16 r = acc[w] * inv;
      std::memcpy(o + w * LANES, &r, sizeof(r));
    }
    typename P::T* oi = out + i * HD;
    for (int d = 0; d < HD; ++d) oi[d] = P::store(o[d]);
  }
}

// Rows of x [B, H] (row stride xs; plus d, the residual branch, if given): x + d rounded to the
// model dtype (stored in xo if given), then transformers' LlamaRMSNorm: in float32,
// x * rsqrt(mean(x^2) + eps), rounded to the model dtype, times the weight w [H] (rounded again).
template <typename P>
void rms_rows(const typename P::T* x, int64_t xs, const typename P::T* d, int64_t ds, const typename P::T* w,
              typename P::T* xo, typename P::T* out, int64_t B, int64_t H, float eps) {
  std::vector<float> buf(H), wf(H);
  for (int64_t j = 0; j < H; ++j) wf[j] = P::load(w[j]);
  for (int64_t b = 0; b < B; ++b) {
    const typename P::T* xb = x + b * xs;
    float ss = 0.f;
    if (d) {
      const typename P::T* db = d + b * ds;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) {
        buf[j] = P::round(P::load(xb[j]) + P::load(db[j]));
        ss += buf[j] * buf[j];
      }
      typename P::T* xob = xo + b * H;
      for (int64_t j = 0; j < H; ++j) xob[j] = P::store(buf[j]);
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) {
        buf[j] = P::load(xb[j]);
        ss += buf[j] * buf[j];
      }
    }
    const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    typename P::T* ob = out + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) ob[j] = P::store(wf[j] * P::round(buf[j] * r));
  }
}

// gu [B, 2 I] (gate then up, rows contiguous) -> out [B, I] = silu(gate) * up, each rounded to the
// model dtype as F.silu and the product are.
template <typename P>
void silu_rows(const typename P::T* gu, typename P::T* out, int64_t B, int64_t I) {
  for (int64_t b = 0; b < B; ++b) {
    const typename P::T* g = gu + b * 2 * I;
    const typename P::T* u = g + I;
    typename P::T* o = out + b * I;
#pragma omp simd
    for (int64_t j = 0; j < I; ++j) {
      const float x = P::load(g[j]);
      o[j] = P::store(P::round(x / (1.f + exp_poly(-x))) * P::load(u[j]));
    }
  }
}

// Call f with the precision policy of x's dtype (float32 or bfloat16).
template <typename F>
void typed(const torch::Tensor& x, const char* what, F f) {
  if (x.scalar_type() == torch::kFloat32) {
    f(F32{});
  } else if (x.scalar_type() == torch::kBFloat16) {
    f(BF16{});
  } else {
    TORCH_CHECK(false, what, ": float32 or bfloat16, got ", x.scalar_type());
  }
}

// Call f with the head dim as a compile-time constant.
template <typename F>
void with_head_dim(int64_t hd, F f) {
  switch (hd) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "decode_attention: head dim must be 16, 32, 64 or 128, got ", hd);
  }
}

template <typename P>
typename P::T* ptr(const torch::Tensor& x) {
  return reinterpret_cast<typename P::T*>(x.data_ptr());
}

void check_rows(const torch::Tensor& x, const torch::Tensor& like, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, what, ": CPU [B, n] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), what, ": one dtype");
}

// The arguments every attention kernel shares: qkv [B, 3 h hd], cos and sin [hd], 1 <= t <= Tmax.
void check_step(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t B, int64_t h,
                int64_t hd, int64_t Tmax, int64_t t, const char* what) {
  TORCH_CHECK(qkv.size(0) == B && qkv.size(1) == 3 * h * hd, what, ": qkv shape");
  TORCH_CHECK(cos.numel() == hd && sin.numel() == hd, what, ": cos, sin [head dim]");
  TORCH_CHECK(t >= 1 && t <= Tmax && t <= MAX_T, what, ": t out of range");
}

}  // namespace

// qkv [B, 3 h hd] (q, k, v before the rotary embedding; rows may be strided); cos, sin [hd] of the
// new position; K and V [B, h, Tmax, hd] (contiguous); one dtype (float32 or bfloat16). Rotates q and
// k, stores k and v at position t - 1 of the caches, then attends to positions [0, t).
// Returns [B, h * hd].
torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor K,
                               torch::Tensor V, int64_t t, double scale) {
  TORCH_CHECK(K.is_contiguous() && V.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "decode_attention: contiguous caches and rotary tables");
  check_rows(qkv, K, "decode_attention qkv");
  TORCH_CHECK(V.scalar_type() == K.scalar_type() && cos.scalar_type() == K.scalar_type() &&
                  sin.scalar_type() == K.scalar_type() && V.dim() == 4 && K.dim() == 4,
              "decode_attention: caches and tables of one dtype");
  const int64_t B = V.size(0), h = V.size(1), Tmax = V.size(2), hd = V.size(3);
  TORCH_CHECK(K.sizes() == V.sizes(), "decode_attention: K and V must have one shape");
  check_step(qkv, cos, sin, B, h, hd, Tmax, t, "decode_attention");
  auto out = torch::empty({B, h * hd}, qkv.options());
  typed(qkv, "decode_attention", [&](auto p) {
    using P = decltype(p);
    const auto* q = ptr<P>(qkv);
    const int64_t H = h * hd, qs = qkv.stride(0);
    with_head_dim(hd, [&](auto hd_) {
      constexpr int HD = decltype(hd_)::value;
      attend<P, HD>(q, q + H, q + 2 * H, qs, ptr<P>(cos), ptr<P>(sin), ptr<P>(K), ptr<P>(V), ptr<P>(out), B,
                    h, Tmax, t, static_cast<float>(scale));
    });
  });
  return out;
}

// As decode_attention, over the int8 cache: Kq [B, h, Tmax / 16, hd, 16] int8, Ks [B, h, Tmax] float32
// (keys and their scales), Vq [B, h, Tmax, hd] int8, Vs [B, h, Tmax] float32; Tmax a multiple of 16.
torch::Tensor decode_attention_q8(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor Kq,
                                  torch::Tensor Ks, torch::Tensor Vq, torch::Tensor Vs, int64_t t, double scale) {
  for (auto* x : {&Kq, &Ks, &Vq, &Vs, &cos, &sin}) TORCH_CHECK(x->is_contiguous(), "decode_attention_q8: contiguous");
  check_rows(qkv, cos, "decode_attention_q8 qkv");
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "decode_attention_q8: tables of the model dtype");
  TORCH_CHECK(Kq.scalar_type() == torch::kInt8 && Vq.scalar_type() == torch::kInt8 &&
                  Ks.scalar_type() == torch::kFloat32 && Vs.scalar_type() == torch::kFloat32,
              "decode_attention_q8: int8 caches, float32 scales");
  TORCH_CHECK(Vq.dim() == 4 && Kq.dim() == 5 && Ks.dim() == 3 && Vs.dim() == 3, "decode_attention_q8: cache ranks");
  const int64_t B = Vq.size(0), h = Vq.size(1), Tmax = Vq.size(2), hd = Vq.size(3);
  TORCH_CHECK(Tmax % LANES == 0 && Kq.size(0) == B && Kq.size(1) == h && Kq.size(2) * LANES == Tmax &&
                  Kq.size(3) == hd && Kq.size(4) == LANES && Ks.size(0) == B && Ks.size(1) == h &&
                  Ks.size(2) == Tmax && Vs.sizes() == Ks.sizes(),
              "decode_attention_q8: cache shapes");
  check_step(qkv, cos, sin, B, h, hd, Tmax, t, "decode_attention_q8");
  auto out = torch::empty({B, h * hd}, qkv.options());
  typed(qkv, "decode_attention_q8", [&](auto p) {
    using P = decltype(p);
    const auto* q = ptr<P>(qkv);
    const int64_t H = h * hd;
    with_head_dim(hd, [&](auto hd_) {
      constexpr int HD = decltype(hd_)::value;
      attend_q8<P, HD>(q, q + H, q + 2 * H, qkv.stride(0), ptr<P>(cos), ptr<P>(sin), Kq.data_ptr<int8_t>(),
                       Ks.data_ptr<float>(), Vq.data_ptr<int8_t>(), Vs.data_ptr<float>(), ptr<P>(out), B, h, Tmax,
                       t, static_cast<float>(scale));
    });
  });
  return out;
}

// x [B, H] (rows may be strided), w [H]; d [B, H] or None, the residual branch. Returns
// (x + d, rms_norm(x + d) * w), or (x, rms_norm(x) * w) without d.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> d,
                                                      torch::Tensor w, double eps) {
  check_rows(x, x, "add_rms_norm x");
  const int64_t B = x.size(0), H = x.size(1);
  TORCH_CHECK(w.is_contiguous() && w.numel() == H && w.scalar_type() == x.scalar_type(), "add_rms_norm: w [H]");
  if (d) {
    check_rows(*d, x, "add_rms_norm d");
    TORCH_CHECK(d->size(0) == B && d->size(1) == H, "add_rms_norm: d shape");
  }
  auto out = torch::empty({B, H}, x.options());
  auto xo = d ? torch::empty({B, H}, x.options()) : x;
  typed(x, "add_rms_norm", [&](auto p) {
    using P = decltype(p);
    rms_rows<P>(ptr<P>(x), x.stride(0), d ? ptr<P>(*d) : nullptr, d ? d->stride(0) : 0, ptr<P>(w),
                d ? ptr<P>(xo) : nullptr, ptr<P>(out), B, H, static_cast<float>(eps));
  });
  return {xo, out};
}

// gu [B, 2 I] (contiguous) -> silu(gu[:, :I]) * gu[:, I:].
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.is_contiguous() && gu.dim() == 2 && gu.size(1) % 2 == 0, "silu_mul: contiguous [B, 2 I]");
  const int64_t B = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({B, I}, gu.options());
  typed(gu, "silu_mul", [&](auto p) {
    using P = decltype(p);
    silu_rows<P>(ptr<P>(gu), ptr<P>(out), B, I);
  });
  return out;
}

// logits [B, V] float32 (-inf where not allowed), u [B, V] float32 uniforms (torch.rand) ->
// argmax over V of logits - log(-log(clamp(u, 1e-10, 1))): Gumbel-max sampling in one pass over the
// row instead of five aten ops over [B, V] (the first maximum wins, as torch.argmax).
torch::Tensor gumbel_argmax(torch::Tensor logits, torch::Tensor u) {
  TORCH_CHECK(logits.is_contiguous() && u.is_contiguous() && logits.dim() == 2 && logits.sizes() == u.sizes() &&
                  logits.scalar_type() == torch::kFloat32 && u.scalar_type() == torch::kFloat32,
              "gumbel_argmax: contiguous float32 logits and uniforms of one shape [B, V]");
  const int64_t B = logits.size(0), V = logits.size(1);
  auto out = torch::empty({B}, logits.options().dtype(torch::kLong));
  const float* l = logits.data_ptr<float>();
  const float* r = u.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  std::vector<float> g(V);
  for (int64_t b = 0; b < B; ++b) {
    const float* lb = l + b * V;
    const float* rb = r + b * V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float x = rb[j] < 1e-10f ? 1e-10f : (rb[j] > 1.f ? 1.f : rb[j]);
      g[j] = lb[j] - log_poly(-log_poly(x));
    }
    float top = g[0];  // two vectorizable passes: the maximum, then its first index
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < V; ++j) top = g[j] > top ? g[j] : top;
    int64_t best = 0;
    while (best < V - 1 && !(g[best] >= top)) ++best;  // NaN-free (Gumbel noise of finite uniforms)
    o[b] = best;
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gumbel_argmax", &gumbel_argmax);
  m.def("decode_attention", &decode_attention);
  m.def("decode_attention_q8", &decode_attention_q8);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("silu_mul", &silu_mul);
}
