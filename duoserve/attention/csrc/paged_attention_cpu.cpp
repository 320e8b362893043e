// Paged decode attention on the CPU: each decoding sequence's one query token attends to its context
// read from the KV pool in place, block by block through its block table (no gathered copy).
//
// The query heads of a GQA group share every K/V row loaded. A work item is a sequence with all its KV
// heads; with fewer sequences than share evenly over the threads, a range of a sequence's context (the
// ranges merged by their log-sum-exp), or, where a context is too short for that, one (sequence, KV head)
// (see run). The AVX-512 kernels (head sizes 64 and 128, GQA groups up to 8: most models) and the AVX2
// ones (head sizes 64 and 128, any group; for 1-byte caches, groups up to 8, a kernel of their own) are
// described where they are defined; other shapes take a generic path of plain loops for gcc's
// auto-vectoriser with an online softmax. exp is a polynomial everywhere: libm's scalar expf would
// dominate the kernel.
//
// Two variants, both off by default and costing nothing when off: a sliding window (a query at position p
// sees keys at positions > p - window, as transformers' sliding-window mask: each walk starts at the
// first in-window token, so the blocks before it, possibly freed and reused, are never read) and Gemma 2's
// logit soft-capping (scores = cap * tanh(scores / cap) before the softmax).
//
// 1-byte caches (int8, FP8 E4M3, FP8 E5M2) are read in place too: each K/V row is widened to fp32 in
// registers as it is loaded (no widened copy of the cache), and a value is worth stored * its row's scale
// (KvScales: one float16 per (token, KV head), K's and V's apart; duoserve/kv/quant.py). The scales stay
// out of the inner loops: q . (s k) = s (q . k), so a K row's scale multiplies its score once, after the
// dot product, and a V row's multiplies its probability once, before the row is accumulated.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <torch/library.h>
#include "../../csrc/cpu_ops.h"
#include "../../csrc/cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline float widen(float x) { return x; }

inline float widen(at::BFloat16 x) {
  uint16_t raw;
  std::memcpy(&raw, &x, sizeof(raw));
  const uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float widen(at::Half x) { return static_cast<float>(x); }

// 1-byte caches: the stored value, exactly (its KV head's scale is applied apart).
inline float widen(int8_t x) { return static_cast<float>(x); }
inline float widen(at::Float8_e4m3fn x) { return static_cast<float>(x); }
inline float widen(at::Float8_e5m2 x) { return static_cast<float>(x); }

template <typename kv_t>
constexpr bool kOneByte = sizeof(kv_t) == 1;

// What a vectorised load of a 1-byte value (load8/load16) must be multiplied by to give the stored value:
// E4M3 is widened through an fp16 whose exponent bias is 8 more than its own (see load8), so 2^8; folded
// into the per-head scales with them.
template <typename kv_t>
constexpr float kLoadScale = std::is_same_v<kv_t, at::Float8_e4m3fn> ? 256.0f : 1.0f;

// What a 1-byte cache's stored values are worth, per row: float16 [num_blocks, block_size, num_kv_heads],
// indexed like the pool's rows without their head_dim (row index (block * block_size + t) * num_kv_heads +
// head); a K value is stored * k[row], a V value stored * v[row]. Both null for the 2- and 4-byte caches
// (their values are their own).
struct KvScales {
  const at::Half* k;
  const at::Half* v;
};

inline float scale_at(const at::Half* scales, int64_t row) { return static_cast<float>(scales[row]); }

// exp(x) for x <= 0 (scores minus their running max), relative error ~1e-7: 2^n * 2^f with
// n = round(x * log2 e), f in [-0.5, 0.5], 2^f by its Taylor series to degree 7.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float y = x * 1.4426950408889634f;
  const float n = std::floor(y + 0.5f);
  const float f = (y - n) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Shape {
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
};

// The attention variant: window 0 = none (every token of the context), soft_cap 0 = none.
struct Variant {
  int64_t window;
  float soft_cap;
  // The first context position a query at position context_len - 1 sees.
  int64_t first(int64_t context_len) const { return window > 0 ? std::max<int64_t>(0, context_len - window) : 0; }
};

// cap * tanh(x / cap), scalar (the generic path).
inline float soft_cap_scalar(float x, float cap) { return cap * std::tanh(x / cap); }

// A buffer of floats aligned for zmm loads and stores (std::vector's allocator only aligns to 16).
class AlignedFloats {
 public:
  void resize(int64_t n) { data_.reset(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64))); }
  float* data() { return data_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data_;
};

// Per-thread buffers, sized to the model. The generic path keeps a block's K (transposed) and V in fp32;
// the AVX-512 path keeps the scores (then probabilities) of the whole context, [query head][context
// rounded up to 32], a few tens of KB in L1/L2.
struct Scratch {
  std::vector<float> q, acc, kt, v, scores, running_max, running_sum;
  std::vector<float> lse;  // per query head (absolute index): log of its softmax's sum, max included
  std::vector<float> k_rows, v_rows;  // the generic path's row scales of one block (1-byte caches)
  std::vector<uint16_t> probs_bf16;
  // Per query head, as 64-byte aligned zmm: its row, its output accumulator, its running max.
  AlignedFloats qv, acc_v, max_v;
  explicit Scratch(const Shape& s)
      : q(s.num_heads / s.num_kv_heads * s.head_dim), acc(q.size()), kt(s.head_dim * s.block_size),
        v(kt.size()),
        scores(s.num_heads * std::max((s.max_blocks * s.block_size + 31) / 32 * 32, s.block_size)),
        running_max(s.num_heads), running_sum(s.num_heads), lse(s.num_heads), k_rows(s.block_size),
        v_rows(s.block_size),
        probs_bf16(scores.size()) {
    const int64_t vecs = (s.head_dim + 15) / 16;
    qv.resize(s.num_heads * vecs * 16);
    acc_v.resize(s.num_heads * vecs * 16);
    max_v.resize(s.num_heads * 16);
  }
};

// This thread's Scratch for a shape, kept between calls. Building one zero-fills its score buffers
// (hundreds of KB for a long max context): done per call, that was most of a short-context decode.
Scratch& thread_scratch(const Shape& s) {
  thread_local std::unique_ptr<Scratch> scratch;
  thread_local Shape shape{0, 0, 0, 0, 0};
  if (!scratch || shape.num_heads != s.num_heads || shape.num_kv_heads != s.num_kv_heads ||
      shape.head_dim != s.head_dim || shape.block_size != s.block_size || shape.max_blocks != s.max_blocks) {
    scratch = std::make_unique<Scratch>(s);
    shape = s;
  }
  return *scratch;
}

// (q row of the sequence, K pool, V pool, block table, context length, KV heads [begin, end), scale, ...)
using AttendFn = void (*)(const void*, const void*, const void*, const int64_t*, int64_t, int64_t, int64_t, float,
                          const Variant&, const KvScales&, const Shape&, Scratch&, void*);

