// Matmuls over 4- and 8-bit weight codes with float32 activations: y[R, N] = x[R, K] @ W[N, K]^T.
//
// A decode step reads every weight once and does little arithmetic on it, so its time is the bytes
// read; float32 dense weights are 8x the bytes of 4-bit codes. torch's own 4/8-bit CPU kernels take
// bfloat16 activations (15x slower with float32 ones), and an AVX2-only CPU has no fast bfloat16, so
// a float32 model there read dense weights. These kernels read the codes and compute in float32: the
// result is the dense float32 matmul on the dequantized weights up to summation order.
//
// Layouts (groups of 32 values along a row, as GGUF's blocks and sub-blocks):
//   Q4: codes uint8 [N, K/2]: in each group's 16 bytes, byte i holds value i (low nibble) and value
//       i + 16 (high nibble); scale_min fp16 [N, 2, K/32] (a row's scales, then its mins):
//       w = scale * q + min.
//   Q8: codes int8 [N, K]; scales fp16 [N, K/32]: w = scale * q.
//
// How x is multiplied (`activation_bits`, chosen by the caller: cpu_quant_linear.py):
//   16 (default): every row of x is rounded to int16 per group of 32 and multiplied with integer
//       products (pmaddwd): one row 4 output rows at a time, several rows as a GEMM over panels of 16
//       output rows whose codes are widened to int16 once for all rows of x.
//   8: every row of x is rounded to int8 per group of 32 (llama.cpp's q8 blocks) and multiplied with
//       pmaddubsw, 4 output rows times 2 rows of x at a time.
// The fast paths need AVX2 + FMA + F16C; other CPUs take plain loops (16: float32, exact; 8: the same
// int8 rounding and integer products).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DUOSERVE_AVX2 1
#endif

namespace {

constexpr int64_t kGroup = 32;

inline float half_to_float(uint16_t h) {
#if defined(DUOSERVE_AVX2)
  return _cvtsh_ss(h);
#else
  at::Half value;
  std::memcpy(&value, &h, sizeof(h));
  return static_cast<float>(value);
#endif
}

// ---- Expanding one row's codes into float32 weights -------------------------------------------------

#if defined(DUOSERVE_AVX2)
// The 32 codes of a Q4 group as four vectors of 8 floats (values 0-7, 8-15, 16-23, 24-31).
inline void q4_group(const uint8_t* p, __m256 q[4]) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

inline void q8_group(const int8_t* p, __m256 q[4]) {
  for (int i = 0; i < 4; ++i) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i));
    q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  }
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

struct Q4Row {
  const uint8_t* codes;  // K/2 bytes
  const uint16_t* scale_min;  // K/32 fp16 scales, then K/32 fp16 mins
};

struct Q8Row {
  const int8_t* codes;  // K bytes
  const uint16_t* scales;  // K/32 fp16
};

void expand(const Q4Row& row, int64_t k, float* out) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float scale = half_to_float(row.scale_min[g]);
    const float min = half_to_float(row.scale_min[k / kGroup + g]);
    const uint8_t* p = row.codes + g * kGroup / 2;
    float* o = out + g * kGroup;
#if defined(DUOSERVE_AVX2)
    __m256 q[4];
    q4_group(p, q);
    const __m256 s = _mm256_set1_ps(scale), m = _mm256_set1_ps(min);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(q[i], s, m));
#else
    for (int i = 0; i < 16; ++i) {
      o[i] = scale * static_cast<float>(p[i] & 0x0F) + min;
      o[i + 16] = scale * static_cast<float>(p[i] >> 4) + min;
    }
#endif
  }
}

void expand(const Q8Row& row, int64_t k, float* out) {
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float scale = half_to_float(row.scales[g]);
    const int8_t* p = row.codes + g * kGroup;
    float* o = out + g * kGroup;
#if defined(DUOSERVE_AVX2)
    __m256 q[4];
    q8_group(p, q);
    const __m256 s = _mm256_set1_ps(scale);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(q[i], s));
#else
    for (int i = 0; i < kGroup; ++i) o[i] = scale * static_cast<float>(p[i]);
#endif
  }
}

// ---- Rows of x rounded per group of 32: integer dot products ---------------------------------------

