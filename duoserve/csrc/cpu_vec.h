// Vector helpers the CPU kernels share (AVX-512 only; each kernel has its own fallbacks).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace duoserve {

// 16 bfloat16 values (their 16-bit words) widened to float32: exact.
inline __m512 widen_bf16(__m256i words) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16));
}
inline __m512 load_bf16(const void* p) { return widen_bf16(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }

#if defined(__AVX512BF16__)
// 16 floats rounded to bfloat16, nearest even: c10::BFloat16's rounding in one instruction (NaNs keep
// their sign and payload's top bits instead of becoming c10's one NaN).
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
#endif

// exp(x) for x in the range the callers clamp it to, 16 lanes, relative error ~1e-7: 2^n * 2^f with
// n = round(x * log2 e), f in [-0.5, 0.5], 2^f by its Taylor series to degree 7; _mm512_scalef_ps
// multiplies by 2^n (inf past 2^127, 0 below the denormals). libm's scalar expf would dominate an
// attention kernel.
inline __m512 exp_clamped16(__m512 x) {
  const __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(y, n), _mm512_set1_ps(0.6931471805599453f));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// exp(x) for x <= 0 (scores minus their running max).
inline __m512 exp_nonpositive16(__m512 x) { return exp_clamped16(_mm512_max_ps(x, _mm512_set1_ps(-87.0f))); }

// exp(x) for any x: inf above ~88.7 (as expf), 0 below ~-104 (a NaN-free clamp of +-inf).
inline __m512 exp16(__m512 x) {
  return exp_clamped16(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(100.0f)));
}

}  // namespace duoserve

#endif
