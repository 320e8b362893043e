// Causal attention of a prefill chunk on the CPU, for bfloat16 models on AVX512-BF16 hosts: a flash
// attention made of two GEMM micro-kernels on vdpbf16ps (bf16 pairs multiplied, summed into fp32).
//
// Why: torch's CPU flash kernel (SDPA) ran a SmolLM2 prompt's attention at 70-77 GFLOP/s on a 2-core
// Zen 5, bf16 or fp32 (its reduced-precision GEMMs take oneDNN's packed AMX path only where AMX exists),
// while the same host's bf16 GEMMs ran the layers' matmuls at ~800: attention was 28% of a 4096-token
// prefill step (BENCHMARKS.md). Here S = Q K^T and O += P V are register-tiled like a GEMM: 24 fp32
// accumulators, one vdpbf16ps per 32 multiply-adds, operands packed once per call so that every load is
// a whole zmm.
//
// q [T, heads, dim] attends to k, v [S, kv_heads, dim] (S >= T): query i sits at position S - T + i and
// sees keys 0 ..= S - T + i (a chunk after cached context, or a whole prompt when S = T). A work item is
// a KV head and a block of kQueryBlock query positions: its rows are those positions times the query
// heads of the KV head's GQA group, which share every K/V load. For each block of kKeyBlock keys: scores
// (Q K^T, in fp32), the online softmax (running max and sum per row; exp by a polynomial), P rounded to
// bf16, O += P V with O in fp32; the output is O / sum, rounded to bf16 once. Keys past a row's position
// get probability 0; key blocks past a work item's last position are never read. Work items go to the
// threads from a shared counter, longest first (a causal item's cost grows with its position).
//
// Packed operands, per KV head (zero-padded to whole key blocks):
//   K: [S / 16][dim / 2][16 keys][2 dims]: one zmm holds 16 keys' values of one pair of dimensions, and
//      a query's pair of the same dimensions, broadcast, makes 16 scores' partial sums in one vdpbf16ps;
//   V: [S / 2][dim][2 keys]: one zmm holds 16 dimensions of two consecutive keys, and the two keys'
//      probabilities, broadcast, add both keys' share to 16 output dimensions in one vdpbf16ps.
//
// Numerics: as torch's bf16 flash kernel, products of bf16 summed in fp32 and P rounded to bf16 before
// P V; the softmax sum is of P before rounding. Head sizes 64 and 128; other shapes, float32 models,
// windows and soft caps keep torch's SDPA (attention/cpu_backend.py decides).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "../../csrc/cpu_ops.h"
#include "../../csrc/cpu_vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__)
#define DUOSERVE_PREFILL_ATTENTION 1
#include <immintrin.h>
#else
#define DUOSERVE_PREFILL_ATTENTION 0
#endif

namespace {

#if DUOSERVE_PREFILL_ATTENTION

constexpr int64_t kKeyBlock = 64;    // keys per block of scores: 4 zmm per row
constexpr int64_t kQueryBlock = 32;  // query positions per work item
constexpr int kScoreRows = 6;        // rows per pass of the Q K^T micro-kernel: 6 x 4 accumulators

struct Dims {
  int64_t q_len, keys, heads, kv_heads, dim, group, padded_keys;
  int64_t offset() const { return keys - q_len; }  // the first query's position
};

// k or v of one KV head into the packed layouts above. Each 32-bit word is two bf16 values.
void pack_keys(const at::Tensor& k, int64_t head, const Dims& d, uint32_t* out) {
  const auto* src = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const int64_t row_stride = k.stride(0), pairs = d.dim / 2;
  auto* words = reinterpret_cast<uint16_t*>(out);
  for (int64_t s = 0; s < d.padded_keys; ++s) {
    const uint16_t* row = src + s * row_stride + head * k.stride(1);
    for (int64_t p = 0; p < pairs; ++p) {
      uint16_t* slot = words + (((s / 16) * pairs + p) * 16 + s % 16) * 2;
      slot[0] = s < d.keys ? row[2 * p] : 0;
      slot[1] = s < d.keys ? row[2 * p + 1] : 0;
    }
  }
}

void pack_values(const at::Tensor& v, int64_t head, const Dims& d, uint16_t* out) {
  const auto* src = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  for (int64_t s = 0; s < d.padded_keys; ++s) {
    const uint16_t* row = src + s * v.stride(0) + head * v.stride(1);
    uint16_t* pair = out + (s / 2) * d.dim * 2 + s % 2;
    for (int64_t j = 0; j < d.dim; ++j) pair[2 * j] = s < d.keys ? row[j] : 0;
  }
}

// Per-thread buffers of one work item (rows = query positions x group, padded to the micro-kernels).
struct Tile {
  std::vector<const uint16_t*> q_rows;  // each row's query vector
  std::vector<float> scores, out, max, sum, correction;
  std::vector<uint16_t> probs;
  Tile(int64_t rows, int64_t dim)
      : q_rows(rows), scores(rows * kKeyBlock), out(rows * dim), max(rows), sum(rows), correction(rows),
        probs(rows * kKeyBlock) {}
};

// scores[r][0..64) = q_r . k_j for the 64 keys of packed block `keys` (kVecs = dim / 16).
template <int kVecs>
void score_block(const Tile& t, int64_t rows, const uint32_t* keys, float* scores) {
  constexpr int kPairs = kVecs * 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kScoreRows) {
    const uint32_t* q[kScoreRows];
    for (int i = 0; i < kScoreRows; ++i)  // rows past the end repeat the last (their scores are dropped)
      q[i] = reinterpret_cast<const uint32_t*>(t.q_rows[std::min(r0 + i, rows - 1)]);
    __m512 acc[kScoreRows][4];
    for (int i = 0; i < kScoreRows; ++i)
      for (int n = 0; n < 4; ++n) acc[i][n] = _mm512_setzero_ps();
    for (int p = 0; p < kPairs; ++p) {
      __m512bh kz[4];
      for (int n = 0; n < 4; ++n)
        kz[n] = (__m512bh)_mm512_loadu_si512(keys + (static_cast<int64_t>(n) * kPairs + p) * 16);
      for (int i = 0; i < kScoreRows; ++i) {
        const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[i][p]));
        for (int n = 0; n < 4; ++n) acc[i][n] = _mm512_dpbf16_ps(acc[i][n], qb, kz[n]);
      }
    }
    for (int i = 0; i < kScoreRows && r0 + i < rows; ++i)
      for (int n = 0; n < 4; ++n) _mm512_storeu_ps(scores + (r0 + i) * kKeyBlock + 16 * n, acc[i][n]);
  }
}