template <typename q_t, typename kv_t>
void attend_one(const q_t* q, const kv_t* k_pool, const kv_t* v_pool, const int64_t* table, int64_t context_len,
                int64_t kv_head, float scale, const Variant& var, const KvScales& kv_scales, const Shape& s,
                Scratch& w, q_t* out) {
  const int64_t group = s.num_heads / s.num_kv_heads, dim = s.head_dim, bs = s.block_size;
  const float q_scale = scale;
  const int64_t token_stride = s.num_kv_heads * dim;  // between consecutive tokens of a block
  float* __restrict qf = w.q.data();
  float* __restrict acc = w.acc.data();
  float* __restrict kt = w.kt.data();  // [dim][bs]
  float* __restrict vf = w.v.data();   // [bs][dim]
  float* __restrict scores = w.scores.data();
  for (int64_t g = 0; g < group; ++g) {
    const q_t* row = q + (kv_head * group + g) * dim;
    for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = widen(row[d]) * q_scale;
    for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] = 0.0f;
    w.running_max[g] = -std::numeric_limits<float>::infinity();
    w.running_sum[g] = 0.0f;
  }
  // Tokens [lo, hi) of each block from the one holding the first visible token on.
  const int64_t first = var.first(context_len);
  const int64_t first_block = first / bs, num_blocks = (context_len + bs - 1) / bs;
  for (int64_t b = first_block; b < num_blocks; ++b) {
    const int64_t lo = b == first_block ? first % bs : 0;
    const int64_t hi = std::min(bs, context_len - b * bs);
    const int64_t first_row = table[b] * bs * s.num_kv_heads + kv_head;  // token 0's row (KvScales)
    const kv_t* k = k_pool + first_row * dim;
    const kv_t* v = v_pool + first_row * dim;
    float* __restrict k_rows = w.k_rows.data();  // a 1-byte cache's row scales of the block's tokens
    float* __restrict v_rows = w.v_rows.data();
    if constexpr (kOneByte<kv_t>) {
      for (int64_t t = lo; t < hi; ++t) {
        k_rows[t] = scale_at(kv_scales.k, first_row + t * s.num_kv_heads);
        v_rows[t] = scale_at(kv_scales.v, first_row + t * s.num_kv_heads);
      }
    }
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t d = 0; d < dim; ++d) kt[d * bs + t] = widen(k[t * token_stride + d]);
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t d = 0; d < dim; ++d) vf[t * dim + d] = widen(v[t * token_stride + d]);
    for (int64_t g = 0; g < group; ++g) {
      float* __restrict sc = scores + g * bs;
      const float* __restrict qg = qf + g * dim;
      for (int64_t t = lo; t < hi; ++t) sc[t] = 0.0f;
      for (int64_t d = 0; d < dim; ++d) {
        const float qd = qg[d];
        const float* __restrict kd = kt + d * bs;
        for (int64_t t = lo; t < hi; ++t) sc[t] += qd * kd[t];
      }
      if constexpr (kOneByte<kv_t>)
        for (int64_t t = lo; t < hi; ++t) sc[t] *= k_rows[t];
      if (var.soft_cap > 0.0f)
        for (int64_t t = lo; t < hi; ++t) sc[t] = soft_cap_scalar(sc[t], var.soft_cap);
      float block_max = sc[lo];
      for (int64_t t = lo + 1; t < hi; ++t) block_max = std::max(block_max, sc[t]);
      const float new_max = std::max(w.running_max[g], block_max);
      // The first block has no running state: its correction factor is 0 (exp(-inf)).
      const float correction = b == first_block ? 0.0f : exp_nonpositive(w.running_max[g] - new_max);
      for (int64_t t = lo; t < hi; ++t) sc[t] = exp_nonpositive(sc[t] - new_max);  // vectorised apart
      float block_sum = 0.0f;
      for (int64_t t = lo; t < hi; ++t) block_sum += sc[t];
      w.running_sum[g] = w.running_sum[g] * correction + block_sum;
      w.running_max[g] = new_max;
      float* __restrict a = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
      for (int64_t t = lo; t < hi; ++t) {
        float p = sc[t];
        if constexpr (kOneByte<kv_t>) p *= v_rows[t];
        const float* __restrict vt = vf + t * dim;
        for (int64_t d = 0; d < dim; ++d) a[d] += p * vt[d];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.0f / w.running_sum[g];
    w.lse[kv_head * group + g] = w.running_max[g] + std::log(w.running_sum[g]);
    q_t* row = out + (kv_head * group + g) * dim;
    for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<q_t>(acc[g * dim + d] * inv);
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The pool is far bigger than the caches and a sequence's blocks are scattered in it: each chunk of 16
// tokens fetches every line of the next chunk while it computes (measured on a 2-core Xeon, 256
// sequences of 64-640 tokens, KV from DRAM: 8.4 -> 5.4 ms per layer; 32 or 64 tokens ahead, or every
// other line only, were slower).
constexpr int64_t kPrefetchTokens = 16;

// prefetcht0 as volatile asm: C++ lets the compiler delete a loop with no observable effect
// (-ffinite-loops), and gcc 12 at -O3 deleted loops of _mm_prefetch calls as such.
inline void prefetch_line(const char* p) { asm volatile("prefetcht0 %0" : : "m"(*p)); }

// Rows [head_begin, head_end) of the (up to) `count` tokens from `start` on: contiguous within each token.
template <typename kv_t>
inline void prefetch_rows(const kv_t* pool, const int64_t* table, int64_t start, int64_t context_len,
                          int64_t head_begin, int64_t head_end, int64_t dim, const Shape& s, int64_t count = 16) {
  if (start >= context_len) return;
  const int64_t bs = s.block_size, token_stride = s.num_kv_heads * dim;
  const int64_t offset = ((table[start / bs] * bs + start % bs) * s.num_kv_heads + head_begin) * dim;
  const int64_t n = std::min({count, bs - start % bs, context_len - start});
  const int64_t bytes = (head_end - head_begin) * dim * int64_t(sizeof(kv_t));
  const char* first = reinterpret_cast<const char*>(pool + offset);
  if (head_end - head_begin == s.num_kv_heads) {  // one contiguous span
    for (int64_t byte = 0; byte < n * bytes; byte += 64) prefetch_line(first + byte);
    return;
  }
  for (int64_t t = 0; t < n; ++t) {
    const char* row = reinterpret_cast<const char*>(pool + offset + t * token_stride);
    for (int64_t byte = 0; byte < bytes; byte += 64) prefetch_line(row + byte);
  }
}

// A 1-byte cache's row scales of the chunk at `start` (up to 16 x num_kv_heads float16, at most 2 lines).
inline void prefetch_scales(const at::Half* scales, const int64_t* table, int64_t start, int64_t context_len,
                            const Shape& s) {
  if (start >= context_len) return;
  const int64_t bs = s.block_size, row = (table[start / bs] * bs + start % bs) * s.num_kv_heads;
  const char* first = reinterpret_cast<const char*>(scales + row);
  prefetch_line(first);
  prefetch_line(first + 16 * s.num_kv_heads * int64_t(sizeof(at::Half)) - 1);
}

// Part `part` of `parts` (by lines) of what prefetch_rows fetches, when the item has every KV head (one
// contiguous span); otherwise all of it at part 0.
template <typename kv_t>
inline void prefetch_part(const kv_t* pool, const int64_t* table, int64_t start, int64_t context_len,
                          int64_t head_begin, int64_t head_end, int64_t dim, const Shape& s, int64_t part,
                          int64_t parts) {
  if (start >= context_len) return;
  if (head_end - head_begin != s.num_kv_heads) {
    if (part == 0) prefetch_rows(pool, table, start, context_len, head_begin, head_end, dim, s);
    return;
  }
  const int64_t bs = s.block_size;
  const int64_t offset = (table[start / bs] * bs + start % bs) * s.num_kv_heads * dim;
  const int64_t n = std::min({int64_t{16}, bs - start % bs, context_len - start});
  const int64_t lines = (n * s.num_kv_heads * dim * int64_t(sizeof(kv_t)) + 63) / 64;
  const char* first = reinterpret_cast<const char*>(pool + offset);
  for (int64_t line = lines * part / parts; line < lines * (part + 1) / parts; ++line) prefetch_line(first + 64 * line);
}
#endif

#if defined(__AVX512F__)
// The AVX-512 path, for head sizes that are a multiple of 16 (64 and 128: most models): one zmm holds
// 16 fp32 lanes, a K or V row is kVecs of them. Each K row is widened once and dotted with every query
// head of the group; each V row is widened once and accumulated into every head's output.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const at::BFloat16* p) { return duoserve::load_bf16(p); }

inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 1-byte values, as load8 (the AVX2 path) widens them, 16 at a time.
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512 load16(const at::Float8_e5m2* p) {
  const __m256i wide = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(_mm256_slli_epi16(wide, 8));
}

inline __m512 load16(const at::Float8_e4m3fn* p) {  // the stored value / 2^8 (kLoadScale)
  const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i bits = _mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
  return _mm512_cvtph_ps(bits);
}

using duoserve::exp_nonpositive16;  // csrc/cpu_vec.h

// cap * tanh(x / cap), 16 lanes: tanh|y| = (1 - e) / (1 + e) with e = exp(-2|y|), except where |y| < 0.25,
// where 1 - e would lose digits: there tanh's Taylor series to degree 9 (relative error < 1e-8); the sign
// is y's.
inline __m512 soft_cap16(__m512 x, float cap) {
  const __m512 y = _mm512_div_ps(x, _mm512_set1_ps(cap));  // a division, as torch's scores / cap
  const __m512 a = _mm512_abs_ps(y);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_nonpositive16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
  const __m512 by_exp = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 a2 = _mm512_mul_ps(a, a);
  __m512 p = _mm512_set1_ps(62.0f / 2835.0f);
  p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(-17.0f / 315.0f));
  p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(2.0f / 15.0f));
  p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(-1.0f / 3.0f));
  p = _mm512_fmadd_ps(p, a2, one);
  const __m512 small = _mm512_mul_ps(p, a);
  const __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_LT_OQ), by_exp, small);
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(static_cast<int32_t>(0x80000000u)));
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign)), _mm512_set1_ps(cap));
}

// Transposed reductions of dot products, as hsum16(v)[t] = the sum of v[t]'s 16 lanes for 16 vectors, in
// four levels of folds. A fold adds the two halves (adjacent lanes, pairs, 128-bit lanes, 256-bit halves)
// of two vectors a and b into one: two blends put a's kept half and b's kept half into one vector and the
// other halves into another, one shuffle lines those up with the first, one add. fold1..fold2 of 4 vectors
// leave, in each 128-bit lane L, their 4 sums over lane L; fold3..fold4 of 4 such vectors finish 16.
// Per 16 vectors: 15 adds, 15 shuffles and 30 blends, where unpacks (hsum16 before) took 30 shuffles.
inline __m512 fold1(__m512 a, __m512 b) {  // lane 2k: a[2k] + a[2k+1]; lane 2k+1: b[2k] + b[2k+1]
  const __m512 keep = _mm512_mask_blend_ps(0xAAAA, a, b), move = _mm512_mask_blend_ps(0xAAAA, b, a);
  return _mm512_add_ps(keep, _mm512_permute_ps(move, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline __m512 fold2(__m512 a, __m512 b) {  // pairs of lanes: (a 4m..4m+1 + 4m+2..4m+3) in 4m..4m+1, b's next
  const __m512 keep = _mm512_mask_blend_ps(0xCCCC, a, b), move = _mm512_mask_blend_ps(0xCCCC, b, a);
  return _mm512_add_ps(keep, _mm512_permute_ps(move, _MM_SHUFFLE(1, 0, 3, 2)));
}
inline __m512 fold3(__m512 a, __m512 b) {  // 128-bit lanes: a's lanes 0+1 in lane 0, b's in lane 1, ...
  const __m512 keep = _mm512_mask_blend_ps(0xF0F0, a, b), move = _mm512_mask_blend_ps(0xF0F0, b, a);
  return _mm512_add_ps(keep, _mm512_shuffle_f32x4(move, move, _MM_SHUFFLE(2, 3, 0, 1)));
}
inline __m512 fold4(__m512 a, __m512 b) {  // 256-bit halves
  const __m512 keep = _mm512_mask_blend_ps(0xFF00, a, b), move = _mm512_mask_blend_ps(0xFF00, b, a);
  return _mm512_add_ps(keep, _mm512_shuffle_f32x4(move, move, _MM_SHUFFLE(1, 0, 3, 2)));
}
// Of 4 vectors: lane 4L + i = v[i]'s sum over its 128-bit lane L.
inline __m512 fold4x(const __m512* v) { return fold2(fold1(v[0], v[1]), fold1(v[2], v[3])); }
// Of 4 fold4x results x[q] (tokens 4q..4q+3): lane t = token t's whole sum.
inline __m512 fold16(const __m512* x) { return fold4(fold3(x[0], x[1]), fold3(x[2], x[3])); }

// A 1-byte cache's row scales of one chunk (up to 16 tokens of one block; float16 at a stride of
// num_kv_heads, the item's KV heads adjacent), 16 per KV head as fp32 (0 past the chunk's tokens). With up
// to 4 KV heads, the chunk's scales of the item are at most 64 words: two masked loads per chunk, one
// vpermt2w and one vcvtph2ps per KV head. Before, each of the 16 was converted by c10's scalar float16
// routine (software: ~20 instructions), twice per (token, KV head): a fifth of a 1-byte cache's decode.
class ChunkScales {
 public:
  ChunkScales(const at::Half* scales, int64_t num_kv_heads) : scales_(scales), stride_(num_kv_heads) {
    alignas(64) int16_t index[32] = {};
    for (int t = 0; t < 16; ++t) index[t] = static_cast<int16_t>(t * num_kv_heads);
    index_ = _mm512_load_si512(index);
  }
  // The chunk of n tokens from row `row` (KvScales' index of its first token, first KV head of the item),
  // `heads` KV heads.
  void load(int64_t row, int64_t n, int64_t heads) {
    base_ = scales_ + row;
    n_ = n;
    live_ = static_cast<__mmask32>((1u << n) - 1);
    if (stride_ <= 4) {
      const int64_t words = (n - 1) * stride_ + heads;  // <= 64
      lo_ = _mm512_maskz_loadu_epi16(words_mask(words), base_);
      hi_ = words > 32 ? _mm512_maskz_loadu_epi16(words_mask(words - 32), base_ + 32) : _mm512_setzero_si512();
    }
  }
  // The item's KV head kv's 16 scales.
  __m512 of(int64_t kv) const {
    if (stride_ <= 4) {
      const __m512i at = _mm512_add_epi16(index_, _mm512_set1_epi16(static_cast<int16_t>(kv)));
      return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_permutex2var_epi16(live_, lo_, at, hi_)));
    }
    alignas(64) float out[16];
    for (int64_t t = 0; t < 16; ++t) out[t] = t < n_ ? _cvtsh_ss(base_[t * stride_ + kv].x) : 0.0f;
    return _mm512_load_ps(out);
  }

 private:
  static __mmask32 words_mask(int64_t words) {
    return words >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << words) - 1);
  }
  const at::Half* scales_;
  int64_t stride_;
  __m512i index_, lo_ = _mm512_setzero_si512(), hi_ = _mm512_setzero_si512();
  const at::Half* base_ = nullptr;
  int64_t n_ = 0;
  __mmask32 live_ = 0;
};

