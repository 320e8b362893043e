// The small per-layer ops of a decode step, each one call instead of a chain of torch ops.
//
// At batch 1 a SmolLM2-135M bfloat16 decode step spent about as long in small torch ops (RMSNorm's
// casts and reductions, RoPE's slices, negation and cat, the KV store's index_copy_) as in its
// matmuls: each torch op costs a few microseconds of dispatch whatever its size, and a layer ran ~40
// of them. Measured on a Zen 5 at one token: RMSNorm 11.9 us -> 2.3 us, residual add + RMSNorm
// 12.7 -> 3.6, RoPE of q and k 19.2 -> 2.3, the K/V store 7.1 -> 2.2. These ops do the same arithmetic, rounding where torch rounds:
//
//   norm_rows, add_norm_rows: transformers' RMSNorm of float32 or bfloat16 rows (sum of squares in
//       double: float32 sums of 2k squares with outlier channels lose digits that transformers' pairwise
//       float32 mean keeps), optionally after the residual add x + delta (rounded to
//       x's dtype, as torch's add). A bfloat16 weight scales the bfloat16-rounded normalised row (Llama:
//       `normed.to(dtype) * weight`); a float32 one (Gemma's 1 + w) scales it in float32.
//   rope_qk: rotate_half RoPE of q and k on the first `rotary` dims of each head (the rest pass
//       through), into new contiguous tensors; bfloat16 rounds x*cos, rotated*sin and their sum as
//       torch's three ops do.
//   silu_mul: the MLP's act(gate) * up of a fused [gate | up] row, torch's silu (x / (1 + exp(-x)), its
//       result rounded to bfloat16 in a bfloat16 model) times up, rounded: two torch ops and an
//       intermediate tensor in one pass (a 4096-token prefill's 30 of them: ~96 -> ~25 ms on a Zen 5), where
//       the build has AVX-512 for the dtype; elsewhere it runs those two torch ops.
//   store_kv: each new token's K and V rows copied to its pool slot (negative slots skipped).
//   store_kv_quantized: the same into a 1-byte pool (int8, E4M3, E5M2) with its float16 per-row scales,
//       quantizing each (token, head) row as duoserve/kv/quant.py's `quantize` does, bit for bit (float32
//       amax, scale rounded to float16, a true division, round-half-even for int8, torch's fp8 casts).
//       torch's quantize + four index_copy_ cost ~20 ops a layer: 2.3 ms of a 5.4 ms batch-1 SmolLM2
//       decode step at 128 tokens of context on a Zen 5, against bfloat16 KV's one store op.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include "../../csrc/cpu_ops.h"
#include "../../csrc/cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// Rows of this many values or fewer in all run on the calling thread: a decode's rows are done in less
// time than waking the other threads takes.
constexpr int64_t kSerialValues = 1 << 16;

inline float round_as(float v, at::BFloat16*) { return static_cast<float>(c10::BFloat16(v)); }
inline float round_as(float v, float*) { return v; }

template <typename T>
inline float rnd(float v) {
  return round_as(v, static_cast<T*>(nullptr));
}

// One row: y = norm(x) * w, x already summed with the residual where there is one.
template <typename T, typename W>
void norm_row(const float* x, const W* w, int64_t h, float eps, T* y) {
  double sum = 0.0;  // see norm_rows above: float32 sums lose digits
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < h; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / h) + eps);
  for (int64_t i = 0; i < h; ++i) {
    // A weight of the rows' dtype scales the normalised row rounded to it; a float32 one scales it as is.
    const float normed = std::is_same_v<W, T> ? rnd<T>(x[i] * inv) : x[i] * inv;
    y[i] = static_cast<T>(normed * static_cast<float>(w[i]));
  }
}

#if defined(__AVX512BF16__)
// bfloat16 rows 16 values at a time: the same arithmetic as norm_row's scalar loops (the residual sum
// rounded to bfloat16, squares summed in double, the normalised row rounded before a bfloat16 weight),
// with round-to-nearest-even conversions in one instruction each instead of c10::BFloat16's scalar ones
// (64 rows of 576: 65 -> ~6 us on a Zen 5; a 4096-token prefill's 59 norms 140 -> 40 ms).
using duoserve::load_bf16;  // csrc/cpu_vec.h
using duoserve::to_bf16;
using duoserve::widen_bf16;
inline __m512 load_weight(const at::BFloat16* p) { return load_bf16(p); }
inline __m512 load_weight(const float* p) { return _mm512_loadu_ps(p); }