// The online softmax over one key block: row r sees the block's first visible[r] keys (0..64).
void softmax_block(Tile& t, int64_t rows, const int64_t* visible, float scale) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    float* s = t.scores.data() + r * kKeyBlock;
    uint16_t* p = t.probs.data() + r * kKeyBlock;
    const int64_t n = visible[r];
    __mmask16 live[4];
    __m512 x[4];
    __m512 peak = _mm512_set1_ps(neg_inf);
    for (int j = 0; j < 4; ++j) {
      const int64_t left = std::clamp<int64_t>(n - 16 * j, 0, 16);
      live[j] = static_cast<__mmask16>((1u << left) - 1u);
      x[j] = _mm512_mask_mul_ps(_mm512_set1_ps(neg_inf), live[j], _mm512_loadu_ps(s + 16 * j), scale_v);
      peak = _mm512_max_ps(peak, x[j]);
    }
    if (n <= 0) {  // nothing visible in this block: the row's state stays
      t.correction[r] = 1.0f;
      std::memset(p, 0, kKeyBlock * sizeof(uint16_t));
      continue;
    }
    const float new_max = std::max(t.max[r], _mm512_reduce_max_ps(peak));
    // The first visible block has no running state: its correction multiplies zeros.
    const float correction = t.max[r] == neg_inf ? 0.0f : std::exp(t.max[r] - new_max);
    const __m512 m = _mm512_set1_ps(new_max);
    __m512 total = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      const __m512 e = _mm512_maskz_mov_ps(live[j], duoserve::exp_nonpositive16(_mm512_sub_ps(x[j], m)));
      total = _mm512_add_ps(total, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * j), duoserve::to_bf16(e));
    }
    t.sum[r] = t.sum[r] * correction + _mm512_reduce_add_ps(total);
    t.max[r] = new_max;
    t.correction[r] = correction;
  }
}

// out[r] = out[r] * correction[r] + P[r] V over the block's first `keys` keys (rounded up to a pair).
template <int kVecs>
void accumulate_block(Tile& t, int64_t rows, const uint16_t* values, int64_t keys, int64_t dim) {
  constexpr int kRows = 24 / kVecs;  // 6 rows of 64 dimensions, 3 of 128
  const int64_t pairs = (keys + 1) / 2;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int live = static_cast<int>(std::min<int64_t>(kRows, rows - r0));
    __m512 acc[kRows][kVecs];
    const uint32_t* p[kRows];
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + std::min(i, live - 1);
      p[i] = reinterpret_cast<const uint32_t*>(t.probs.data() + r * kKeyBlock);
      const __m512 c = _mm512_set1_ps(t.correction[r]);
      for (int m = 0; m < kVecs; ++m) acc[i][m] = _mm512_mul_ps(_mm512_loadu_ps(t.out.data() + r * dim + 16 * m), c);
    }
    for (int64_t kp = 0; kp < pairs; ++kp) {  // registers: 24 accumulators, kRows broadcasts, one V load
      __m512bh pb[kRows];
      for (int i = 0; i < kRows; ++i) pb[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[i][kp]));
      for (int m = 0; m < kVecs; ++m) {
        const __m512bh vz = (__m512bh)_mm512_loadu_si512(values + (kp * dim + 16 * m) * 2);
        for (int i = 0; i < kRows; ++i) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], pb[i], vz);
      }
    }
    for (int i = 0; i < live; ++i)
      for (int m = 0; m < kVecs; ++m) _mm512_storeu_ps(t.out.data() + (r0 + i) * dim + 16 * m, acc[i][m]);
  }
}