// The AVX-512 kernel for KV heads [head_begin, head_end) of one sequence, kVecs zmm per head row
// (head_dim = 16 * kVecs) and kGroup query heads per KV head, in three passes over the context rather
// than an online softmax:
//   1. scores: each K row is loaded once and dotted with the group's queries;
//      16 tokens' dot products reduce into one vector of scores (fold4x per 4 tokens, then fold16);
//   2. softmax over the whole context's scores (a few KB, in L1);
//   3. each V row is loaded once and accumulated, weighted, into the group's outputs (registers over a
//      chunk).
// The passes have no chain of rescalings from one chunk to the next, so the core overlaps one chunk's
// loads with the previous chunk's arithmetic (measured with the K/V in cache: 5.3 -> 4.0 ms per layer
// against the online form).
// With bf16 queries and cache on CPUs with AVX512-BF16, vdpbf16ps multiplies pairs of bf16 values
// exactly into fp32 lanes: K rows need no widening, and V rows of two tokens interleave into
// (v_t[d], v_t+1[d]) pairs weighted by (p_t, p_t+1), the probabilities rounded to bf16 for that product
// as a bf16 GEMM of softmax(QK) and V rounds them. Other dtypes widen K/V rows to fp32.
// With a sliding window, the passes cover the context from the first visible token (`first`) on; the
// scores are stored from there ([h * padded + position - first]).
// Tuned on AMD Zen 5 (EPYC, family 26 model 2, 2 vCPUs; gcc 12 as znver3 + AVX-512), SmolLM2's shape (9
// heads / 3 KV heads x 64, blocks of 16, bf16 queries), where the kernel was compute-bound, not memory-
// bound: ~25 ns per (token, KV head) in cache, ~90 cycles for 3 x 64 multiply-adds. Per (token, KV head)
// it had spent ~40 instructions on c10's software float16 conversion of the row scales (now ChunkScales),
// 48 zmm of dot products (kGroup x 16 tokens, more than the 32 registers) held for the reduction (now
// reduced per 4 tokens: fold4x), and 16 zmm loads of the queries per token (now one per 2 tokens). FP8
// rows were widened to fp32 through vcvtph2ps (3-4 instructions per 16 values, then 2x the multiply-adds of bf16);
// they now take vdpbf16ps as bf16 does (kDotFp8), 2 instructions per 32 values. bf16 V pairs are built by
// vpunpck[lh]wd (2 per 32 dims of 2 tokens) where vpmovzxwd + shift + or took 8. Measured on a busy
// machine (another session building and benchmarking; the kernel alone, before -> after, 1 thread): 8 x 96
// tokens, 3 layers (in cache): bf16 0.021-0.026 -> 0.019 ms, E4M3/E5M2 0.026-0.033 -> 0.019, int8
// 0.024-0.029 -> 0.021; 8 x 1,024 tokens, 1 layer (K/V in L3): bf16 0.26-0.28 -> 0.19 ms,
// FP8 0.25-0.27 -> 0.16-0.18, int8 0.23-0.24 -> 0.19-0.20. From DRAM (2,048 tokens per sequence) the
// kernel waits on memory: a chunk's prefetches issued as one burst stalled on the outstanding misses;
// spread over the KV heads' iterations (prefetch_part), 1 thread, 64 sequences: ~8.5 -> ~6 ms per
// layer for every dtype (noisy); the 1-byte caches' row scales, not prefetched before, are now (8 x 64-128
// tokens, 1 thread: FP8 0.044 -> 0.038-0.042 ms, int8 0.048 -> 0.040-0.045). There the 1-byte caches gain
// less than their halved bytes: each block costs a scattered DRAM access (and a TLB miss) whatever its
// size. benchmarks/decode_attention.py, 256 x 2,048 tokens, 2 threads (busy), before -> after: bf16 48-52
// -> 34-36 ms, E4M3/E5M2 48-53 -> 24.0-24.4 (1.49-1.51x the new bf16), int8 43-48 -> 25.4 (1.43x).
// On a Sapphire Rapids-class Xeon (machine E, 2026-12-04) half the kernel's samples (perf) still sat on
// those prefetches: a KV head's share of a bf16 chunk is 32 lines, twice the core's line fill buffers.
// The K pass now issues it per two tokens (an eighth of the chunk per KV head), and so does the bf16 V
// pass: 64 sequences of 256-384 tokens, 30 layers from DRAM, 1.17-1.20 -> 1.05-1.08 ms per layer;
// 256 x 2,048 tokens, 4 layers: bf16 32.8-33.5 -> 29.4-30.0 ms, the 1-byte caches unchanged (alternated
// twice against the tree before, benchmarks/decode_attention.py).
template <typename q_t, typename kv_t>
constexpr bool kDotBf16 =
#if defined(__AVX512BF16__)
    std::is_same_v<q_t, at::BFloat16> && std::is_same_v<kv_t, at::BFloat16>;
#else
    false;
#endif

// FP8 caches under bf16 queries take vdpbf16ps too: an FP8 value's bits, moved into a bf16's fields by
// shifts, are a bf16 worth the value * 2^-kFp8Bias exactly (the FP8 exponent read with bf16's bias of 127),
// subnormals aside: bf16 subnormals are read as 0 by vdpbf16ps, and so are FP8's (under 2^-6 of a stored
// unit for E4M3, whose largest is 448; 2^-14 for E5M2), the only values this path drops. From a byte
// placed in a 16-bit word's upper half (vpermb), an arithmetic shift right puts its exponent and mantissa
// at bf16's and the sign on bits 15 to 11 (E4M3, shift 4) or 15 to 12 (E5M2, shift 3); the mask clears
// all of them but bit 15. The 2^-kFp8Bias goes back in the scale of the scores (the query is multiplied
// by 2^(kFp8Bias / 2), exactly, so that no product underflows) and, for V, kFp8Weight multiplies the
// probabilities (rounded to bf16 with their rows' scales) and 2^(kFp8Bias - kFp8Weight) the output.
template <typename q_t, typename kv_t>
constexpr bool kDotFp8 =
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
    std::is_same_v<q_t, at::BFloat16> &&
    (std::is_same_v<kv_t, at::Float8_e4m3fn> || std::is_same_v<kv_t, at::Float8_e5m2>);
#else
    false;
#endif
template <typename kv_t>
constexpr int kFp8Bias = std::is_same_v<kv_t, at::Float8_e5m2> ? 112 : 120;
constexpr int kFp8Weight = 100;  // probability * row scale (< 2^16) * 2^100 < 2^127, bf16's largest

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
// 32 FP8 values, each in the upper byte of a 16-bit word, as 32 bf16 worth value * 2^-kFp8Bias.
template <typename kv_t>
inline __m512i fp8_to_bf16(__m512i words) {
  constexpr bool e5m2 = std::is_same_v<kv_t, at::Float8_e5m2>;
  const __m512i shifted = _mm512_srai_epi16(words, e5m2 ? 3 : 4);
  return _mm512_and_si512(shifted, _mm512_set1_epi16(static_cast<int16_t>(e5m2 ? 0x8FFF : 0x87FF)));
}

// vpermb indices: byte 2i + 1 of the result <- byte `from` + i of the source (bytes 2i are zeroed by the
// mask kOddBytes), i < 32.
inline __m512i spread_bytes(int from) {
  alignas(64) uint8_t index[64] = {};
  for (int i = 0; i < 32; ++i) index[2 * i + 1] = static_cast<uint8_t>(from + i);
  return _mm512_load_si512(index);
}
// vpermt2b indices of V pairs: dword i of the result = (0, r0[from + i], 0, r1[from + i]), i < 16, where
// r0's bytes are indices 0-63 and r1's 64-127.
inline __m512i pair_bytes(int from) {
  alignas(64) uint8_t index[64] = {};
  for (int i = 0; i < 16; ++i) {
    index[4 * i + 1] = static_cast<uint8_t>(from + i);
    index[4 * i + 3] = static_cast<uint8_t>(64 + from + i);
  }
  return _mm512_load_si512(index);
}
constexpr __mmask64 kOddBytes = 0xAAAAAAAAAAAAAAAAull;
#endif