template <typename W>
void norm_row_bf16(const at::BFloat16* x, const at::BFloat16* delta, const W* w, int64_t h, float eps,
                   at::BFloat16* sum_out, at::BFloat16* y, float* row) {
  __m512d squares[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  for (int64_t i = 0; i < h; i += 16) {
    __m512 v = load_bf16(x + i);
    if (delta) {
      const __m256i rounded = to_bf16(_mm512_add_ps(v, load_bf16(delta + i)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sum_out + i), rounded);
      v = widen_bf16(rounded);
    }
    _mm512_storeu_ps(row + i, v);
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    squares[0] = _mm512_fmadd_pd(lo, lo, squares[0]);  // exact: a float's square fits a double
    squares[1] = _mm512_fmadd_pd(hi, hi, squares[1]);
  }
  const double sum = _mm512_reduce_add_pd(_mm512_add_pd(squares[0], squares[1]));
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(sum / h) + eps));
  for (int64_t i = 0; i < h; i += 16) {
    __m512 normed = _mm512_mul_ps(_mm512_loadu_ps(row + i), inv);
    if constexpr (std::is_same_v<W, at::BFloat16>) normed = widen_bf16(to_bf16(normed));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), to_bf16(_mm512_mul_ps(normed, load_weight(w + i))));
  }
}
#endif

template <typename T, typename W>
void norm_rows_impl(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps,
                    at::Tensor& sum_out, at::Tensor& y) {
  const int64_t rows = x.size(0), h = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  T* sp = delta ? sum_out.data_ptr<T>() : nullptr;
  const W* wp = weight.data_ptr<W>();
  T* yp = y.data_ptr<T>();
  auto body = [&](int64_t begin, int64_t end) {
    std::vector<float> row(h);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (h % 16 == 0) {
        for (int64_t r = begin; r < end; ++r)
          norm_row_bf16<W>(xp + r * h, dp ? dp + r * h : nullptr, wp, h, static_cast<float>(eps),
                           sp ? sp + r * h : nullptr, yp + r * h, row.data());
        return;
      }
    }
#endif
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < h; ++i) {
        float v = static_cast<float>(xp[r * h + i]);
        if (dp) {
          v = rnd<T>(v + static_cast<float>(dp[r * h + i]));
          sp[r * h + i] = static_cast<T>(v);
        }
        row[i] = v;
      }
      norm_row<T, W>(row.data(), wp, h, static_cast<float>(eps), yp + r * h);
    }
  };
  if (rows * h <= kSerialValues) {
    body(0, rows);
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, kSerialValues / 8 / h), body);
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [T, H]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be contiguous [H]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type(),
              "weight must be float32 or x's dtype");
}

void dispatch_norm(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps,
                   at::Tensor& sum_out, at::Tensor& y) {
  const bool w32 = weight.scalar_type() == at::kFloat;
  if (x.scalar_type() == at::kFloat) {
    norm_rows_impl<float, float>(x, delta, weight, eps, sum_out, y);
  } else if (w32) {
    norm_rows_impl<at::BFloat16, float>(x, delta, weight, eps, sum_out, y);
  } else {
    norm_rows_impl<at::BFloat16, at::BFloat16>(x, delta, weight, eps, sum_out, y);
  }
}

at::Tensor norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  at::Tensor y = at::empty_like(x);
  at::Tensor unused;
  dispatch_norm(x, nullptr, weight, eps, unused, y);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_norm_rows(const at::Tensor& x, const at::Tensor& delta,
                                                 const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous() && delta.scalar_type() == x.scalar_type(),
              "delta must be contiguous, of x's shape and dtype");
  at::Tensor sum = at::empty_like(x);
  at::Tensor y = at::empty_like(x);
  dispatch_norm(x, &delta, weight, eps, sum, y);
  return {sum, y};
}

// ---- act(gate) * up -----------------------------------------------------------------------------------

template <typename T>
void silu_mul_row(const T* gate, const T* up, int64_t n, T* out) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
      const __m512 g = load_bf16(gate + i);
      const __m512 act = widen_bf16(to_bf16(_mm512_div_ps(g, _mm512_add_ps(one, duoserve::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), to_bf16(_mm512_mul_ps(act, load_bf16(up + i))));
    }
  }