// Rows of x are rounded per group of 32 to integers (scale = max |x| / kMax), so that a group's products
// are a few integer multiply-adds instead of unpacking 32 codes to floats: the float path was
// compute-bound at 1 row (20 ms for SmolLM2's matmuls against ~4 ms of memory traffic on a 2-core Zen 1).
//   int16 (1 row; the default): 1.5e-5 of the group's largest value, 250x finer than bfloat16: float32
//     models stay within 1e-4 of transformers. Two pmaddwd per group: 16 products per 256-bit op.
//   int8 (any number of rows; `activation_bits=8`): llama.cpp's q8 blocks, 1/254 of the group's largest
//     value. One pmaddubsw (32 products) + one pmaddwd per group (one vpdpbusd with VNNI), and half the
//     x bytes. On a Zen 1, whose 256-bit integer multiplies issue as two 128-bit halves on one pipe,
//     that is as many multiply uops as int16's; Q4 there takes a 128-bit path with 3 (below): 1.3-1.4x
//     int16's speed at 1 row, Q8 at par (busy machine, benchmarks/quantized_activations.py, which
//     also measures the accuracy on a real model).
// Q4's min term (min * sum of the group's x): int16 uses the exact float32 sum; int8 the sum of the
// rounded x (llama.cpp's q8_1 does too), so that the result is exactly w . (x rounded): its error,
// sum(w * dx), then scales with the weights rather than with their unsigned codes' part (scale * q, up to
// twice |w| in Q4_0/Q4_1): an exact min term made the int8 error 2x larger on random Q4_0 rows.
template <typename T>
struct QuantizedX {
  std::vector<T> codes;  // [rows, K]
  std::vector<float> scales;  // [rows, K / 32]
  std::vector<float> sums;  // [rows, K / 32]: sum of x over the group, rounded for int8 (Q4's min term)
};

template <typename T>
QuantizedX<T> quantize_x(const float* x, int64_t rows, int64_t k) {
  constexpr float kMax = sizeof(T) == 1 ? 127.0f : 32767.0f;
  const int64_t groups = rows * (k / kGroup);  // rows are contiguous and K is whole groups
  QuantizedX<T> q{std::vector<T>(rows * k), std::vector<float>(groups), std::vector<float>(groups)};
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + g * kGroup;
    float peak = 0.0f, sum = 0.0f;
    for (int64_t i = 0; i < kGroup; ++i) {
      peak = std::max(peak, std::abs(xg[i]));
      sum += xg[i];
    }
    const float scale = peak / kMax, inverse = peak > 0.0f ? kMax / peak : 0.0f;
    // |x * inverse| <= kMax (+ a rounding of float32): the codes never leave [-kMax, kMax].
    int32_t code_sum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      q.codes[g * kGroup + i] = static_cast<T>(std::nearbyint(xg[i] * inverse));
      code_sum += q.codes[g * kGroup + i];
    }
    q.scales[g] = scale;
    q.sums[g] = sizeof(T) == 1 ? static_cast<float>(code_sum) * scale : sum;
  }
  return q;
}

inline const uint16_t* row_scales(const Q4Row& row) { return row.scale_min; }
inline const uint16_t* row_scales(const Q8Row& row) { return row.scales; }

#if defined(DUOSERVE_AVX2)
// int16: the 32 products of a group as 8 int32 partial sums.
inline __m256i group_products(const Q4Row& row, int64_t g, __m256i x_lo, __m256i x_hi) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.codes + g * kGroup / 2));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, mask));  // values 0-15
  const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), mask));  // 16-31
  return _mm256_add_epi32(_mm256_madd_epi16(lo, x_lo), _mm256_madd_epi16(hi, x_hi));
}

inline __m256i group_products(const Q8Row& row, int64_t g, __m256i x_lo, __m256i x_hi) {
  const int8_t* p = row.codes + g * kGroup;
  const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  return _mm256_add_epi32(_mm256_madd_epi16(lo, x_lo), _mm256_madd_epi16(hi, x_hi));
}

// int8: a group's 32 weight codes as bytes in value order (Q4: the low nibbles, then the high ones).
inline __m256i group_bytes(const Q4Row& row, int64_t g) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.codes + g * kGroup / 2));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

inline __m256i group_bytes(const Q8Row& row, int64_t g) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.codes + g * kGroup));
}

// int8: unsigned bytes u times signed bytes s, as 8 int32 sums of 4 products. With AVX512-VNNI or
// AVX-VNNI (compiled -march=native where the CPU has them) one vpdpbusd; else pmaddubsw, whose int16 sums
// of adjacent pairs saturate, then pmaddwd by ones (llama.cpp's AVX2 path).
inline __m256i dot_bytes(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Q4: codes 0-15 times x in [-127, 127]: a pair is at most 3810 in size, never saturated.
inline __m256i group_sums(const Q4Row&, __m256i w, __m256i x) { return dot_bytes(w, x); }

// Q8's codes are signed: |w| times x carrying w's sign (llama.cpp's trick; w = 0 zeroes x). |w| <= 128
// (a file's -128 becomes the unsigned byte 128), so a pair is at most 2 * 128 * 127 = 32512: never
// saturated.
inline __m256i group_sums(const Q8Row&, __m256i w, __m256i x) {
  return dot_bytes(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

// scale * x_scale per group of one weight row (the integer products' factor), 8 groups at a time.
inline void scale_factors(const uint16_t* scales, const float* x_scales, int64_t groups, float* factors) {
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g)));
    _mm256_storeu_ps(factors + g, _mm256_mul_ps(s, _mm256_loadu_ps(x_scales + g)));
  }
  for (; g < groups; ++g) factors[g] = half_to_float(scales[g]) * x_scales[g];
}