template <int kVecs, int kGroup, typename q_t, typename kv_t>
void attend_avx512(const q_t* q, const kv_t* k_pool, const kv_t* v_pool, const int64_t* table, int64_t context_len,
                   int64_t head_begin, int64_t head_end, float scale, const Variant& var, const KvScales& kv_scales,
                   const Shape& s, Scratch& w, q_t* out) {
  constexpr int64_t dim = 16 * kVecs;
  constexpr bool bf16 = kDotBf16<q_t, kv_t>, fp8 = kDotFp8<q_t, kv_t>, dot16 = bf16 || fp8;
  constexpr int kQVecs = dot16 ? kVecs / 2 : kVecs;  // zmm per query row: 32 bf16 or 16 fp32 values each
  const int64_t bs = s.block_size, token_stride = s.num_kv_heads * dim;
  const int64_t first = var.first(context_len), span = context_len - first;
  const int64_t padded = (span + 31) / 32 * 32;
  const int64_t num_heads = head_end - head_begin;
  // vdpbf16ps' scores are multiplied by this (with FP8, the query by 2^(kFp8Bias / 2) before), the
  // output by out_scale.
  float dot_scale = scale, out_scale = kLoadScale<kv_t>;
  if constexpr (fp8) {
    dot_scale = scale * std::ldexp(1.0f, kFp8Bias<kv_t> / 2);
    out_scale = std::ldexp(1.0f, kFp8Bias<kv_t> - kFp8Weight);
  }
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  const __m512i spread_lo = spread_bytes(0), spread_hi = spread_bytes(32);  // fp8: K rows
  const __m512i pair_index[4] = {pair_bytes(0), pair_bytes(16), pair_bytes(32), pair_bytes(48)};  // fp8: V
#endif
  // Per (KV head, query head of its group) h: scores then probabilities at [h * padded], the query
  // (scaled, unless bf16: then the scores are) and the output accumulator at [h * kVecs].
  float* scores = w.scores.data();
  uint16_t* probs_bf16 = w.probs_bf16.data();
  __m512* qv = reinterpret_cast<__m512*>(w.qv.data());
  __m512* acc = reinterpret_cast<__m512*>(w.acc_v.data());
  for (int64_t h = 0; h < num_heads * kGroup; ++h) {
    const q_t* row = q + (head_begin * kGroup + h) * dim;
    const float q_scale = scale * kLoadScale<kv_t>;  // a 1-byte cache's row scales multiply the scores
    for (int j = 0; j < kQVecs; ++j) {
      if constexpr (bf16) {
        qv[h * kQVecs + j] = _mm512_castsi512_ps(_mm512_loadu_si512(row + 32 * j));
      } else if constexpr (fp8) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
        const __m512 f = _mm512_set1_ps(std::ldexp(1.0f, kFp8Bias<kv_t> / 2));
        const __m512 lo = _mm512_mul_ps(load16(row + 32 * j), f), hi = _mm512_mul_ps(load16(row + 32 * j + 16), f);
        qv[h * kQVecs + j] = _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#endif
      } else {
        qv[h * kQVecs + j] = _mm512_mul_ps(load16(row + 16 * j), _mm512_set1_ps(q_scale));
      }
    }
    for (int j = 0; j < kVecs; ++j) acc[h * kVecs + j] = _mm512_setzero_ps();
  }
  // The row (index into KvScales; times dim into the pool) of token `start` of the context for the first
  // KV head, and how many tokens follow it in its block (up to 16); a chunk of 16 tokens of every KV head
  // is one contiguous span of the pool.
  auto chunk_at = [&](int64_t start, int64_t& n) {
    n = std::min({int64_t{16}, bs - start % bs, context_len - start});
    return (table[start / bs] * bs + start % bs) * s.num_kv_heads + head_begin;
  };
  auto live_of = [](int64_t n) { return static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1); };
  // 1. Scores.
  __m512* running_max = reinterpret_cast<__m512*>(w.max_v.data());
  for (int64_t h = 0; h < num_heads * kGroup; ++h)
    running_max[h] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  ChunkScales k_scales(kv_scales.k, s.num_kv_heads);
  // Pass 3's first chunk, whose misses would otherwise stall it (most of a short context's time).
  prefetch_part(v_pool, table, first, context_len, head_begin, head_end, dim, s, 0, 1);
  if constexpr (kOneByte<kv_t>) {
    prefetch_scales(kv_scales.k, table, first, context_len, s);
    prefetch_scales(kv_scales.v, table, first, context_len, s);
  }
  for (int64_t start = first; start < context_len;) {
    int64_t n;
    const int64_t row = chunk_at(start, n);
    const kv_t* chunk = k_pool + row * dim;
    const __mmask16 live = live_of(n);
    if constexpr (kOneByte<kv_t>) {
      prefetch_scales(kv_scales.k, table, start + kPrefetchTokens, context_len, s);
      k_scales.load(row, n, num_heads);
    }
    for (int64_t kv = 0; kv < num_heads; ++kv) {
      // The chunk kPrefetchTokens ahead, a KV head's share of its lines at a time: issued at once (48 lines
      // of a 1-byte cache, 96 of bf16), the prefetches stalled on the core's outstanding misses.
      const kv_t* k = chunk + kv * dim;
      const __m512* qk = qv + kv * kGroup * kQVecs;
      // Quads of tokens up to the chunk's n, 4 tokens each, so that the loops unroll and the dot products
      // stay in registers: past n, the last row again (its scores masked off below).
      __m512 quads[kGroup][4];
#pragma GCC unroll 4
      for (int quad = 0; quad < 4; ++quad) {
        if (4 * quad >= n) {
          for (int g = 0; g < kGroup; ++g) quads[g][quad] = _mm512_setzero_ps();
          continue;
        }
        // Two tokens at a time: each query vector loaded once for both (the group's queries do not all
        // fit in registers with the dot products).
        __m512 dots[kGroup][4];
#pragma GCC unroll 2
        for (int i = 0; i < 4; i += 2) {
          prefetch_part(k_pool, table, start + kPrefetchTokens, context_len, head_begin, head_end, dim, s,
                        kv * 8 + quad * 2 + i / 2, num_heads * 8);
          __m512 kr[2][kQVecs];
#pragma GCC unroll 2
          for (int u = 0; u < 2; ++u) {
            const kv_t* kt = k + std::min<int64_t>(4 * quad + i + u, n - 1) * token_stride;
#pragma GCC unroll 8
            for (int j = 0; j < kQVecs; ++j) {
              if constexpr (bf16) {
                kr[u][j] = _mm512_castsi512_ps(_mm512_loadu_si512(kt + 32 * j));
              } else if constexpr (fp8) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
                const __m512i raw = _mm512_loadu_si512(kt + 64 * (j / 2));
                const __m512i words = _mm512_maskz_permutexvar_epi8(kOddBytes, j % 2 ? spread_hi : spread_lo, raw);
                kr[u][j] = _mm512_castsi512_ps(fp8_to_bf16<kv_t>(words));
#endif
              } else {
                kr[u][j] = load16(kt + 16 * j);
              }
            }
          }
#pragma GCC unroll 8
          for (int g = 0; g < kGroup; ++g) {
            __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int j = 0; j < kQVecs; ++j) {
              const __m512 qj = qk[g * kQVecs + j];
              if constexpr (dot16) {
#if defined(__AVX512BF16__)
                d0 = _mm512_dpbf16_ps(d0, (__m512bh)_mm512_castps_si512(qj), (__m512bh)_mm512_castps_si512(kr[0][j]));
                d1 = _mm512_dpbf16_ps(d1, (__m512bh)_mm512_castps_si512(qj), (__m512bh)_mm512_castps_si512(kr[1][j]));
#endif
              } else {
                d0 = _mm512_fmadd_ps(qj, kr[0][j], d0);
                d1 = _mm512_fmadd_ps(qj, kr[1][j], d1);
              }
            }
            dots[g][i] = d0;
            dots[g][i + 1] = d1;
          }
        }
#pragma GCC unroll 8
        for (int g = 0; g < kGroup; ++g) quads[g][quad] = fold4x(dots[g]);
      }
      __m512 k_row = _mm512_setzero_ps();
      if constexpr (kOneByte<kv_t>) k_row = k_scales.of(kv);