#endif
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
      const __m512 g = _mm512_loadu_ps(gate + i);
      const __m512 act = _mm512_div_ps(g, _mm512_add_ps(one, duoserve::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm512_storeu_ps(out + i, _mm512_mul_ps(act, _mm512_loadu_ps(up + i)));
    }
  }
#endif
  for (; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float act = rnd<T>(g / (1.0f + std::exp(-g)));
    out[i] = static_cast<T>(act * static_cast<float>(up[i]));
  }
}

// Whether silu_mul_row has a vector path for the dtype in this build: without one its scalar loop (libm's
// expf per value) ran 4x slower than torch's two vectorised ops on bfloat16 (AVX2), so those take over.
constexpr bool kSiluMulVectorized(bool bf16) {
#if defined(__AVX512BF16__)
  return true;
#elif defined(__AVX512F__)
  return !bf16;
#else
  return false;
#endif
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be contiguous [T, 2 * intermediate]");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "gate_up must be float32 or bfloat16");
  if (!kSiluMulVectorized(gate_up.scalar_type() == at::kBFloat16)) {
    const std::vector<at::Tensor> halves = gate_up.chunk(2, -1);
    return at::silu(halves[0]) * halves[1];  // llama.py's own two ops
  }
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  auto run = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    const T* in = gate_up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    auto body = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row<T>(in + r * 2 * n, in + r * 2 * n + n, n, o + r * n);
    };
    if (rows * n <= kSerialValues) body(0, rows);
    else at::parallel_for(0, rows, std::max<int64_t>(1, kSerialValues / 8 / n), body);
  };
  if (gate_up.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<at::BFloat16*>(nullptr));
  return out;
}

// ---- RoPE ----------------------------------------------------------------------------------------------

// One token's heads: rotate_half RoPE on the first 2 * half dims, the rest copied.
template <typename T>
void rope_token(const T* x, int64_t head_stride, const T* c, const T* s, int64_t heads, int64_t dim, int64_t half,
                T* out) {
  for (int64_t hd = 0; hd < heads; ++hd) {
    const T* in = x + hd * head_stride;
    T* o = out + hd * dim;
    int64_t i = 0;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      // 16 dims at a time, each product and the sum rounded as the scalar loops round them.
      const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
      for (; i + 16 <= half; i += 16) {
        const __m512 x1 = load_bf16(in + i), x2 = load_bf16(in + i + half);
        const __m512 neg_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));
        const __m512 a1 = widen_bf16(to_bf16(_mm512_mul_ps(x1, load_bf16(c + i))));
        const __m512 b1 = widen_bf16(to_bf16(_mm512_mul_ps(neg_x2, load_bf16(s + i))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), to_bf16(_mm512_add_ps(a1, b1)));
        const __m512 a2 = widen_bf16(to_bf16(_mm512_mul_ps(x2, load_bf16(c + half + i))));
        const __m512 b2 = widen_bf16(to_bf16(_mm512_mul_ps(x1, load_bf16(s + half + i))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + half + i), to_bf16(_mm512_add_ps(a2, b2)));
      }
    }
#endif
    for (int64_t j = i; j < half; ++j) {
      const float a = rnd<T>(static_cast<float>(in[j]) * static_cast<float>(c[j]));
      const float b = rnd<T>(-static_cast<float>(in[j + half]) * static_cast<float>(s[j]));
      o[j] = static_cast<T>(a + b);
    }
    for (int64_t j = half + i; j < 2 * half; ++j) {
      const float a = rnd<T>(static_cast<float>(in[j]) * static_cast<float>(c[j]));
      const float b = rnd<T>(static_cast<float>(in[j - half]) * static_cast<float>(s[j]));
      o[j] = static_cast<T>(a + b);
    }
    for (int64_t j = 2 * half; j < dim; ++j) o[j] = in[j];
  }
}

template <typename T>
void rope_heads(const at::Tensor& x, const T* cos, const T* sin, int64_t rotary, at::Tensor& out) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = rotary / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rope_token<T>(xp + t * s0, s1, cos + t * rotary, sin + t * rotary,
                                                        heads, dim, half, op + t * heads * dim);
  };
  if (tokens * heads * dim <= kSerialValues) body(0, tokens);
  else at::parallel_for(0, tokens, std::max<int64_t>(1, kSerialValues / 8 / (heads * dim)), body);
}