// sum over groups of min * sum(x): Q4's min term; Q8 has none.
inline float min_term(const Q4Row& row, const float* x_sums, int64_t groups) {
  const uint16_t* mins = row.scale_min + groups;
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g)));
    acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(x_sums + g), acc);
  }
  float sum = hsum(acc);
  for (; g < groups; ++g) sum += half_to_float(mins[g]) * x_sums[g];
  return sum;
}

inline float min_term(const Q8Row&, const float*, int64_t) { return 0.0f; }

// int16, one row of x: y = w . x for 4 output rows, which share every load of x. (A compile-time count
// keeps the accumulators in registers: with a run-time one gcc spilled them to the stack, 1.5x slower.)
template <typename Row>
void dot_one_x(const Row* rows, const QuantizedX<int16_t>& x, int64_t k, float* factors, float* y) {
  const int64_t groups = k / kGroup;
  for (int r = 0; r < 4; ++r) {
    scale_factors(row_scales(rows[r]), x.scales.data(), groups, factors + r * groups);
  }
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i* xg = reinterpret_cast<const __m256i*>(x.codes.data() + g * kGroup);
    const __m256i x_lo = _mm256_loadu_si256(xg), x_hi = _mm256_loadu_si256(xg + 1);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_products(rows[0], g, x_lo, x_hi)),
                           _mm256_broadcast_ss(factors + g), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_products(rows[1], g, x_lo, x_hi)),
                           _mm256_broadcast_ss(factors + groups + g), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_products(rows[2], g, x_lo, x_hi)),
                           _mm256_broadcast_ss(factors + 2 * groups + g), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group_products(rows[3], g, x_lo, x_hi)),
                           _mm256_broadcast_ss(factors + 3 * groups + g), acc3);
  }
  y[0] = hsum(acc0) + min_term(rows[0], x.sums.data(), groups);
  y[1] = hsum(acc1) + min_term(rows[1], x.sums.data(), groups);
  y[2] = hsum(acc2) + min_term(rows[2], x.sums.data(), groups);
  y[3] = hsum(acc3) + min_term(rows[3], x.sums.data(), groups);
}

// int8: 4 output rows times J rows of x (first, first + 1, ...): 4 * J accumulators, each weight group
// loaded once for the J rows. out[j * 4 + r] = w_r . x_j. `factors`: room for 4 * J * groups floats.
template <typename Row, int J>
void dot_int8(const Row* rows, const QuantizedX<int8_t>& x, int64_t first, int64_t k, float* factors,
              float* out) {
  const int64_t groups = k / kGroup;
  const int8_t* codes = x.codes.data() + first * k;
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < J; ++j) {
      const float* x_scales = x.scales.data() + (first + j) * groups;
      scale_factors(row_scales(rows[r]), x_scales, groups, factors + (r * J + j) * groups);
    }
  }
  __m256 acc[4 * J];
#pragma GCC unroll 8
  for (int i = 0; i < 4 * J; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i xv[J];
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j) {
      xv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + j * k + g * kGroup));
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256i w = group_bytes(rows[r], g);
#pragma GCC unroll 2
      for (int j = 0; j < J; ++j) {
        const __m256i sums = group_sums(rows[r], w, xv[j]);
        const __m256 factor = _mm256_broadcast_ss(factors + (r * J + j) * groups + g);
        acc[r * J + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), factor, acc[r * J + j]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < J; ++j) {
      out[j * 4 + r] = hsum(acc[r * J + j]) + min_term(rows[r], x.sums.data() + (first + j) * groups, groups);
    }
  }
}

#if defined(__znver1__)
// Zen 1 (-march=native says so) issues each 256-bit integer multiply as two 128-bit halves on one pipe,
// where the 256-bit int8 path above needs 4 of them per group (pmaddubsw + pmaddwd), as many as int16's.
// In 128-bit registers a Q4 group's low and high halves are summed in int16 between the two multiplies
// (both the same group: at most 2 * 3810), so 3 per group.
inline float hsum128(__m128 v) {
  const __m128 t = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <int J>
void dot_int8_q4_128(const Q4Row* rows, const QuantizedX<int8_t>& x, int64_t first, int64_t k,
                     float* factors, float* out) {
  const int64_t groups = k / kGroup;
  const int8_t* codes = x.codes.data() + first * k;
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < J; ++j) {
      const float* x_scales = x.scales.data() + (first + j) * groups;
      scale_factors(rows[r].scale_min, x_scales, groups, factors + (r * J + j) * groups);
    }
  }
  const __m128i mask = _mm_set1_epi8(0x0F), ones = _mm_set1_epi16(1);
  __m128 acc[4 * J];