#pragma GCC unroll 8
      for (int g = 0; g < kGroup; ++g) {
        const int64_t h = kv * kGroup + g;
        __m512 sc = fold16(quads[g]);
        if constexpr (dot16) sc = _mm512_mul_ps(sc, _mm512_set1_ps(dot_scale));
        if constexpr (kOneByte<kv_t>) sc = _mm512_mul_ps(sc, k_row);
        if (var.soft_cap > 0.0f) sc = soft_cap16(sc, var.soft_cap);
        _mm512_mask_storeu_ps(scores + h * padded + start - first, live, sc);
        running_max[h] = _mm512_mask_max_ps(running_max[h], live, running_max[h], sc);
      }
    }
    start += n;
  }
  // 2. Softmax; the tail up to a multiple of 32 is zeroed.
  float* inv_sum = w.running_sum.data();
  for (int64_t h = 0; h < num_heads * kGroup; ++h) {
    float* sc = scores + h * padded;
    const float peak = _mm512_reduce_max_ps(running_max[h]);
    const __m512 max = _mm512_set1_ps(peak);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < padded; i += 16) {
      const int64_t left = span - i;
      const __mmask16 live = static_cast<__mmask16>(left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1);
      const __m512 p = _mm512_maskz_mov_ps(live, exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(sc + i), max)));
      sum = _mm512_add_ps(sum, p);
      if constexpr (bf16) {
#if defined(__AVX512BF16__)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs_bf16 + h * padded + i), (__m256i)_mm512_cvtneps_pbh(p));
#endif
      } else {
        _mm512_storeu_ps(sc + i, p);
      }
    }
    const float total = _mm512_reduce_add_ps(sum);
    inv_sum[h] = 1.0f / total;
    w.lse[head_begin * kGroup + h] = peak + std::log(total);
  }
  // 3. Weighted V rows; a KV head's group accumulates in registers over a chunk.
  ChunkScales v_scales(kv_scales.v, s.num_kv_heads);
  for (int64_t start = first; start < context_len;) {
    int64_t n;
    const int64_t row = chunk_at(start, n);
    const kv_t* chunk = v_pool + row * dim;
    if constexpr (kOneByte<kv_t>) {
      prefetch_scales(kv_scales.v, table, start + kPrefetchTokens, context_len, s);
      v_scales.load(row, n, num_heads);
    }
    for (int64_t kv = 0; kv < num_heads; ++kv) {
      if constexpr (!bf16) {
        prefetch_part(v_pool, table, start + kPrefetchTokens, context_len, head_begin, head_end, dim, s, kv, num_heads);
      }
      const kv_t* v = chunk + kv * dim;
      __m512 a[kGroup][kVecs];
      for (int g = 0; g < kGroup; ++g)
        for (int j = 0; j < kVecs; ++j) a[g][j] = acc[(kv * kGroup + g) * kVecs + j];
      if constexpr (bf16) {
#if defined(__AVX512BF16__)
        // Two tokens' rows interleave by 16-bit words within each 128-bit lane (vpunpcklwd/hwd): the
        // dword lanes of a[g][2m + half] hold dims 32m + 8L + 4 half + i (L the 128-bit lane, i < 4),
        // put back in order at the end. (v_t[d], v_t+1[d]) pairs meet (p_t, p_t+1), one 32-bit load.
        const uint16_t* p = probs_bf16 + kv * kGroup * padded + start - first;  // p[g * padded + t]
        auto accumulate = [&](const __m512i* r0, const __m512i* r1, const int32_t* pairs) {
#pragma GCC unroll 8
          for (int m = 0; m < kQVecs; ++m) {
            const __m512i lo = _mm512_unpacklo_epi16(r0[m], r1[m]), hi = _mm512_unpackhi_epi16(r0[m], r1[m]);
#pragma GCC unroll 8
            for (int g = 0; g < kGroup; ++g) {
              const __m512bh weights = (__m512bh)_mm512_set1_epi32(pairs[g]);
              a[g][2 * m] = _mm512_dpbf16_ps(a[g][2 * m], (__m512bh)lo, weights);
              a[g][2 * m + 1] = _mm512_dpbf16_ps(a[g][2 * m + 1], (__m512bh)hi, weights);
            }
          }
        };
        int64_t t = 0;
        for (; t + 1 < n; t += 2) {
          prefetch_part(v_pool, table, start + kPrefetchTokens, context_len, head_begin, head_end, dim, s,
                        kv * 8 + t / 2, num_heads * 8);
          __m512i r0[kQVecs], r1[kQVecs];
          int32_t pairs[kGroup];
          for (int m = 0; m < kQVecs; ++m) {
            r0[m] = _mm512_loadu_si512(v + t * token_stride + 32 * m);
            r1[m] = _mm512_loadu_si512(v + (t + 1) * token_stride + 32 * m);
          }
          for (int g = 0; g < kGroup; ++g) std::memcpy(&pairs[g], p + g * padded + t, sizeof(int32_t));
          accumulate(r0, r1, pairs);
        }
        if (t < n) {  // the chunk's odd last token, paired with zeros
          __m512i r0[kQVecs], r1[kQVecs];
          int32_t pairs[kGroup];
          for (int m = 0; m < kQVecs; ++m) {
            r0[m] = _mm512_loadu_si512(v + t * token_stride + 32 * m);
            r1[m] = _mm512_setzero_si512();
          }
          for (int g = 0; g < kGroup; ++g) pairs[g] = p[g * padded + t];
          accumulate(r0, r1, pairs);
        }
#endif
      } else if constexpr (fp8) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
        // Two tokens' rows at once as in the bf16 case, their bytes paired into (v_t[d], v_t+1[d]) by one
        // vpermt2b per 16 dims (in order), weighted by bf16 (p_t s_t, p_t+1 s_t+1) 2^kFp8Weight.
        const __mmask16 live = live_of(n);
        const __m512 v_row = _mm512_mul_ps(v_scales.of(kv), _mm512_set1_ps(std::ldexp(1.0f, kFp8Weight)));
        alignas(64) uint16_t weights[kGroup][16];
        for (int g = 0; g < kGroup; ++g) {
          const __m512 p = _mm512_maskz_loadu_ps(live, scores + (kv * kGroup + g) * padded + start - first);
          const __m256i bf = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(p, v_row));
          _mm256_store_si256(reinterpret_cast<__m256i*>(weights[g]), bf);
        }
        auto accumulate = [&](const __m512i* r0, const __m512i* r1, const int32_t* pairs) {
#pragma GCC unroll 8
          for (int j = 0; j < kVecs; ++j) {
            const __m512i pair =
                fp8_to_bf16<kv_t>(_mm512_maskz_permutex2var_epi8(kOddBytes, r0[j / 4], pair_index[j % 4], r1[j / 4]));
#pragma GCC unroll 8
            for (int g = 0; g < kGroup; ++g)
              a[g][j] = _mm512_dpbf16_ps(a[g][j], (__m512bh)pair, (__m512bh)_mm512_set1_epi32(pairs[g]));
          }
        };
        int64_t t = 0;
        for (; t + 1 < n; t += 2) {
          __m512i r0[kVecs / 4], r1[kVecs / 4];
          int32_t pairs[kGroup];
          for (int b = 0; b < kVecs / 4; ++b) {
            r0[b] = _mm512_loadu_si512(v + t * token_stride + 64 * b);
            r1[b] = _mm512_loadu_si512(v + (t + 1) * token_stride + 64 * b);
          }
          for (int g = 0; g < kGroup; ++g) std::memcpy(&pairs[g], weights[g] + t, sizeof(int32_t));
          accumulate(r0, r1, pairs);
        }
        if (t < n) {  // the chunk's odd last token, paired with zeros
          __m512i r0[kVecs / 4], r1[kVecs / 4];
          int32_t pairs[kGroup];
          for (int b = 0; b < kVecs / 4; ++b) {
            r0[b] = _mm512_loadu_si512(v + t * token_stride + 64 * b);
            r1[b] = _mm512_setzero_si512();
          }
          for (int g = 0; g < kGroup; ++g) pairs[g] = weights[g][t];
          accumulate(r0, r1, pairs);
        }
#endif
      } else {
        // The chunk's probabilities, times its V row scales for a 1-byte cache: one vector per head.
        const __mmask16 live = live_of(n);
        __m512 v_row = _mm512_setzero_ps();
        if constexpr (kOneByte<kv_t>) v_row = v_scales.of(kv);
        alignas(64) float weights[kGroup][16];
        for (int g = 0; g < kGroup; ++g) {
          __m512 p = _mm512_maskz_loadu_ps(live, scores + (kv * kGroup + g) * padded + start - first);
          if constexpr (kOneByte<kv_t>) p = _mm512_mul_ps(p, v_row);
          _mm512_store_ps(weights[g], p);
        }
        for (int64_t t = 0; t < n; ++t) {
          __m512 vr[kVecs];
#pragma GCC unroll 8
          for (int j = 0; j < kVecs; ++j) vr[j] = load16(v + t * token_stride + 16 * j);
#pragma GCC unroll 8
          for (int g = 0; g < kGroup; ++g) {
            const __m512 p = _mm512_set1_ps(weights[g][t]);
#pragma GCC unroll 8
            for (int j = 0; j < kVecs; ++j) a[g][j] = _mm512_fmadd_ps(p, vr[j], a[g][j]);
          }
        }
      }
      for (int g = 0; g < kGroup; ++g)
        for (int j = 0; j < kVecs; ++j) acc[(kv * kGroup + g) * kVecs + j] = a[g][j];
    }
    start += n;
  }
  for (int64_t h = 0; h < num_heads * kGroup; ++h) {
    const __m512 inv = _mm512_set1_ps(inv_sum[h] * out_scale);
    q_t* row = out + (head_begin * kGroup + h) * dim;
    for (int j = 0; j < kVecs; ++j) {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, _mm512_mul_ps(acc[h * kVecs + j], inv));
      for (int l = 0; l < 16; ++l) {
        // bf16: accumulator j = 2m + half, lane 4L + i holds dim 32m + 8L + 4 half + i (pass 3).
        const int d = bf16 ? 32 * (j / 2) + 8 * (l / 4) + 4 * (j % 2) + l % 4 : 16 * j + l;
        row[d] = static_cast<q_t>(tmp[l]);
      }
    }
  }
}

template <int kVecs, int kGroup, typename q_t, typename kv_t>
void attend_erased(const void* q, const void* k, const void* v, const int64_t* table, int64_t len, int64_t head_begin,
                   int64_t head_end, float scale, const Variant& var, const KvScales& kv_scales, const Shape& s,
                   Scratch& w, void* out) {
  attend_avx512<kVecs, kGroup>(static_cast<const q_t*>(q), static_cast<const kv_t*>(k), static_cast<const kv_t*>(v),
                               table, len, head_begin, head_end, scale, var, kv_scales, s, w, static_cast<q_t*>(out));
}

template <int kVecs, typename q_t, typename kv_t>
AttendFn pick_group(int64_t group) {
  switch (group) {
    case 1: return attend_erased<kVecs, 1, q_t, kv_t>;
    case 2: return attend_erased<kVecs, 2, q_t, kv_t>;
    case 3: return attend_erased<kVecs, 3, q_t, kv_t>;
    case 4: return attend_erased<kVecs, 4, q_t, kv_t>;
    case 5: return attend_erased<kVecs, 5, q_t, kv_t>;
    case 6: return attend_erased<kVecs, 6, q_t, kv_t>;
    case 7: return attend_erased<kVecs, 7, q_t, kv_t>;
    case 8: return attend_erased<kVecs, 8, q_t, kv_t>;
    default: return nullptr;
  }
}