// One work item: KV head `head`, query positions [first, last).
template <int kVecs>
void attend_item(const at::Tensor& q, const uint32_t* keys, const uint16_t* values, at::Tensor& out, const Dims& d,
                 int64_t head, int64_t first, int64_t last, float scale, Tile& t) {
  const int64_t dim = d.dim, rows = (last - first) * d.group;
  const auto* q_data = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < last - first; ++i)
    for (int64_t g = 0; g < d.group; ++g)
      t.q_rows[i * d.group + g] = q_data + (first + i) * q.stride(0) + (head * d.group + g) * q.stride(1);
  std::fill(t.out.begin(), t.out.begin() + rows * dim, 0.0f);
  std::fill(t.max.begin(), t.max.begin() + rows, -std::numeric_limits<float>::infinity());
  std::fill(t.sum.begin(), t.sum.begin() + rows, 0.0f);
  const int64_t end = d.offset() + last;  // keys the item's last position sees
  int64_t visible[kQueryBlock * 16];
  for (int64_t start = 0; start < end; start += kKeyBlock) {
    for (int64_t r = 0; r < rows; ++r) visible[r] = std::min<int64_t>(d.offset() + first + r / d.group + 1 - start, kKeyBlock);
    score_block<kVecs>(t, rows, keys + start * dim / 2, t.scores.data());
    softmax_block(t, rows, visible, scale);
    accumulate_block<kVecs>(t, rows, values + start * dim, std::min<int64_t>(kKeyBlock, end - start), dim);
  }
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = first + r / d.group, h = head * d.group + r % d.group;
    const __m512 inv = _mm512_set1_ps(1.0f / t.sum[r]);
    for (int m = 0; m < kVecs; ++m) {
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(t.out.data() + r * dim + 16 * m), inv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (i * d.heads + h) * dim + 16 * m), duoserve::to_bf16(o));
    }
  }
}

template <int kVecs>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const Dims& d, float scale) {
  const int64_t per_head = d.padded_keys * d.dim;  // bf16 values of one KV head's packed K (or V)
  std::vector<uint16_t> packed_k(d.kv_heads * per_head), packed_v(d.kv_heads * per_head);
  at::parallel_for(0, d.kv_heads * 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t head = job / 2;
      if (job % 2 == 0)
        pack_keys(k, head, d, reinterpret_cast<uint32_t*>(packed_k.data() + head * per_head));
      else
        pack_values(v, head, d, packed_v.data() + head * per_head);
    }
  });
  // Work items, longest first: the last query blocks see the most keys.
  const int64_t blocks = (d.q_len + kQueryBlock - 1) / kQueryBlock, items = blocks * d.kv_heads;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Tile tile(kQueryBlock * d.group, d.dim);
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t block = blocks - 1 - item / d.kv_heads, head = item % d.kv_heads;
      const int64_t first = block * kQueryBlock, last = std::min(first + kQueryBlock, d.q_len);
      attend_item<kVecs>(q, reinterpret_cast<const uint32_t*>(packed_k.data() + head * per_head),
                         packed_v.data() + head * per_head, out, d, head, first, last, scale, tile);
    }
  });
}

#endif  // DUOSERVE_PREFILL_ATTENTION

}  // namespace

namespace duoserve {

bool prefill_attention_available() { return DUOSERVE_PREFILL_ATTENTION != 0; }

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(prefill_attention_available(), "prefill_attention was not compiled for this CPU (needs AVX512-BF16)");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [tokens, heads, dim]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "prefill_attention takes bfloat16 q, k, v");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "prefill_attention runs on the CPU");
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim == 64 || dim == 128, "prefill_attention takes head sizes 64 and 128, got ", dim);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == dim, "k and v must be [keys, kv_heads, ", dim, "]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "each head's vector must be contiguous");
  const int64_t heads = q.size(1), kv_heads = k.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= 16,
              "query heads must be a multiple (up to 16) of the KV heads");
  TORCH_CHECK(k.size(0) >= q.size(0), "a chunk's queries are the last of its keys: keys >= queries");
  auto out = at::empty({q.size(0), heads, dim}, q.options());
  if (q.size(0) == 0) return out;
#if DUOSERVE_PREFILL_ATTENTION
  const int64_t keys = k.size(0);
  const Dims d{q.size(0), keys, heads, kv_heads, dim, heads / kv_heads, (keys + kKeyBlock - 1) / kKeyBlock * kKeyBlock};
  if (dim == 64)
    run<4>(q, k, v, out, d, static_cast<float>(scale));
  else
    run<8>(q, k, v, out, d, static_cast<float>(scale));
#endif
  return out;
}

}  // namespace duoserve

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("prefill_attention_available() -> bool", &duoserve::prefill_attention_available);
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor", &duoserve::prefill_attention);
}