#pragma GCC unroll 8
  for (int i = 0; i < 4 * J; ++i) acc[i] = _mm_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m128i x_lo[J], x_hi[J];
#pragma GCC unroll 2
    for (int j = 0; j < J; ++j) {
      const __m128i* xg = reinterpret_cast<const __m128i*>(codes + j * k + g * kGroup);
      x_lo[j] = _mm_loadu_si128(xg);
      x_hi[j] = _mm_loadu_si128(xg + 1);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r].codes + g * kGroup / 2));
      const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
#pragma GCC unroll 2
      for (int j = 0; j < J; ++j) {
        const __m128i pairs = _mm_add_epi16(_mm_maddubs_epi16(lo, x_lo[j]), _mm_maddubs_epi16(hi, x_hi[j]));
        const __m128 sums = _mm_cvtepi32_ps(_mm_madd_epi16(pairs, ones));
        const __m128 factor = _mm_broadcast_ss(factors + (r * J + j) * groups + g);
        acc[r * J + j] = _mm_fmadd_ps(sums, factor, acc[r * J + j]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < J; ++j) {
      const float* x_sums = x.sums.data() + (first + j) * groups;
      out[j * 4 + r] = hsum128(acc[r * J + j]) + min_term(rows[r], x_sums, groups);
    }
  }
}
#endif
#else
// int8 without AVX2: plain loops, the same integer products and factors.
inline int32_t group_dot(const Q4Row& row, int64_t g, const int8_t* x) {
  const uint8_t* p = row.codes + g * kGroup / 2;
  int32_t sum = 0;
  for (int i = 0; i < 16; ++i) sum += (p[i] & 0x0F) * x[i] + (p[i] >> 4) * x[i + 16];
  return sum;
}

inline int32_t group_dot(const Q8Row& row, int64_t g, const int8_t* x) {
  const int8_t* p = row.codes + g * kGroup;
  int32_t sum = 0;
  for (int i = 0; i < kGroup; ++i) sum += p[i] * x[i];
  return sum;
}

inline float min_term(const Q4Row& row, const float* x_sums, int64_t groups) {
  float sum = 0.0f;
  for (int64_t g = 0; g < groups; ++g) sum += half_to_float(row.scale_min[groups + g]) * x_sums[g];
  return sum;
}

inline float min_term(const Q8Row&, const float*, int64_t) { return 0.0f; }

template <typename Row>
float dot_int8_plain(const Row& row, const QuantizedX<int8_t>& x, int64_t j, int64_t k) {
  const int64_t groups = k / kGroup;
  const int8_t* codes = x.codes.data() + j * k;
  const float* x_scales = x.scales.data() + j * groups;
  float sum = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const float factor = half_to_float(row_scales(row)[g]) * x_scales[g];
    sum += static_cast<float>(group_dot(row, g, codes + g * kGroup)) * factor;
  }
  return sum + min_term(row, x.sums.data() + j * groups, groups);
}
#endif

#if defined(DUOSERVE_AVX2)
template <typename Row, int J>
inline void dot_int8_rows(const Row* rows, const QuantizedX<int8_t>& x, int64_t first, int64_t k,
                          float* factors, float* out) {
#if defined(__znver1__)
  if constexpr (std::is_same_v<Row, Q4Row>) {
    dot_int8_q4_128<J>(rows, x, first, k, factors, out);
    return;
  }
#endif
  dot_int8<Row, J>(rows, x, first, k, factors, out);
}
#endif

// y[R, N] with every row of x rounded to int8: output rows 4 at a time, each group of their codes
// loaded once for 2 rows of x and the 4 rows' codes (a few KB) in L1 for the next rows of x, so the
// weights are read from memory once whatever R.
template <typename Row, typename RowAt>
void int8_matmul(const float* xp, int64_t rows, int64_t k, int64_t n_out, float* yp, RowAt row_at) {
  const QuantizedX<int8_t> xq = quantize_x<int8_t>(xp, rows, k);
  const int64_t tasks = (n_out + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / k);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> factors(8 * (k / kGroup));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = 4 * task;
      const int count = static_cast<int>(std::min<int64_t>(4, n_out - n));
      // A last task of fewer than 4 rows repeats its last row and keeps only its own results.
      Row four[4];
      for (int r = 0; r < 4; ++r) four[r] = row_at(n + std::min(r, count - 1));
#if defined(DUOSERVE_AVX2)
      float out[8];
      int64_t j = 0;
      for (; j + 2 <= rows; j += 2) {
        dot_int8_rows<Row, 2>(four, xq, j, k, factors.data(), out);
        for (int i = 0; i < 2; ++i) std::copy(out + 4 * i, out + 4 * i + count, yp + (j + i) * n_out + n);
      }
      if (j < rows) {
        dot_int8_rows<Row, 1>(four, xq, j, k, factors.data(), out);
        std::copy(out, out + count, yp + j * n_out + n);
      }
#else
      for (int64_t j = 0; j < rows; ++j) {
        for (int r = 0; r < count; ++r) yp[j * n_out + n + r] = dot_int8_plain(four[r], xq, j, k);
      }
#endif
    }
  });
}