// The specialised kernel for this head size and GQA group, or nullptr (the generic path).
template <typename q_t, typename kv_t>
AttendFn pick_avx512(const Shape& s) {
  const int64_t group = s.num_heads / s.num_kv_heads;
  if (s.head_dim == 64) return pick_group<4, q_t, kv_t>(group);
  if (s.head_dim == 128) return pick_group<8, q_t, kv_t>(group);
  return nullptr;
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
// The AVX2 path (AVX2-only CPUs: Zen 1-3, Haswell to Alder Lake), for head sizes 64 and 128: a K or V
// row is kVecs ymm of 8 fp32 lanes. One KV head of a sequence at a time, in three passes over its
// visible tokens: scores (each K row loaded once, dotted with every query head of its group), softmax,
// then each query head's weighted V rows accumulated in registers. The generic loops it replaces ran
// at 128 bits with a store per FMA: 214 us for one 257-token sequence of SmolLM2 (9 heads, 3 KV heads)
// against 3 KV heads' 400 KB read once (BENCHMARKS.md has the figures after).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// 1-byte values: 8 bytes widened in registers. int8 by sign extension. E5M2 is the upper byte of an fp16,
// converted by F16C. E4M3 (sign, 4 exponent bits of bias 7, 3 mantissa bits) is moved into an fp16's
// fields, whose exponent bias is 15: the fp16 is the value / 2^8 exactly, subnormals included (F16C
// widens fp16 subnormals exactly); the 2^8 (kLoadScale) goes into the per-head scales. Sign-extended to
// 16 bits and shifted left 7, the byte's sign lands on the fp16's sign and also on its top exponent bit,
// which the mask clears. (NaN, 0x7F/0xFF, is never stored: writers saturate to +-448.) A 256-entry table
// read by vgatherdps was 7x slower on Zen 1: 14.3 ns per 8 values against 2.1 (int8 2.0, E5M2 2.0, bf16
// 2.0), each widened and accumulated from L1, one thread of a busy machine (indicative).
inline __m128i load_bytes8(const void* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m256 load8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load_bytes8(p))); }
inline __m256 load8(const at::Float8_e5m2* p) {
  return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), load_bytes8(p)));  // byte << 8 per 16-bit lane
}
inline __m256 load8(const at::Float8_e4m3fn* p) {
  const __m128i bits = _mm_slli_epi16(_mm_cvtepi8_epi16(load_bytes8(p)), 7);
  return _mm256_cvtph_ps(_mm_and_si128(bits, _mm_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// exp_nonpositive on 8 lanes (the same polynomial).
inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_floor_ps(_mm256_add_ps(y, _mm256_set1_ps(0.5f)));
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(y, n), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

template <int kVecs, typename q_t, typename kv_t>
void attend_avx2(const void* q_any, const void* k_any, const void* v_any, const int64_t* table, int64_t context_len,
                 int64_t head_begin, int64_t head_end, float scale, const Variant& var, const KvScales& kv_scales,
                 const Shape& s, Scratch& w, void* out_any) {
  const q_t* q = static_cast<const q_t*>(q_any);
  const kv_t* k_pool = static_cast<const kv_t*>(k_any);
  const kv_t* v_pool = static_cast<const kv_t*>(v_any);
  q_t* out = static_cast<q_t*>(out_any);
  constexpr int64_t dim = kVecs * 8;
  const int64_t group = s.num_heads / s.num_kv_heads, bs = s.block_size;
  const int64_t first = var.first(context_len), span = context_len - first;
  float* qf = w.q.data();  // [group][dim], scaled
  float* scores = w.scores.data();  // [group][span]
  for (int64_t kv = head_begin; kv < head_end; ++kv) {
    // Token t's row (index into KvScales; times dim into the pool).
    auto row_at = [&](int64_t t) { return (table[t / bs] * bs + t % bs) * s.num_kv_heads + kv; };
    const float q_scale = scale * kLoadScale<kv_t>;  // a 1-byte cache's row scales multiply the scores
    for (int64_t g = 0; g < group; ++g)
      for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = widen(q[(kv * group + g) * dim + d]) * q_scale;
    // 1. Scores: each K row loaded once for the whole group.
    for (int64_t t = first; t < context_len; ++t) {
      const int64_t row = row_at(t);
      const kv_t* k = k_pool + row * dim;
      float k_row = 1.0f;
      if constexpr (kOneByte<kv_t>) k_row = scale_at(kv_scales.k, row);
      __m256 kr[kVecs];
      for (int j = 0; j < kVecs; ++j) kr[j] = load8(k + 8 * j);
      for (int64_t g = 0; g < group; ++g) {
        __m256 dot = _mm256_mul_ps(kr[0], _mm256_loadu_ps(qf + g * dim));
        for (int j = 1; j < kVecs; ++j) dot = _mm256_fmadd_ps(kr[j], _mm256_loadu_ps(qf + g * dim + 8 * j), dot);
        float score = hsum8(dot);
        if constexpr (kOneByte<kv_t>) score *= k_row;
        if (var.soft_cap > 0.0f) score = soft_cap_scalar(score, var.soft_cap);
        scores[g * span + t - first] = score;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      // 2. Softmax of the group's row of scores.
      float* sc = scores + g * span;
      float peak = sc[0];
      for (int64_t i = 1; i < span; ++i) peak = std::max(peak, sc[i]);
      const __m256 max = _mm256_set1_ps(peak);
      __m256 sum8 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= span; i += 8) {
        const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(sc + i), max));
        _mm256_storeu_ps(sc + i, p);
        sum8 = _mm256_add_ps(sum8, p);
      }
      float sum = hsum8(sum8);
      for (; i < span; ++i) {
        sc[i] = exp_nonpositive(sc[i] - peak);
        sum += sc[i];
      }
      // 3. The weighted V rows, accumulated in registers.
      __m256 acc[kVecs];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t t = first; t < context_len; ++t) {
        const int64_t row = row_at(t);
        const kv_t* v = v_pool + row * dim;
        float weight = sc[t - first];
        if constexpr (kOneByte<kv_t>) weight *= scale_at(kv_scales.v, row);
        const __m256 p = _mm256_set1_ps(weight);
        for (int j = 0; j < kVecs; ++j) acc[j] = _mm256_fmadd_ps(p, load8(v + 8 * j), acc[j]);
      }
      w.lse[kv * group + g] = peak + std::log(sum);
      const __m256 inv = _mm256_set1_ps(kLoadScale<kv_t> / sum);
      q_t* row = out + (kv * group + g) * dim;
      for (int j = 0; j < kVecs; ++j) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, _mm256_mul_ps(acc[j], inv));
        for (int l = 0; l < 8; ++l) row[8 * j + l] = static_cast<q_t>(tmp[l]);
      }
    }
  }
}