void check_heads(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, name, " must be [T, heads, dim] with contiguous rows");
}

std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin) {
  check_heads(q, "q");
  check_heads(k, "k");
  const int64_t tokens = q.size(0);
  if (tokens == 0) return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
  TORCH_CHECK(k.size(0) == tokens && k.size(2) == q.size(2), "q and k must have the same tokens and dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                  sin.scalar_type() == q.scalar_type(),
              "q, k, cos and sin must share a dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == sin.numel() &&
                  cos.numel() % tokens == 0,
              "cos and sin must be contiguous [T, rotary]");
  const int64_t rotary = cos.numel() / tokens;
  TORCH_CHECK(rotary % 2 == 0 && rotary <= q.size(2), "rotary dims must be even and at most head_dim");
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.scalar_type() == at::kFloat) {
    rope_heads<float>(q, cos.data_ptr<float>(), sin.data_ptr<float>(), rotary, q_out);
    rope_heads<float>(k, cos.data_ptr<float>(), sin.data_ptr<float>(), rotary, k_out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "q must be float32 or bfloat16");
    const auto* c = cos.data_ptr<at::BFloat16>();
    const auto* s = sin.data_ptr<at::BFloat16>();
    rope_heads<at::BFloat16>(q, c, s, rotary, q_out);
    rope_heads<at::BFloat16>(k, c, s, rotary, k_out);
  }
  return {q_out, k_out};
}

// ---- KV store --------------------------------------------------------------------------------------------

void store_rows(at::Tensor& pool, const at::Tensor& given, const int64_t* slots, int64_t num_slots) {
  TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous(), "pools must be contiguous [blocks, block_size, heads, dim]");
  TORCH_CHECK(given.dim() == 3 && given.size(1) == pool.size(2) && given.size(2) == pool.size(3),
              "K/V must be [T, heads, dim]");
  TORCH_CHECK(given.scalar_type() == pool.scalar_type(), "K/V must have the pool's dtype");
  // A token's heads side by side (rows of a fused QKV output are: any stride between tokens is fine).
  const bool packed = given.stride(2) == 1 && given.stride(1) == given.size(2);
  const at::Tensor x = packed ? given : given.contiguous();
  const int64_t row_bytes = x.size(1) * x.size(2) * x.element_size();
  const int64_t capacity = pool.size(0) * pool.size(1);
  auto* dst = static_cast<char*>(pool.data_ptr());
  const auto* src = static_cast<const char*>(x.data_ptr());
  const int64_t src_stride = x.stride(0) * x.element_size();
  for (int64_t t = 0; t < num_slots; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    TORCH_CHECK(slot < capacity, "slot ", slot, " is outside the pool");
    std::memcpy(dst + slot * row_bytes, src + t * src_stride, row_bytes);
  }
}