// ---- Several rows of x in int16: a GEMM over panels of 16 output rows ---------------------------------

#if defined(DUOSERVE_AVX2)
// A step of several rows multiplies int16 codes of x with the weight codes widened to int16, 16 output
// rows at a time: one pmaddwd takes 8 output rows' pairs of values (value i and value i + 16 of a group)
// against one pair of x broadcast, into int32 sums that are scaled once per group. That is half the
// uops of float32 FMAs per product, and on Zen 3 pmaddwd issues on two pipes (FP0, FP3) while the int32
// adds take the two others: up to 2x the float32 FMA rate there (the FMA's FP0/FP1). On an Intel core
// built for AVX2, whose adds share the multiplies' ports, the main loop ran 1.14x MKL's float32 GEMM on a
// ready matrix (138 vs 121 GFLOP/s, one thread), and took 0.50-0.84x the time of float32 tiles + GEMM
// at 16-256 rows, 0.89-1.01x at 1,024-3,800 (two runs; BENCHMARKS.md). The rounding is the 1-row path's (int16 per group of 32):
// a row's result does not depend on which other rows share its step.
constexpr int kPanel = 16;  // output rows per panel: two vectors of 8 int32 lanes
constexpr int kPairs = kGroup / 2;  // a group's 32 values as 16 pairs (value i, value i + 16)
constexpr int kTileRows = 4;  // rows of x per tile: 8 accumulators, 2 weight vectors, 1 broadcast x

// One output row's group as 16 int32 pairs (value i in the low half, value i + 16 in the high half).
inline void group_pairs(const Q4Row& row, int64_t g, __m256i out[2]) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.codes + g * kGroup / 2));
  for (int h = 0; h < 2; ++h) {
    const __m256i bytes = _mm256_cvtepu8_epi32(h == 0 ? raw : _mm_srli_si128(raw, 8));
    const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0F));
    const __m256i hi = _mm256_slli_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(0xF0)), 12);
    out[h] = _mm256_or_si256(lo, hi);
  }
}

inline void group_pairs(const Q8Row& row, int64_t g, __m256i out[2]) {
  const int8_t* p = row.codes + g * kGroup;
  for (int h = 0; h < 2; ++h) {
    const auto widen = [](const int8_t* bytes) {
      return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    };
    const __m256i lo = widen(p + 8 * h), hi = widen(p + 16 + 8 * h);
    out[h] = _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(hi, 16));
  }
}

// An 8 x 8 matrix of int32 in 8 vectors, transposed in place.
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// The panel's 16 output rows' fp16 factors per group (`of(row)`: a row's scales or mins, [groups]) as
// float32 [groups][16]: 8 groups of 8 rows converted and transposed at a time (one value at a time, a
// 2-row step of SmolLM2's matrices took 10% longer).
template <typename Row, typename Of>
void pack_factors(const Row* rows, int64_t groups, float* out, Of of) {
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    for (int c0 = 0; c0 < kPanel; c0 += 8) {
      __m256i block[8];
      for (int j = 0; j < 8; ++j) {
        const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(of(rows[c0 + j]) + g));
        block[j] = _mm256_castps_si256(_mm256_cvtph_ps(half));
      }
      transpose8(block);
      for (int i = 0; i < 8; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (g + i) * kPanel + c0), block[i]);
      }
    }
  }
  for (; g < groups; ++g) {
    for (int c = 0; c < kPanel; ++c) out[g * kPanel + c] = half_to_float(of(rows[c])[g]);
  }
}

// A panel's codes as the tiles read them: pairs [groups][16 pairs][16 output rows], scales and mins
// [groups][16 output rows] in float32. Packed once per panel, read by every row of x.
struct Panel {
  std::vector<int32_t> pairs;
  std::vector<float> scales, mins;
  explicit Panel(int64_t groups)
      : pairs(groups * kPairs * kPanel), scales(groups * kPanel), mins(groups * kPanel) {}
};