// hsum8x8(d)[i] = the sum of d[i]'s 8 lanes: 6 hadds, 2 lane swaps and an add instead of 8 reductions.
inline __m256 hsum8x8(const __m256* d) {
  const __m256 t0 = _mm256_hadd_ps(d[0], d[1]), t1 = _mm256_hadd_ps(d[2], d[3]);
  const __m256 t2 = _mm256_hadd_ps(d[4], d[5]), t3 = _mm256_hadd_ps(d[6], d[7]);
  // u0 = (d0..d3's low-half sums, d0..d3's high-half sums), u1 the same of d4..d7
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The AVX2 kernel for GQA groups up to 8 (kGroup query heads per KV head), KV heads [head_begin,
// head_end) of one sequence, every KV dtype: the AVX-512 kernel's three passes, with 8-lane vectors.
// Written for 1-byte caches, which halve the bytes a bf16 one reads, and speed decoding up only if the
// arithmetic per value shrinks too: attend_avx2 is compute-bound on Zen 1 (measured, one thread of a busy machine, 32
// sequences of 2,048 tokens of SmolLM2: 88 ms per layer over bf16 against 15 ms for a streaming read of
// its bytes). Here every row is widened once, for all heads of its group, where attend_avx2 widens each V
// row once per query head, and 8 scores are reduced at once (the same case over int8: 35 ms). So:
//   1. scores: 8 tokens of one block at a time, each K row widened once and dotted with the group's
//      queries (kGroup accumulators); the 8 tokens' dot products reduce into one vector (hsum8x8);
//   2. softmax over each head's scores;
//   3. V rows in tiles of kTile vectors of their dims, each widened once and accumulated, weighted, into
//      the group's kGroup x kTile accumulators (in registers over a chunk of up to 16 tokens).
// The context is walked in chunks within a block (a division per chunk, none per token), every KV head
// of the item per chunk: a chunk of all heads is one contiguous span of the pool, fetched ahead as in
// the AVX-512 kernel.
template <int kVecs, int kGroup, typename q_t, typename kv_t>
void attend_avx2_grouped(const void* q_any, const void* k_any, const void* v_any, const int64_t* table,
                         int64_t context_len, int64_t head_begin, int64_t head_end, float scale, const Variant& var,
                         const KvScales& kv_scales, const Shape& s, Scratch& w, void* out_any) {
  const q_t* q = static_cast<const q_t*>(q_any);
  const kv_t* k_pool = static_cast<const kv_t*>(k_any);
  const kv_t* v_pool = static_cast<const kv_t*>(v_any);
  q_t* out = static_cast<q_t*>(out_any);
  constexpr int64_t dim = kVecs * 8;
  // kGroup * kTile accumulators, kGroup broadcast probabilities and a V vector in 16 ymm registers.
  constexpr int kTile = kGroup == 1 ? 8 : kGroup == 2 ? 4 : kGroup <= 4 ? 2 : 1;
  static_assert(kVecs % kTile == 0);
  const int64_t bs = s.block_size, token_stride = s.num_kv_heads * dim;
  const int64_t first = var.first(context_len), span = context_len - first;
  const int64_t padded = (span + 31) / 32 * 32;
  const int64_t num_heads = head_end - head_begin;
  // Per (KV head of the item, query head of its group) h: the query scaled by scale at [h * dim], the
  // output accumulator at [h * dim], scores then probabilities at [h * padded].
  float* qf = w.qv.data();
  float* acc = w.acc_v.data();
  float* scores = w.scores.data();
  float* inv_sum = w.running_sum.data();
  for (int64_t h = 0; h < num_heads * kGroup; ++h) {
    const q_t* row = q + (head_begin * kGroup + h) * dim;
    const __m256 q_scale = _mm256_set1_ps(scale * kLoadScale<kv_t>);  // row scales multiply the scores
    for (int j = 0; j < kVecs; ++j) {
      _mm256_storeu_ps(qf + h * dim + 8 * j, _mm256_mul_ps(load8(row + 8 * j), q_scale));
      _mm256_storeu_ps(acc + h * dim + 8 * j, _mm256_setzero_ps());
    }
  }
  // Token `start`'s row of KV head head_begin (index into KvScales; times dim into the pool), and how many
  // tokens (up to `most`) follow it in its block.
  auto chunk_at = [&](int64_t start, int64_t most, int64_t& n) {
    n = std::min({most, bs - start % bs, context_len - start});
    return (table[start / bs] * bs + start % bs) * s.num_kv_heads + head_begin;
  };
  // 1. Scores.
  for (int64_t start = first; start < context_len;) {
    int64_t n;
    const int64_t row = chunk_at(start, 8, n);
    const kv_t* chunk = k_pool + row * dim;
    prefetch_rows(k_pool, table, start + kPrefetchTokens, context_len, head_begin, head_end, dim, s, 8);
    for (int64_t kv = 0; kv < num_heads; ++kv) {
      const kv_t* k = chunk + kv * dim;
      const float* qg = qf + kv * kGroup * dim;
      alignas(32) float k_rows[8];  // a 1-byte cache's row scales of the chunk's tokens (0 past them)
      if constexpr (kOneByte<kv_t>)
        for (int64_t t = 0; t < 8; ++t) k_rows[t] = t < n ? scale_at(kv_scales.k, row + t * s.num_kv_heads + kv) : 0.0f;
      __m256 dots[kGroup][8];
      for (int64_t t = 0; t < 8; ++t) {
        __m256 d[kGroup];
        for (int g = 0; g < kGroup; ++g) d[g] = _mm256_setzero_ps();
        if (t < n) {
          for (int j = 0; j < kVecs; ++j) {
            const __m256 kr = load8(k + t * token_stride + 8 * j);
            for (int g = 0; g < kGroup; ++g) d[g] = _mm256_fmadd_ps(kr, _mm256_loadu_ps(qg + g * dim + 8 * j), d[g]);
          }
        }
        for (int g = 0; g < kGroup; ++g) dots[g][t] = d[g];
      }
      for (int g = 0; g < kGroup; ++g) {
        float* dst = scores + (kv * kGroup + g) * padded + start - first;
        __m256 sc = hsum8x8(dots[g]);
        if constexpr (kOneByte<kv_t>) sc = _mm256_mul_ps(sc, _mm256_load_ps(k_rows));
        if (n == 8 && var.soft_cap == 0.0f) {
          _mm256_storeu_ps(dst, sc);
          continue;
        }
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, sc);
        for (int64_t t = 0; t < n; ++t) dst[t] = var.soft_cap > 0.0f ? soft_cap_scalar(tmp[t], var.soft_cap) : tmp[t];
      }
    }
    start += n;
  }
  // 2. Softmax.
  for (int64_t h = 0; h < num_heads * kGroup; ++h) {
    float* sc = scores + h * padded;
    __m256 peak8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= span; i += 8) peak8 = _mm256_max_ps(peak8, _mm256_loadu_ps(sc + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, peak8);
    float peak = *std::max_element(lanes, lanes + 8);
    for (; i < span; ++i) peak = std::max(peak, sc[i]);
    const __m256 max = _mm256_set1_ps(peak);
    __m256 sum8 = _mm256_setzero_ps();
    for (i = 0; i + 8 <= span; i += 8) {
      const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(sc + i), max));
      _mm256_storeu_ps(sc + i, p);
      sum8 = _mm256_add_ps(sum8, p);
    }
    float sum = hsum8(sum8);
    for (; i < span; ++i) {
      sc[i] = exp_nonpositive(sc[i] - peak);
      sum += sc[i];
    }
    inv_sum[h] = 1.0f / sum;
    w.lse[head_begin * kGroup + h] = peak + std::log(sum);
  }
  // 3. Weighted V rows.
  for (int64_t start = first; start < context_len;) {
    int64_t n;
    const int64_t row = chunk_at(start, 16, n);
    const kv_t* chunk = v_pool + row * dim;
    prefetch_rows(v_pool, table, start + kPrefetchTokens, context_len, head_begin, head_end, dim, s);
    for (int64_t kv = 0; kv < num_heads; ++kv) {
      const kv_t* v = chunk + kv * dim;
      const float* p = scores + kv * kGroup * padded + start - first;  // p[g * padded + t]
      alignas(32) float weights[kGroup * 16];  // a 1-byte cache's: the probabilities times their V row scales
      if constexpr (kOneByte<kv_t>) {
        for (int64_t t = 0; t < n; ++t) {
          const float v_row = scale_at(kv_scales.v, row + t * s.num_kv_heads + kv);
          for (int g = 0; g < kGroup; ++g) weights[g * 16 + t] = p[g * padded + t] * v_row;
        }
      }
      float* a_mem = acc + kv * kGroup * dim;
      for (int j0 = 0; j0 < kVecs; j0 += kTile) {
        __m256 a[kGroup][kTile];
        for (int g = 0; g < kGroup; ++g)
          for (int j = 0; j < kTile; ++j) a[g][j] = _mm256_loadu_ps(a_mem + g * dim + 8 * (j0 + j));
        for (int64_t t = 0; t < n; ++t) {
          __m256 pb[kGroup];
          for (int g = 0; g < kGroup; ++g)
            pb[g] = _mm256_broadcast_ss(kOneByte<kv_t> ? weights + g * 16 + t : p + g * padded + t);
          for (int j = 0; j < kTile; ++j) {
            const __m256 vr = load8(v + t * token_stride + 8 * (j0 + j));
            for (int g = 0; g < kGroup; ++g) a[g][j] = _mm256_fmadd_ps(pb[g], vr, a[g][j]);
          }
        }
        for (int g = 0; g < kGroup; ++g)
          for (int j = 0; j < kTile; ++j) _mm256_storeu_ps(a_mem + g * dim + 8 * (j0 + j), a[g][j]);
      }
    }
    start += n;
  }
  for (int64_t h = 0; h < num_heads * kGroup; ++h) {
    const __m256 f = _mm256_set1_ps(inv_sum[h] * kLoadScale<kv_t>);
    q_t* row = out + (head_begin * kGroup + h) * dim;
    for (int j = 0; j < kVecs; ++j) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, _mm256_mul_ps(_mm256_loadu_ps(acc + h * dim + 8 * j), f));
      for (int l = 0; l < 8; ++l) row[8 * j + l] = static_cast<q_t>(tmp[l]);
    }
  }
}

template <int kVecs, typename q_t, typename kv_t>
AttendFn pick_avx2_group(int64_t group) {
  switch (group) {
    case 1: return attend_avx2_grouped<kVecs, 1, q_t, kv_t>;
    case 2: return attend_avx2_grouped<kVecs, 2, q_t, kv_t>;
    case 3: return attend_avx2_grouped<kVecs, 3, q_t, kv_t>;
    case 4: return attend_avx2_grouped<kVecs, 4, q_t, kv_t>;
    case 5: return attend_avx2_grouped<kVecs, 5, q_t, kv_t>;
    case 6: return attend_avx2_grouped<kVecs, 6, q_t, kv_t>;
    case 7: return attend_avx2_grouped<kVecs, 7, q_t, kv_t>;
    case 8: return attend_avx2_grouped<kVecs, 8, q_t, kv_t>;
    default: return nullptr;
  }
}

// Groups up to 8: attend_avx2_grouped, for every KV dtype (float32 and bf16 too: it does less arithmetic
// per value than attend_avx2; figures in BENCHMARKS.md); larger groups: attend_avx2.
template <typename q_t, typename kv_t>
AttendFn pick_avx2(const Shape& s) {
  if (s.head_dim != 64 && s.head_dim != 128) return nullptr;
  const int64_t group = s.num_heads / s.num_kv_heads;
  if (AttendFn grouped = s.head_dim == 64 ? pick_avx2_group<8, q_t, kv_t>(group)
                                          : pick_avx2_group<16, q_t, kv_t>(group))
    return grouped;
  if (s.head_dim == 64) return &attend_avx2<8, q_t, kv_t>;
  return &attend_avx2<16, q_t, kv_t>;
}
#endif

// One work item's attention: KV heads [head, head + heads) of the sequence whose query row is q_row, over
// its context up to context_len as `var` sees it.
template <typename q_t, typename kv_t>
struct Attend {
  AttendFn fast;  // null: the generic loops, one KV head at a time
  const kv_t *k, *v;
  float scale;
  const KvScales& kv_scales;
  const Shape& s;

  void operator()(const q_t* q_row, const int64_t* table, int64_t context_len, int64_t head, int64_t heads,
                  const Variant& var, Scratch& scratch, q_t* out_row) const {
    if (fast != nullptr) {
      fast(q_row, k, v, table, context_len, head, head + heads, scale, var, kv_scales, s, scratch, out_row);
      return;
    }
    for (int64_t h = head; h < head + heads; ++h)
      attend_one<q_t, kv_t>(q_row, k, v, table, context_len, h, scale, var, kv_scales, s, scratch, out_row);
  }
};

// Flash-decoding on the CPU. With fewer sequences than the threads can share evenly, each sequence's
// context is cut into ranges of at least kMinSplitTokens, attended apart and merged by their log-sum-exp.
// A range [start, end) is the kernels' own sliding window (context_len end, window end - start), so the
// kernels are unchanged but for reporting each query head's log-sum-exp. Before, a batch-1 step's work
// items were its KV heads: SmolLM2's 3 on 2 threads left one thread a head's time idle, and a head's rows,
// a third of each block's, streamed worse than whole blocks (4,096 tokens as avx2: 0.55-0.59 -> 0.34-0.41
// ms a layer; cutting only the KV-head items: 0.57-0.60; BENCHMARKS.md, 2026-12-05).
constexpr int64_t kMinSplitTokens = 128;

// The fewest ranges per work item that give every thread as many.
int64_t context_splits(int64_t items, int64_t threads) {
  return threads <= 1 || items % threads == 0 ? 1 : threads / std::gcd(items, threads);
}

// KV heads [head, head + heads) of a sequence over its context positions [start, end).
struct Range {
  int64_t seq, head, heads, start, end;
};

// Items of heads_per_item KV heads (all of a sequence's, or one), each one's context cut into `splits`
// ranges, fewer where it is short; item_ranges[i]: the first range of item i (and, last, the count).
std::vector<Range> split_ranges(const int64_t* lens, int64_t num_seqs, int64_t heads_per_item, const Shape& s,
                                int64_t splits, const Variant& var, std::vector<int64_t>& item_ranges) {
  const int64_t items_per_seq = s.num_kv_heads / heads_per_item;
  std::vector<Range> ranges;
  item_ranges.assign(1, 0);
  for (int64_t item = 0; item < num_seqs * items_per_seq; ++item) {
    const int64_t seq = item / items_per_seq, head = item % items_per_seq * heads_per_item, len = lens[seq];
    const int64_t first = var.first(len), span = len - first;
    const int64_t parts = std::clamp<int64_t>(span / kMinSplitTokens, 1, splits);
    for (int64_t p = 0; p < parts; ++p)
      ranges.push_back({seq, head, heads_per_item, first + span * p / parts, first + span * (p + 1) / parts});
    item_ranges.push_back(static_cast<int64_t>(ranges.size()));
  }
  return ranges;
}

