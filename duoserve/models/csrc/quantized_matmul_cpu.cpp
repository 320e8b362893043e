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
// One output row's codes are expanded to float32 in registers (1 row of x), or once into an L1 buffer
// that several rows of x then read (2+ rows). Work is split over output rows, in pairs, which share
// every load of x. The fast paths need AVX2 + FMA + F16C; other CPUs take plain loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// ---- One row of x: integer dot products ------------------------------------------------------------

// One row of x is rounded to int16 per group of 32 (scale = max |x| / 32767: a relative error of at most
// 1.5e-5 of the group's largest value, 250x finer than bfloat16), so that a group's 32 products are two
// pmaddwd instructions instead of unpacking 32 codes to floats: the float path was compute-bound at 1 row
// (20 ms for SmolLM2's matmuls against ~4 ms of memory traffic on a 2-core Zen 1), this is 2x fewer
// instructions. Q4's min term uses the exact float32 sum of each group of x.
struct QuantizedX {
  std::vector<int16_t> codes;  // [K]
  std::vector<float> scales;  // [K / 32]
  std::vector<float> sums;  // [K / 32]: sum of x over the group (Q4's min term)
};

QuantizedX quantize_x(const float* x, int64_t k) {
  QuantizedX q{std::vector<int16_t>(k), std::vector<float>(k / kGroup), std::vector<float>(k / kGroup)};
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    float peak = 0.0f, sum = 0.0f;
    for (int64_t i = 0; i < kGroup; ++i) {
      peak = std::max(peak, std::abs(xg[i]));
      sum += xg[i];
    }
    const float scale = peak / 32767.0f, inverse = peak > 0.0f ? 32767.0f / peak : 0.0f;
    for (int64_t i = 0; i < kGroup; ++i) q.codes[g * kGroup + i] = static_cast<int16_t>(std::nearbyint(xg[i] * inverse));
    q.scales[g] = scale;
    q.sums[g] = sum;
  }
  return q;
}

#if defined(DUOSERVE_AVX2)
// The 32 products of a group as 8 int32 partial sums.
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

// scale * x_scale per group of one weight row (the integer products' factor), 8 groups at a time.
inline void scale_factors(const uint16_t* scales, const QuantizedX& x, int64_t groups, float* factors) {
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g)));
    _mm256_storeu_ps(factors + g, _mm256_mul_ps(s, _mm256_loadu_ps(x.scales.data() + g)));
  }
  for (; g < groups; ++g) factors[g] = half_to_float(scales[g]) * x.scales[g];
}

// sum over groups of min * sum(x): Q4's min term; Q8 has none.
inline float min_term(const Q4Row& row, const QuantizedX& x, int64_t groups) {
  const uint16_t* mins = row.scale_min + groups;
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g)));
    acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(x.sums.data() + g), acc);
  }
  float sum = hsum(acc);
  for (; g < groups; ++g) sum += half_to_float(mins[g]) * x.sums[g];
  return sum;
}

inline float min_term(const Q8Row&, const QuantizedX&, int64_t) { return 0.0f; }

inline const uint16_t* row_scales(const Q4Row& row) { return row.scale_min; }
inline const uint16_t* row_scales(const Q8Row& row) { return row.scales; }

// y = w . x for 4 output rows, which share every load of x. (A compile-time count keeps the
// accumulators in registers: with a run-time one gcc spilled them to the stack, 1.5x slower.)
template <typename Row>
void dot_one_x(const Row* rows, const QuantizedX& x, int64_t k, float* factors, float* y) {
  const int64_t groups = k / kGroup;
  for (int r = 0; r < 4; ++r) scale_factors(row_scales(rows[r]), x, groups, factors + r * groups);
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
  y[0] = hsum(acc0) + min_term(rows[0], x, groups);
  y[1] = hsum(acc1) + min_term(rows[1], x, groups);
  y[2] = hsum(acc2) + min_term(rows[2], x, groups);
  y[3] = hsum(acc3) + min_term(rows[3], x, groups);
}
#endif

// ---- Several rows of x: each output row expanded once into a buffer --------------------------------

#if defined(DUOSERVE_AVX2)
// J rows of x (J <= 4) against one or two expanded weight rows: up to 8 accumulators.
template <int J>
void dot_block(const float* wa, const float* wb, const float* x, int64_t k, int64_t n_out, float* ya,
               float* yb) {
  __m256 acc[2 * J];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    const __m256 a = _mm256_loadu_ps(wa + i);
    const __m256 b = wb != nullptr ? _mm256_loadu_ps(wb + i) : a;
    for (int j = 0; j < J; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * k + i);
      acc[2 * j] = _mm256_fmadd_ps(a, xv, acc[2 * j]);
      if (wb != nullptr) acc[2 * j + 1] = _mm256_fmadd_ps(b, xv, acc[2 * j + 1]);
    }
  }
  for (int j = 0; j < J; ++j) {
    ya[j * n_out] = hsum(acc[2 * j]);
    if (wb != nullptr) yb[j * n_out] = hsum(acc[2 * j + 1]);
  }
}
#endif