// Output rows n, n + 1, ... (count of them; a short last panel repeats its last row) into `panel`.
template <typename Row, typename RowAt>
void pack_panel(RowAt row_at, int64_t n, int count, int64_t groups, Panel& panel) {
  Row rows[kPanel];
  for (int c = 0; c < kPanel; ++c) rows[c] = row_at(n + std::min(c, count - 1));
  for (int64_t g = 0; g < groups; ++g) {
    for (int c0 = 0; c0 < kPanel; c0 += 8) {
      __m256i halves[2][8];  // [pairs 0-7 or 8-15][output row]: transposed to [pair][output row]
      for (int j = 0; j < 8; ++j) {
        __m256i both[2];
        group_pairs(rows[c0 + j], g, both);
        halves[0][j] = both[0];
        halves[1][j] = both[1];
      }
      for (int h = 0; h < 2; ++h) {
        transpose8(halves[h]);
        for (int i = 0; i < 8; ++i) {
          int32_t* out = panel.pairs.data() + (g * kPairs + 8 * h + i) * kPanel + c0;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), halves[h][i]);
        }
      }
    }
  }
  pack_factors(rows, groups, panel.scales.data(), [](const Row& row) { return row_scales(row); });
  if constexpr (std::is_same_v<Row, Q4Row>) {
    pack_factors(rows, groups, panel.mins.data(), [=](const Row& row) { return row.scale_min + groups; });
  }
}

// x rounded as the 1-row path rounds it, its codes paired as the panels' ([rows][groups][16] int32).
struct PairedX {
  std::vector<int32_t> pairs;
  std::vector<float> scales, sums;  // [rows][groups]: the rounding's scale, the exact sum of x

  struct View {  // rows from one on
    const int32_t* pairs;
    const float* scales;
    const float* sums;
  };
  View rows(int64_t first, int64_t groups) const {
    const int64_t at = first * groups;
    return {pairs.data() + at * kPairs, scales.data() + at, sums.data() + at};
  }
};

// The 1-row path's rounding (quantize_x), vectorized and over the threads: with quantize_x's one value at
// a time on one thread, and before the blocks of rows below, a 3,800-row pass of SmolLM2's matrices took
// 664 ms, 546 after both. cvtps_epi32 rounds to nearest even, as nearbyint.
PairedX pair_x(const float* x, int64_t rows, int64_t k) {
  const int64_t groups = rows * (k / kGroup);
  PairedX paired{std::vector<int32_t>(groups * kPairs), std::vector<float>(groups),
                 std::vector<float>(groups)};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const float* xg = x + g * kGroup;
      __m256 v[4], peak = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xg + 8 * i);
        peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v[i]));
        sum = _mm256_add_ps(sum, v[i]);
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
      const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
      __m256i codes[4];
      for (int i = 0; i < 4; ++i) codes[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
      for (int h = 0; h < 2; ++h) {  // pairs 8h..8h+7: values 8h.. and 16 + 8h..
        const __m256i lo = _mm256_and_si256(codes[h], _mm256_set1_epi32(0xFFFF));
        const __m256i pair = _mm256_or_si256(lo, _mm256_slli_epi32(codes[h + 2], 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(paired.pairs.data() + g * kPairs + 8 * h), pair);
      }
      paired.scales[g] = top / 32767.0f;
      paired.sums[g] = hsum(sum);
    }
  });
  return paired;
}

// sums + the pairs' products: one vpdpwssd with AVX512-VNNI or AVX-VNNI (-march=native where the CPU
// has them), else pmaddwd and an add.
inline __m256i madd_add(__m256i sums, __m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(sums, w, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(sums, w, x);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(w, x));
#endif
}

// y[M rows of x, 16 output rows] (row stride ldy) from a packed panel; x: that many rows' pairs, scales
// and sums. Each group's int32 sums are scaled into float32 accumulators: scale * x_scale * sum (+ Q4's
// min * sum of x).
template <int M, bool kHasMin>
void int16_tile(const Panel& panel, const int32_t* x_pairs, const float* x_scales, const float* x_sums,
                int64_t groups, float* y, int64_t ldy) {
  __m256 acc[M][2];
  for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i sums[M][2];
    for (int r = 0; r < M; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
    const int32_t* w = panel.pairs.data() + g * kPairs * kPanel;
#pragma GCC unroll 16
    for (int p = 0; p < kPairs; ++p) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * kPanel));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * kPanel + 8));