void store_kv(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be contiguous int64 [T]");
  TORCH_CHECK(k.size(0) == slots.size(0) && v.size(0) == slots.size(0), "one slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  store_rows(k_pool, k, sp, slots.size(0));
  store_rows(v_pool, v, sp, slots.size(0));
}

// Scales stay normal float16 numbers (quant.py's _MIN_SCALE, _MAX_SCALE).
constexpr float kMinScale = 6.103515625e-05f;  // 2^-14
constexpr float kMaxScale = 60000.0f;

template <typename C>
inline C encode(float y, float top) {
  if constexpr (std::is_same_v<C, int8_t>) {
    return static_cast<int8_t>(std::clamp(std::nearbyint(y), -127.0f, 127.0f));
  } else {
    return C(std::clamp(y, -top, top));
  }
}

// Rows [T * heads] of `dim` values of X -> codes of C at their slots, and their float16 scales.
template <typename C, typename X>
void quantize_rows(at::Tensor& pool, at::Tensor& scales, const at::Tensor& given, const int64_t* slots,
                   int64_t num_slots, float top) {
  const int64_t heads = pool.size(2), dim = pool.size(3), capacity = pool.size(0) * pool.size(1);
  const at::Tensor x = given.stride(2) == 1 && given.stride(1) == dim ? given : given.contiguous();
  const X* xp = x.data_ptr<X>();
  auto* codes = static_cast<C*>(pool.data_ptr());
  auto* sp = scales.data_ptr<at::Half>();
  std::vector<float> row(dim);
  for (int64_t t = 0; t < num_slots; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    TORCH_CHECK(slot < capacity, "slot ", slot, " is outside the pool");
    for (int64_t h = 0; h < heads; ++h) {
      const X* src = xp + t * x.stride(0) + h * dim;
      float amax = 0.0f;
      for (int64_t i = 0; i < dim; ++i) {
        row[i] = static_cast<float>(src[i]);
        amax = std::max(amax, std::fabs(row[i]));
      }
      const at::Half scale(std::clamp(amax / top, kMinScale, kMaxScale));
      const float s = static_cast<float>(scale);
      C* dst = codes + (slot * heads + h) * dim;
      for (int64_t i = 0; i < dim; ++i) dst[i] = encode<C>(row[i] / s, top);
      sp[slot * heads + h] = scale;
    }
  }
}

template <typename C>
void quantize_kv(at::Tensor& pool, at::Tensor& scales, const at::Tensor& given, const int64_t* slots,
                 int64_t num_slots, float top) {
  if (given.scalar_type() == at::kBFloat16) {
    quantize_rows<C, at::BFloat16>(pool, scales, given, slots, num_slots, top);
  } else {
    quantize_rows<C, float>(pool, scales, given, slots, num_slots, top);
  }
}

void store_pool(at::Tensor& pool, at::Tensor& scales, const at::Tensor& given, const int64_t* slots,
                int64_t num_slots) {
  TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous(), "pools must be contiguous [blocks, block_size, heads, dim]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == pool.size(0) && scales.size(1) == pool.size(1) && scales.size(2) == pool.size(2),
              "scales must be contiguous float16 [blocks, block_size, heads]");
  TORCH_CHECK(given.dim() == 3 && given.size(1) == pool.size(2) && given.size(2) == pool.size(3),
              "K/V must be [T, heads, dim]");
  TORCH_CHECK(given.scalar_type() == at::kBFloat16 || given.scalar_type() == at::kFloat,
              "K/V must be bfloat16 or float32");
  switch (pool.scalar_type()) {
    case at::kChar:
      return quantize_kv<int8_t>(pool, scales, given, slots, num_slots, 127.0f);
    case at::kFloat8_e4m3fn:
      return quantize_kv<c10::Float8_e4m3fn>(pool, scales, given, slots, num_slots, 448.0f);
    case at::kFloat8_e5m2:
      return quantize_kv<c10::Float8_e5m2>(pool, scales, given, slots, num_slots, 57344.0f);
    default:
      TORCH_CHECK(false, "a quantized pool is int8, float8_e4m3fn or float8_e5m2, not ", pool.scalar_type());
  }
}

void store_kv_quantized(at::Tensor k_pool, at::Tensor v_pool, at::Tensor k_scale, at::Tensor v_scale,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be contiguous int64 [T]");
  TORCH_CHECK(k.size(0) == slots.size(0) && v.size(0) == slots.size(0), "one slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  store_pool(k_pool, k_scale, k, sp, slots.size(0));
  store_pool(v_pool, v_scale, v, sp, slots.size(0));
}

}  // namespace

namespace duoserve {

at::Tensor norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) { return ::norm_rows(x, weight, eps); }

std::tuple<at::Tensor, at::Tensor> add_norm_rows(const at::Tensor& x, const at::Tensor& delta,
                                                 const at::Tensor& weight, double eps) {
  return ::add_norm_rows(x, delta, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin) {
  return ::rope_qk(q, k, cos, sin);
}

at::Tensor silu_mul(const at::Tensor& gate_up) { return ::silu_mul(gate_up); }

void store_kv(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  ::store_kv(std::move(k_pool), std::move(v_pool), k, v, slots);
}

}  // namespace duoserve

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("norm_rows(Tensor x, Tensor weight, float eps) -> Tensor", &norm_rows);
  m.def("add_norm_rows(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)", &add_norm_rows);
  m.def("rope_qk(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)", &rope_qk);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("store_kv(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v, Tensor slots) -> ()", &store_kv);
  m.def("store_kv_quantized(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor(c!) k_scale, Tensor(d!) v_scale, "
        "Tensor k, Tensor v, Tensor slots) -> ()", &store_kv_quantized);
}