// y[r, n] = w . x[r] for every row r of x, for one or two expanded weight rows (wb may be null).
void dot_rows(const float* wa, const float* wb, const float* x, int64_t rows, int64_t k, int64_t n_out,
              float* ya, float* yb) {
#if defined(DUOSERVE_AVX2)
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_block<4>(wa, wb, x + r * k, k, n_out, ya + r * n_out, yb + r * n_out);
  const int64_t left = rows - r;
  float* yb_r = wb != nullptr ? yb + r * n_out : nullptr;
  if (left == 3) dot_block<3>(wa, wb, x + r * k, k, n_out, ya + r * n_out, yb_r);
  if (left == 2) dot_block<2>(wa, wb, x + r * k, k, n_out, ya + r * n_out, yb_r);
  if (left == 1) dot_block<1>(wa, wb, x + r * k, k, n_out, ya + r * n_out, yb_r);
#else
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    for (int w = 0; w < (wb != nullptr ? 2 : 1); ++w) {
      const float* wr = w == 0 ? wa : wb;
      float sum = 0.0f;
      for (int64_t i = 0; i < k; ++i) sum += wr[i] * xr[i];
      (w == 0 ? ya : yb)[r * n_out] = sum;
    }
  }
#endif
}

template <typename Row, typename RowAt>
at::Tensor quantized_matmul(const at::Tensor& x, int64_t n_out, RowAt row_at) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 matrix");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(k % kGroup == 0, "in_features must be a multiple of 32");
  at::Tensor y = at::empty({rows, n_out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(DUOSERVE_AVX2)
  const QuantizedX x_one = rows == 1 ? quantize_x(xp, k) : QuantizedX{};
#endif
  // One row of x: output rows 4 at a time in registers. Several: 2 at a time, expanded into a buffer.
  const int64_t per_task = rows == 1 ? 4 : 2;
  const int64_t tasks = (n_out + per_task - 1) / per_task;
  // Enough output rows per task that a task reads a few hundred KB: thread start-up stays small.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / k);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(rows > 1 ? 2 * k : 4 * (k / kGroup));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = per_task * task;
      const int count = static_cast<int>(std::min<int64_t>(per_task, n_out - n));
#if defined(DUOSERVE_AVX2)
      if (rows == 1) {
        // A last task of fewer than 4 rows repeats its last row and keeps only its own results.
        Row four[4];
        float out[4];
        for (int r = 0; r < 4; ++r) four[r] = row_at(n + std::min(r, count - 1));
        dot_one_x(four, x_one, k, buffer.data(), out);
        std::copy(out, out + count, yp + n);
        continue;
      }
#endif
      const bool two = count == 2;
      expand(row_at(n), k, buffer.data());
      if (two) expand(row_at(n + 1), k, buffer.data() + k);
      dot_rows(buffer.data(), two ? buffer.data() + k : nullptr, xp, rows, k, n_out, yp + n,
               two ? yp + n + 1 : nullptr);
    }
  });
  return y;
}

at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_min) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  TORCH_CHECK(scale_min.scalar_type() == at::kHalf && scale_min.is_contiguous(), "scale_min must be fp16");
  const int64_t n_out = codes.size(0), k = x.size(1);
  TORCH_CHECK(codes.size(1) * 2 == k && scale_min.numel() == n_out * (k / kGroup) * 2, "shape mismatch");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint16_t* sm = reinterpret_cast<const uint16_t*>(scale_min.data_ptr<at::Half>());
  return quantized_matmul<Q4Row>(x, n_out, [=](int64_t n) {
    return Q4Row{c + n * (k / 2), sm + n * (k / kGroup) * 2};
  });
}

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous(), "codes must be contiguous int8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous(), "scales must be fp16");
  const int64_t n_out = codes.size(0), k = x.size(1);
  TORCH_CHECK(codes.size(1) == k && scales.numel() == n_out * (k / kGroup), "shape mismatch");
  const int8_t* c = codes.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  return quantized_matmul<Q8Row>(x, n_out, [=](int64_t n) {
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

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("q4_matmul(Tensor x, Tensor codes, Tensor scale_min) -> Tensor", &q4_matmul);
  m.def("q8_matmul(Tensor x, Tensor codes, Tensor scales) -> Tensor", &q8_matmul);
  m.def("q4_dequantize(Tensor codes, Tensor scale_min, int start, int end, Tensor(a!) out) -> ()",
        &q4_dequantize);
  m.def("q8_dequantize(Tensor codes, Tensor scales, int start, int end, Tensor(a!) out) -> ()",
        &q8_dequantize);
}

// ---- RMSNorm ---------------------------------------------------------------------------------------
// transformers' RMSNorm of float32 rows: x / sqrt(mean(x^2) + eps) * weight (plus_one: weight holds 1 + w,
// the same product). torch's rms_norm is a chain of 6 small ops on CPU (pow, mean, add, rsqrt, mul,
// mul): about 80 us per decode-sized call, 5 ms of a 37 ms SmolLM2 decode step on a Zen 1.
namespace {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x must be float32 [T, H]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be float32 [H]");
  const int64_t rows = x.size(0), h = x.size(1);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * h;
      // Sum of squares in double: float32 sums of 2k squares with outlier channels lose digits that
      // transformers' (float32, pairwise) mean keeps.
      double sum = 0.0;
      for (int64_t i = 0; i < h; ++i) sum += static_cast<double>(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(sum / h) + static_cast<float>(eps));
      float* yr = yp + r * h;
      for (int64_t i = 0; i < h; ++i) yr[i] = (xr[i] * inv) * wp[i];
    }
  });
  return y;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
}