#pragma GCC unroll 4
      for (int r = 0; r < M; ++r) {
        const __m256i xb = _mm256_set1_epi32(x_pairs[(r * groups + g) * kPairs + p]);
        sums[r][0] = madd_add(sums[r][0], w0, xb);
        sums[r][1] = madd_add(sums[r][1], w1, xb);
        // Each sum a chain of its own: unrolled, gcc otherwise reassociates the adds into a tree of all
        // 16 products, which spills them to the stack (0.6x the speed).
        asm("" : "+x"(sums[r][0]), "+x"(sums[r][1]));
      }
    }
    const __m256 s0 = _mm256_loadu_ps(panel.scales.data() + g * kPanel);
    const __m256 s1 = _mm256_loadu_ps(panel.scales.data() + g * kPanel + 8);
    for (int r = 0; r < M; ++r) {
      const __m256 x_scale = _mm256_broadcast_ss(x_scales + r * groups + g);
      acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][0]), _mm256_mul_ps(s0, x_scale), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][1]), _mm256_mul_ps(s1, x_scale), acc[r][1]);
      if constexpr (kHasMin) {
        const __m256 x_sum = _mm256_broadcast_ss(x_sums + r * groups + g);
        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(panel.mins.data() + g * kPanel), x_sum, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(panel.mins.data() + g * kPanel + 8), x_sum, acc[r][1]);
      }
    }
  }
  for (int r = 0; r < M; ++r) {
    _mm256_storeu_ps(y + r * ldy, acc[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, acc[r][1]);
  }
}

template <bool kHasMin>
void int16_tiles(const Panel& panel, const PairedX::View& x, int64_t rows, int64_t groups, float* y,
                 int64_t ldy) {
  const auto tile = [&](auto m, int64_t r) {
    int16_tile<decltype(m)::value, kHasMin>(panel, x.pairs + r * groups * kPairs, x.scales + r * groups,
                                            x.sums + r * groups, groups, y + r * ldy, ldy);
  };
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) tile(std::integral_constant<int, kTileRows>{}, r);
  switch (rows - r) {
    case 3: tile(std::integral_constant<int, 3>{}, r); break;
    case 2: tile(std::integral_constant<int, 2>{}, r); break;
    case 1: tile(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// Rows of x per block: a block's int16 codes (rows x K x 2 bytes) stay in a 512 KB L2 beside a panel while
// every panel reads them. Unblocked, a 3,800-row prefill step re-read its whole x from memory for each
// panel.
constexpr int64_t kBlockBytes = 256 << 10;

// y[R, N] for R >= 2 rows of x in int16: blocks of rows, and within each, panels of 16 output rows over
// the threads, each packed once per block and multiplied with its every row. A short last panel computes
// into a buffer and keeps its own columns.
template <typename Row, typename RowAt>
void int16_matmul(const float* xp, int64_t rows, int64_t k, int64_t n_out, float* yp, RowAt row_at) {
  const PairedX x = pair_x(xp, rows, k);
  const int64_t groups = k / kGroup;
  const int64_t panels = (n_out + kPanel - 1) / kPanel;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (k * kPanel));
  const int64_t block = std::max<int64_t>(kTileRows, kBlockBytes / (2 * k) / kTileRows * kTileRows);
  for (int64_t first = 0; first < rows; first += block) {
    const int64_t count_rows = std::min(block, rows - first);
    const PairedX::View view = x.rows(first, groups);
    at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
      Panel panel(groups);
      std::vector<float> partial;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task * kPanel;
        const int count = static_cast<int>(std::min<int64_t>(kPanel, n_out - n));
        pack_panel<Row>(row_at, n, count, groups, panel);
        const bool whole = count == kPanel;
        if (!whole) partial.resize(count_rows * kPanel);
        float* out = whole ? yp + first * n_out + n : partial.data();
        const int64_t ldy = whole ? n_out : kPanel;
        int16_tiles<std::is_same_v<Row, Q4Row>>(panel, view, count_rows, groups, out, ldy);
        for (int64_t r = 0; !whole && r < count_rows; ++r) {
          float* row = partial.data() + r * kPanel;
          std::copy(row, row + count, yp + (first + r) * n_out + n);
        }
      }
    });
  }
}
#else
// Without AVX2, several rows of x: each output row expanded once to float32, then plain dot products.
void dot_rows(const float* w, const float* x, int64_t rows, int64_t k, int64_t n_out, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    float sum = 0.0f;
    for (int64_t i = 0; i < k; ++i) sum += w[i] * xr[i];
    y[r * n_out] = sum;
  }
}
#endif

// activation_bits 16: every row of x in int16 (one row: a GEMV, several: the panel GEMM); without AVX2,
// float32 plain loops. 8: every row of x in int8.
template <typename Row, typename RowAt>
at::Tensor quantized_matmul(const at::Tensor& x, int64_t n_out, int64_t activation_bits, RowAt row_at) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16, "activation_bits must be 8 or 16");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kGroup == 0, "in_features must be a multiple of 32");
  at::Tensor y = at::empty({rows, n_out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (activation_bits == 8) {
    int8_matmul<Row>(xp, rows, k, n_out, yp, row_at);
    return y;
  }
  // Enough output rows per task that a task reads a few hundred KB: thread start-up stays small.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / k);
#if defined(DUOSERVE_AVX2)
  if (rows > 1) {
    int16_matmul<Row>(xp, rows, k, n_out, yp, row_at);
    return y;
  }
  // One row of x: output rows 4 at a time in registers; a last task of fewer than 4 repeats its last
  // row and keeps only its own results.
  const QuantizedX<int16_t> x_one = quantize_x<int16_t>(xp, 1, k);
  at::parallel_for(0, (n_out + 3) / 4, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> factors(4 * (k / kGroup));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = 4 * task;
      const int count = static_cast<int>(std::min<int64_t>(4, n_out - n));
      Row four[4];
      float out[4];
      for (int r = 0; r < 4; ++r) four[r] = row_at(n + std::min(r, count - 1));
      dot_one_x(four, x_one, k, factors.data(), out);
      std::copy(out, out + count, yp + n);
    }
  });