template <typename q_t, typename kv_t>
void run_split(const Attend<q_t, kv_t>& attend, const q_t* q_ptr, const int64_t* table_ptr,
               const std::vector<Range>& ranges, const std::vector<int64_t>& item_ranges, const Variant& var,
               const Shape& s, q_t* out_ptr) {
  const int64_t row = s.num_heads * s.head_dim, dim = s.head_dim;
  const int64_t count = static_cast<int64_t>(ranges.size());
  // Each range's output in its own row (at its KV heads' place) and every query head's log-sum-exp.
  std::vector<q_t> partial(count * row);
  std::vector<float> lse(count * s.num_heads);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    Scratch& scratch = thread_scratch(s);
    for (int64_t i = begin; i < end; ++i) {
      const Range& r = ranges[i];
      const Variant range{r.end - r.start, var.soft_cap};
      attend(q_ptr + r.seq * row, table_ptr + r.seq * s.max_blocks, r.end, r.head, r.heads, range, scratch,
             partial.data() + i * row);
      std::copy_n(scratch.lse.data(), s.num_heads, lse.data() + i * s.num_heads);
    }
  });
  const int64_t group = s.num_heads / s.num_kv_heads;
  std::vector<float> merged(dim);
  for (size_t item = 0; item + 1 < item_ranges.size(); ++item) {
    const int64_t first = item_ranges[item], last = item_ranges[item + 1];
    const Range& r = ranges[first];
    for (int64_t h = r.head * group; h < (r.head + r.heads) * group; ++h) {  // the item's query heads
      float peak = -std::numeric_limits<float>::infinity();
      for (int64_t i = first; i < last; ++i) peak = std::max(peak, lse[i * s.num_heads + h]);
      std::fill(merged.begin(), merged.end(), 0.0f);
      float total = 0.0f;
      for (int64_t i = first; i < last; ++i) {
        const float weight = std::exp(lse[i * s.num_heads + h] - peak);
        total += weight;
        const q_t* part = partial.data() + i * row + h * dim;
        for (int64_t d = 0; d < dim; ++d) merged[d] += weight * static_cast<float>(part[d]);
      }
      q_t* dst = out_ptr + r.seq * row + h * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<q_t>(merged[d] / total);
    }
  }
}

template <typename q_t, typename kv_t>
void run(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tables,
         const at::Tensor& lens, double scale, const Variant& var, const KvScales& kv_scales, const Shape& s,
         at::Tensor& out) {
  const q_t* q_ptr = q.data_ptr<q_t>();
  const int64_t* table_ptr = tables.data_ptr<int64_t>();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  q_t* out_ptr = out.data_ptr<q_t>();
  const int64_t num_seqs = q.size(0), row = s.num_heads * s.head_dim, threads = at::get_num_threads();
#if defined(__AVX512F__)
  const AttendFn fast = pick_avx512<q_t, kv_t>(s);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const AttendFn fast = pick_avx2<q_t, kv_t>(s);
#else
  const AttendFn fast = nullptr;  // the generic loops only
#endif
  const Attend<q_t, kv_t> attend{fast, k_pool.data_ptr<kv_t>(), v_pool.data_ptr<kv_t>(), static_cast<float>(scale),
                                 kv_scales, s};
  // Few sequences: each one's context cut into as many ranges as share evenly over the threads, a range
  // with all its KV heads (a chunk of tokens is then one contiguous span of the pool, which the
  // prefetchers stream best); where a context is too short for that, a (sequence, KV head) per item,
  // cut the same way where they are long enough.
  if (num_seqs < 4 * threads) {
    std::vector<int64_t> item_ranges;
    const int64_t splits = context_splits(num_seqs, threads);
    std::vector<Range> ranges = split_ranges(len_ptr, num_seqs, s.num_kv_heads, s, splits, var, item_ranges);
    if (static_cast<int64_t>(ranges.size()) != num_seqs * splits) {  // a context too short: KV heads apart
      const int64_t head_splits = context_splits(num_seqs * s.num_kv_heads, threads);
      ranges = split_ranges(len_ptr, num_seqs, 1, s, head_splits, var, item_ranges);
    }
    if (ranges.size() + 1 > item_ranges.size()) {  // some item is cut
      run_split(attend, q_ptr, table_ptr, ranges, item_ranges, var, s, out_ptr);
      return;
    }
  }
  // A work item is a sequence with all its KV heads, or, with too few sequences to keep every thread
  // busy, one KV head of a sequence.
  const int64_t heads_per_item = fast != nullptr && num_seqs >= 4 * threads ? s.num_kv_heads : 1;
  const int64_t items_per_seq = s.num_kv_heads / heads_per_item;
  at::parallel_for(0, num_seqs * items_per_seq, 1, [&](int64_t begin, int64_t end) {
    Scratch& scratch = thread_scratch(s);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / items_per_seq, head = item % items_per_seq * heads_per_item;
      attend(q_ptr + seq * row, table_ptr + seq * s.max_blocks, len_ptr[seq], head, heads_per_item, var, scratch,
             out_ptr + seq * row);
    }
  });
}

template <typename q_t>
void dispatch_kv(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& tables,
                 const at::Tensor& lens, double scale, const Variant& var, const KvScales& kv, const Shape& s,
                 at::Tensor& out) {
  switch (k_pool.scalar_type()) {
    case at::kFloat: return run<q_t, float>(q, k_pool, v_pool, tables, lens, scale, var, kv, s, out);
    case at::kBFloat16: return run<q_t, at::BFloat16>(q, k_pool, v_pool, tables, lens, scale, var, kv, s, out);
    case at::kHalf: return run<q_t, at::Half>(q, k_pool, v_pool, tables, lens, scale, var, kv, s, out);
    case at::kChar: return run<q_t, int8_t>(q, k_pool, v_pool, tables, lens, scale, var, kv, s, out);
    case at::kFloat8_e4m3fn:
      return run<q_t, at::Float8_e4m3fn>(q, k_pool, v_pool, tables, lens, scale, var, kv, s, out);
    case at::kFloat8_e5m2: return run<q_t, at::Float8_e5m2>(q, k_pool, v_pool, tables, lens, scale, var, kv, s, out);
    default: TORCH_CHECK(false, "paged_decode: unsupported KV dtype ", k_pool.scalar_type());
  }
}

bool one_byte(at::ScalarType dtype) {
  return dtype == at::kChar || dtype == at::kFloat8_e4m3fn || dtype == at::kFloat8_e5m2;
}

// A 1-byte cache's row scales: float16 [num_blocks, block_size, num_kv_heads] each, both given; none for
// wider caches.
KvScales kv_scales_of(const at::Tensor& k_pool, const std::optional<at::Tensor>& k_scale,
                      const std::optional<at::Tensor>& v_scale) {
  if (!one_byte(k_pool.scalar_type())) {
    TORCH_CHECK(!k_scale.has_value() && !v_scale.has_value(), "paged_decode: k_scale and v_scale are for 1-byte (",
                "int8, float8) KV caches, not ", k_pool.scalar_type());
    return {nullptr, nullptr};
  }
  TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "paged_decode: a ", k_pool.scalar_type(),
              " KV cache needs k_scale and v_scale");
  const auto rows = k_pool.sizes().slice(0, 3);
  for (const at::Tensor* t : {&*k_scale, &*v_scale})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->sizes() == rows && t->is_contiguous() &&
                    t->device() == k_pool.device(),
                "paged_decode: k_scale and v_scale must be float16 [num_blocks, block_size, num_kv_heads] = ",
                rows, " on the pools' device, got ", t->scalar_type(), " ", t->sizes());
  return {k_scale->data_ptr<at::Half>(), v_scale->data_ptr<at::Half>()};
}

// q [num_seqs, num_heads, head_dim]; pools [num_blocks, block_size, num_kv_heads, head_dim];
// block_tables [num_seqs, max_blocks] int64; context_lens [num_seqs] int64 (each >= 1); sliding_window 0 or
// the window (entries of a table before its sequence's window are never read: they may be stale);
// logits_soft_cap 0 or the cap; k_scale, v_scale float16 [num_blocks, block_size, num_kv_heads] with 1-byte
// pools (int8, FP8 E4M3/E5M2: a value is stored * its row's scale), absent otherwise.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                        int64_t sliding_window, double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(), "paged_decode: shapes");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous(), "paged_decode: layout");
  TORCH_CHECK(k_pool.scalar_type() == v_pool.scalar_type(), "paged_decode: K and V dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode: block tables and context lengths must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && context_lens.is_contiguous(), "paged_decode: table layout");
  const Shape s{q.size(1), k_pool.size(2), q.size(2), k_pool.size(1), block_tables.size(1)};
  TORCH_CHECK(k_pool.size(3) == s.head_dim && s.num_heads % s.num_kv_heads == 0, "paged_decode: heads");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0), "paged_decode: batch");
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < context_lens.size(0); ++i)  // a length past the table would read out of bounds
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= s.max_blocks * s.block_size, "paged_decode: context length ", lens[i],
                " outside [1, ", s.max_blocks * s.block_size, "]");
  TORCH_CHECK(sliding_window >= 0 && logits_soft_cap >= 0.0, "paged_decode: sliding_window ", sliding_window,
              " and logits_soft_cap ", logits_soft_cap, " must be >= 0 (0: none)");
  const Variant var{sliding_window, static_cast<float>(logits_soft_cap)};
  const KvScales kv = kv_scales_of(k_pool, k_scale, v_scale);
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: dispatch_kv<float>(q, k_pool, v_pool, block_tables, context_lens, scale, var, kv, s, out); break;
    case at::kBFloat16:
      dispatch_kv<at::BFloat16>(q, k_pool, v_pool, block_tables, context_lens, scale, var, kv, s, out);
      break;
    default: TORCH_CHECK(false, "paged_decode: unsupported query dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

namespace duoserve {

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                        int64_t sliding_window, double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale) {
  return ::paged_decode(q, k_pool, v_pool, block_tables, context_lens, scale, sliding_window, logits_soft_cap,
                        k_scale, v_scale);
}

}  // namespace duoserve

TORCH_LIBRARY(duoserve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, Tensor context_lens, float scale, "
        "int sliding_window=0, float logits_soft_cap=0.0, Tensor? k_scale=None, Tensor? v_scale=None) -> Tensor",
        &paged_decode);
}