#else
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(k);
    for (int64_t n = begin; n < end; ++n) {
      expand(row_at(n), k, weights.data());
      dot_rows(weights.data(), xp, rows, k, n_out, yp + n);
    }
  });
#endif
  return y;
}

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_min,
                     int64_t activation_bits) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scale_min.scalar_type() == at::kHalf && scale_min.is_contiguous(), "scale_min must be fp16");
  const int64_t n_out = codes.size(0), k = x.size(1);
  TORCH_CHECK(codes.size(1) * 2 == k && scale_min.numel() == n_out * (k / kGroup) * 2, "shape mismatch");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint16_t* sm = reinterpret_cast<const uint16_t*>(scale_min.data_ptr<at::Half>());
  return quantized_matmul<Q4Row>(x, n_out, activation_bits, [=](int64_t n) {
    return Q4Row{c + n * (k / 2), sm + n * (k / kGroup) * 2};
  });
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     int64_t activation_bits) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous(), "codes must be contiguous int8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales must be fp16");
  const int64_t n_out = codes.size(0), k = x.size(1);
  TORCH_CHECK(codes.size(1) == k && scales.numel() == n_out * (k / kGroup), "shape mismatch");
  const int8_t* c = codes.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return quantized_matmul<Q8Row>(x, n_out, activation_bits, [=](int64_t n) {
    return Q8Row{c + n * k, s + n * (k / kGroup)};
  });
}

// Rows start:end of the weight as float32 into `out` [end - start, K] (tiles for many-row steps).
template <typename Row, typename RowAt>
void dequantize_rows(int64_t start, int64_t end, const at::Tensor& out, RowAt row_at) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == end - start,
              "out must be a contiguous float32 [end - start, K] matrix");
  const int64_t k = out.size(1);
  float* o = out.data_ptr<float>();
  at::parallel_for(start, end, std::max<int64_t>(1, (1 << 16) / k), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) expand(row_at(n), k, o + (n - start) * k);
  });
}

void q4_dequantize(const at::Tensor& codes, const at::Tensor& scale_min, int64_t start, int64_t end,
                   const at::Tensor& out) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && scale_min.is_contiguous());
  TORCH_CHECK(start >= 0 && start <= end && end <= codes.size(0), "rows out of range");
  const int64_t k = codes.size(1) * 2;
  TORCH_CHECK(out.size(1) == k, "out has the wrong width");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint16_t* sm = reinterpret_cast<const uint16_t*>(scale_min.data_ptr<at::Half>());
  dequantize_rows<Q4Row>(start, end, out, [=](int64_t n) {
    return Q4Row{c + n * (k / 2), sm + n * (k / kGroup) * 2};
  });
}

void q8_dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t start, int64_t end,
                   const at::Tensor& out) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && scales.is_contiguous());
  TORCH_CHECK(start >= 0 && start <= end && end <= codes.size(0), "rows out of range");
  const int64_t k = codes.size(1);
  TORCH_CHECK(out.size(1) == k, "out has the wrong width");
  const int8_t* c = codes.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  dequantize_rows<Q8Row>(start, end, out, [=](int64_t n) {
    return Q8Row{c + n * k, s + n * (k / kGroup)};
  });
}

}  // namespace

namespace duoserve {

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_min,
                     int64_t activation_bits) {
  return ::q4_matmul(x, codes, scale_min, activation_bits);
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     int64_t activation_bits) {
  return ::q8_matmul(x, codes, scales, activation_bits);
}

}  // namespace duoserve

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("q4_matmul(Tensor x, Tensor codes, Tensor scale_min, int activation_bits=16) -> Tensor", &q4_matmul);
  m.def("q8_matmul(Tensor x, Tensor codes, Tensor scales, int activation_bits=16) -> Tensor", &q8_matmul);
  m.def("q4_dequantize(Tensor codes, Tensor scale_min, int start, int end, Tensor(a!) out) -> ()",
        &q4_dequantize);
  m.def("q8_dequantize(Tensor codes, Tensor scales, int start, int end, Tensor(a!) out) -> ()",
        &q8_dequantize);
}
