// bfloat16 activations times torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`), the
// codes dequantized in registers: a bfloat16 model's 4-bit linears at 1-64 rows (duoserve/int4pack.py,
// models/linear.py), where torch's int4 kernel grows with the rows and dequantized tiles + the dense
// GEMM write and read back a bfloat16 copy of every weight.
//
// Layout (AVX-512 hosts: blocks of 64 output rows): block b holds [K, 32] bytes, byte (k, j) = row j's
// code (low nibble) and row j + 32's (high nibble) of column k. scales_and_zeros: bfloat16 [K/32, N, 2],
// w = (q - 8) * scale + zero for each group of 32 columns.
//
// Arithmetic: per group g, y += scale * sum_k x_k (128 + q_k) + (zero - 136 * scale) * sum_k x_k, which
// is sum_k x_k w_k. The inner sums run on AVX512-BF16 dot products (vdpbf16ps: 2 products per lane,
// exact, accumulated in float32): 128 + q is a bfloat16 whose bits are 0x4300 | q, so unpacking a code
// is a byte shuffle and one logic op, and x is used as it is. The sum of x over the group (float32) and
// the scale and zero are applied once per group, in float32: no weight is rounded to bfloat16 (the tiles
// path rounds each; this path is at least as close to the float32 reference).
//
// Blocking: each thread takes blocks of 64 output rows; for every 4 rows of x (a pass) it walks the
// block's groups, unpacks each 64-byte load of codes in registers (2 byte shuffles, 4 logic ops: 4
// vectors of 16 rows' column pairs) and feeds each vector to the pass's 1-4 dot products, into 16
// float32 accumulators at most. Columns of a vector pair up as the dot product needs: 32-bit lane i =
// (column k, column k + 1) of output row i. The first pass reads the block from memory (prefetched
// ahead, kPrefetchBytes), later ones from L1/L2. Unpacking once per group into an L1 buffer and running
// every row over it (this kernel until 2026-12-04) stored and reloaded each vector: at 1 row it ran
// slower than the memory it reads, and at 1-64 rows it lost to this at every size (SmolLM2's 120
// matmuls of a decode step: 0.73x the time at 1 row, 0.64x at 4, 0.73x at 16, 0.93x at 64; equal at
// 128; BENCHMARKS.md, machine D).
//
// Compiled only where the compiler targets AVX512-BF16 and AVX512-VBMI (byte shuffles), i.e. with
// -march=native on such a host (Zen 4/5, Cooper Lake for BF16 only: no VBMI there, Sapphire Rapids and
// later); elsewhere `int4pack_mm_available()` is false and the op refuses, and the engine keeps torch's
// kernel and the tiles.
//
// Where the compiler also targets AMX (Sapphire Rapids and later) and Linux grants the tiles, steps of
// kAmxMinRows rows or more run the same arithmetic on AMX tiles (run_amx below): there the AVX512-BF16
// dot product runs at a quarter of the float32 FMA's rate (115 against 233 GFLOP/s on one core), and the
// tiles' product at 30x it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "../../csrc/cpu_amx.h"
#include "../../csrc/cpu_ops.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define DUOSERVE_INT4MM 1
#include <immintrin.h>
#else
#define DUOSERVE_INT4MM 0
#endif
#define DUOSERVE_INT4MM_AMX (DUOSERVE_INT4MM && DUOSERVE_AMX)

namespace {

constexpr int64_t kBlock = 64;   // output rows per block of the layout (AVX-512 hosts)
constexpr int64_t kGroup = 32;   // columns per (scale, zero)

#if DUOSERVE_INT4MM

constexpr int kPairs = kGroup / 2;  // column pairs per group: one dot product step each
constexpr int kVectors = 4;         // 16-row vectors per block

// Byte shuffles of one 64-byte load (columns k and k + 1, 32 bytes each): 32-bit lane i gets the byte
// of row i of column k in its low word and that of column k + 1 in its high word (odd bytes zeroed by
// the mask). `first` for rows 0-15 of the load, rows 16-31 with +16.
struct Shuffles {
  __m512i first, second;
  Shuffles() {
    alignas(64) uint8_t a[64], b[64];
    for (int i = 0; i < 16; ++i) {
      a[4 * i] = static_cast<uint8_t>(i);
      a[4 * i + 1] = 0;
      a[4 * i + 2] = static_cast<uint8_t>(32 + i);
      a[4 * i + 3] = 0;
      b[4 * i] = static_cast<uint8_t>(16 + i);
      b[4 * i + 1] = 0;
      b[4 * i + 2] = static_cast<uint8_t>(48 + i);
      b[4 * i + 3] = 0;
    }
    first = _mm512_load_si512(a);
    second = _mm512_load_si512(b);
  }
};

// The group's scales and offsets (zero - 136 * scale) of a block's 64 rows, as float32 vectors.
inline void group_scales(const uint16_t* pairs, __m512* scale, __m512* offset) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 bias = _mm512_set1_ps(136.0f);
  for (int v = 0; v < kVectors; ++v) {
    const __m512i both = _mm512_loadu_si512(pairs + 32 * v);  // 16 rows' (scale, zero) bfloat16 pairs
    scale[v] = _mm512_castsi512_ps(_mm512_slli_epi32(both, 16));
    // 136 * scale is exact (a bfloat16 times 17 * 8): one rounding, of the difference.
    offset[v] = _mm512_fnmadd_ps(bias, scale[v], _mm512_castsi512_ps(_mm512_and_si512(both, high)));
  }
}

inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

struct Problem {
  const uint16_t* x;       // [M, K] bfloat16 bits
  const uint8_t* packed;   // [N / 64 blocks][K][32]
  const uint16_t* pairs;   // [K / 32, N, 2] bfloat16 bits
  const float* xsum;       // [M, K / 32]: each group's sum of x
  uint16_t* y;             // [M, N] bfloat16 bits
  int64_t m, n, k;
};

// Codes prefetched this far ahead of the loads (4 groups): a decode step's SmolLM2 layers, 120 matmuls
// of 0.2-1.1 MB read once from memory, ran 7% faster at 1 row than with the hardware prefetcher alone,
// 4 KiB and 8 KiB ahead alike (machine D).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int kPassRows = 4;  // rows of x per pass over a block: 16 accumulators

// One 64-byte load of a block's codes (columns k, k + 1) as four vectors of 16 output rows' (column k,
// column k + 1) bfloat16 128 + q pairs, prefetching kPrefetchBytes ahead: vectors 0, 1 the low nibbles
// (rows 0-31), (a & b) | c putting the nibble under the magic exponent; 2, 3 the high nibbles (rows 32-63).
inline void unpack_pair(const uint8_t* pair, const Shuffles& shuffles, __m512i* w) {
  const __mmask64 words = 0x5555555555555555ULL;
  const __m512i nibble = _mm512_set1_epi32(0x000F000F);
  const __m512i magic = _mm512_set1_epi32(0x43004300);  // bfloat16 128.0 in both words
  _mm_prefetch(reinterpret_cast<const char*>(pair + kPrefetchBytes), _MM_HINT_T0);
  const __m512i bytes = _mm512_loadu_si512(pair);
  const __m512i first = _mm512_maskz_permutexvar_epi8(words, shuffles.first, bytes);
  const __m512i second = _mm512_maskz_permutexvar_epi8(words, shuffles.second, bytes);
  w[0] = _mm512_ternarylogic_epi32(first, nibble, magic, 0xEA);
  w[1] = _mm512_ternarylogic_epi32(second, nibble, magic, 0xEA);
  w[2] = _mm512_or_si512(_mm512_srli_epi16(first, 4), magic);
  w[3] = _mm512_or_si512(_mm512_srli_epi16(second, 4), magic);
}

// Output rows 64b..64b+63 for rows row0..row0+ROWS-1 of x (ROWS 1-4).
template <int ROWS>
void block_pass(const Problem& t, int64_t b, int64_t row0, const Shuffles& shuffles) {
  // At 1 row, two accumulator sets (alternate pairs): 8 dot product chains in flight, not 4 waiting on
  // the dot product's latency.
  constexpr int SETS = ROWS >= 2 ? 1 : 2;
  const int64_t groups = t.k / kGroup;
  const uint8_t* codes = t.packed + b * kBlock * (t.k / 2);
  __m512 acc[ROWS][kVectors];
  for (int r = 0; r < ROWS; ++r) {
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < groups; ++g) {
    if (g + 1 < groups) {
      const char* next = reinterpret_cast<const char*>(t.pairs + ((g + 1) * t.n + b * kBlock) * 2);
      for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    }
    const uint8_t* group = codes + g * kGroup * (kBlock / 2);
    __m512 inner[ROWS][SETS][kVectors];
    for (int r = 0; r < ROWS; ++r) {
      for (int s = 0; s < SETS; ++s) {
        for (int v = 0; v < kVectors; ++v) inner[r][s][v] = _mm512_setzero_ps();
      }
    }
#pragma GCC unroll 16
    for (int p = 0; p < kPairs; ++p) {
      __m512i w[kVectors];
      unpack_pair(group + p * 64, shuffles, w);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        int32_t both;
        std::memcpy(&both, t.x + (row0 + r) * t.k + g * kGroup + 2 * p, sizeof(both));
        const __m512bh xs = as_bf16(_mm512_set1_epi32(both));
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) {
          __m512& sum = inner[r][p % SETS][v];
          sum = _mm512_dpbf16_ps(sum, xs, as_bf16(w[v]));
        }
      }
    }
    __m512 scale[kVectors], offset[kVectors];
    group_scales(t.pairs + (g * t.n + b * kBlock) * 2, scale, offset);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 sum = _mm512_set1_ps(t.xsum[(row0 + r) * groups + g]);
      for (int v = 0; v < kVectors; ++v) {
        __m512 dot = inner[r][0][v];
        for (int s = 1; s < SETS; ++s) dot = _mm512_add_ps(dot, inner[r][s][v]);
        acc[r][v] = _mm512_fmadd_ps(scale[v], dot, _mm512_fmadd_ps(offset[v], sum, acc[r][v]));
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    uint16_t* out = t.y + (row0 + r) * t.n + b * kBlock;
    for (int v = 0; v < kVectors; ++v) {
      const __m256bh half = _mm512_cvtneps_pbh(acc[r][v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * v), reinterpret_cast<const __m256i&>(half));
    }
  }
}

// Each group's sum of x in float32 (x is bfloat16: exact products, sums rounded in float32).
void group_sums(const uint16_t* x, int64_t m, int64_t k, float* out) {
  const int64_t groups = k / kGroup;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* p = x + i * k + g * kGroup;
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
      const __m512 sum = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)),
                                       _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
      out[i * groups + g] = _mm512_reduce_add_ps(sum);
    }
  }
}

#endif  // DUOSERVE_INT4MM

#if DUOSERVE_INT4MM_AMX

// The AMX path: the same arithmetic, with each group's inner sums on tiles. A group of 32 columns is one
// tile product's depth, so per group and 16 rows of x (a chunk), tdpbf16ps multiplies the chunk's A tile
// [rows, 32 columns] by each of the block's four B tiles (16 column pairs x 16 output rows: exactly the
// vectors the AVX-512 path unpacks, stored instead of multiplied), and the 16 x 16 float32 sums are
// scaled into the float32 accumulators with the AVX-512 FMA (tile -> L1 -> vector), as above. The codes
// are still unpacked once per call, whatever the rows; the per-group scaling (2 FMAs per 16 sums) is
// what grows with them.
//
// Tiles: 0 and 1 take the products (alternately, so one's scaling overlaps the next product), 2 the
// chunk of x, 4-7 the block's four unpacked B tiles.
constexpr int64_t kChunk = 16;          // rows of x per A tile
constexpr int64_t kTileWords = 16 * 32;  // bfloat16 words per B tile (16 rows x 64 bytes)

struct AmxProblem {
  Problem problem;
  const uint16_t* tail;  // [16, K]: x's last partial chunk, zero-padded (nullptr: none)
  int64_t chunk_rows;    // rows of each A and C tile: min(M, 16)
};

// Group g's codes of one block as four B tiles (16-row vectors v of the block), bfloat16 128 + q.
inline void unpack_group(const uint8_t* group, const Shuffles& shuffles, uint16_t* tiles) {
#pragma GCC unroll 16
  for (int p = 0; p < kPairs; ++p) {
    __m512i w[kVectors];
    unpack_pair(group + p * 64, shuffles, w);
    for (int v = 0; v < kVectors; ++v) _mm512_store_si512(tiles + v * kTileWords + 32 * p, w[v]);
  }
}

// acc[r][16 outputs] += offset * xsum[r] + scale * sums[r] for the chunk's rows.
inline void scale_sums(const float* sums, __m512 scale, __m512 offset, const float* xsum, int64_t groups,
                       int64_t rows, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 a = _mm512_load_ps(acc + r * kBlock);
    a = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[r * groups]), a);
    _mm512_store_ps(acc + r * kBlock, _mm512_fmadd_ps(scale, _mm512_load_ps(sums + 16 * r), a));
  }
}

// Output rows 64b..64b+63 for every row of x. acc: [M, 64] float32 scratch.
void block_amx(const AmxProblem& t, int64_t b, const Shuffles& shuffles, uint16_t* tiles, float* sums,
               float* acc) {
  const Problem& p = t.problem;
  const int64_t groups = p.k / kGroup;
  const int64_t stride = p.k * static_cast<int64_t>(sizeof(uint16_t));
  const uint8_t* codes = p.packed + b * kBlock * (p.k / 2);
  std::fill(acc, acc + p.m * kBlock, 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    if (g + 1 < groups) {
      const char* next = reinterpret_cast<const char*>(p.pairs + ((g + 1) * p.n + b * kBlock) * 2);
      for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    }
    unpack_group(codes + g * kGroup * (kBlock / 2), shuffles, tiles);
    __m512 scale[kVectors], offset[kVectors];
    group_scales(p.pairs + (g * p.n + b * kBlock) * 2, scale, offset);
    for (int64_t row = 0; row < p.m; row += kChunk) {
      const int64_t rows = std::min(kChunk, p.m - row);
      const bool padded = rows < t.chunk_rows;  // the last partial chunk of M > 16 rows
      _tile_loadd(4, (padded ? t.tail : p.x + row * p.k) + g * kGroup, stride);
      // Four independent products in flight, then their sums out: one product's latency per chunk.
      _tile_loadd(5, tiles + 0 * kTileWords, 64);
      _tile_zero(0);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, tiles + 1 * kTileWords, 64);
      _tile_zero(1);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, tiles + 2 * kTileWords, 64);
      _tile_zero(2);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, tiles + 3 * kTileWords, 64);
      _tile_zero(3);
      _tile_dpbf16ps(3, 4, 5);
      _tile_stored(0, sums + 0 * 256, 64);
      _tile_stored(1, sums + 1 * 256, 64);
      _tile_stored(2, sums + 2 * 256, 64);
      _tile_stored(3, sums + 3 * 256, 64);
      const float* xsum = p.xsum + row * groups + g;
      float* out = acc + row * kBlock;
      for (int v = 0; v < kVectors; ++v) scale_sums(sums + 256 * v, scale[v], offset[v], xsum, groups, rows, out + 16 * v);
    }
  }
  for (int64_t r = 0; r < p.m; ++r) {
    uint16_t* y = p.y + r * p.n + b * kBlock;
    for (int v = 0; v < kVectors; ++v) {
      const __m256bh half = _mm512_cvtneps_pbh(_mm512_load_ps(acc + r * kBlock + 16 * v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + 16 * v), reinterpret_cast<const __m256i&>(half));
    }
  }
}

// Every block on tiles, blocks across threads (each thread configures its own tiles).
void run_amx(const Problem& problem, const Shuffles& shuffles) {
  const int64_t chunk_rows = std::min(problem.m, kChunk);
  std::vector<uint16_t> tail;
  if (problem.m > kChunk && problem.m % kChunk != 0) {
    const int64_t full = problem.m - problem.m % kChunk;
    tail.assign(static_cast<size_t>(kChunk * problem.k), 0);
    std::memcpy(tail.data(), problem.x + full * problem.k, (problem.m - full) * problem.k * sizeof(uint16_t));
  }
  const AmxProblem amx{problem, tail.empty() ? nullptr : tail.data(), chunk_rows};
  at::parallel_for(0, problem.n / kBlock, 1, [&](int64_t first, int64_t last) {
    duoserve::amx::TileConfig config;
    for (int tile : {0, 1, 2, 3, 4}) config.set(tile, static_cast<int>(chunk_rows), 64);
    for (int tile : {5, 6, 7}) config.set(tile, kPairs, 64);
    _tile_loadconfig(&config);
    alignas(64) uint16_t tiles[kVectors * kTileWords];
    alignas(64) float sums[kVectors * 256];
    float* acc = static_cast<float*>(std::aligned_alloc(64, problem.m * kBlock * sizeof(float)));
    for (int64_t b = first; b < last; ++b) block_amx(amx, b, shuffles, tiles, sums, acc);
    std::free(acc);
    _tile_release();
  });
}

#endif  // DUOSERVE_INT4MM_AMX

bool int4pack_mm_available() { return DUOSERVE_INT4MM != 0; }

// Rows of x from which the AMX path runs, where it can (cpu_amx.h). SmolLM2's 120 layer matmuls of a decode step
// (benchmarks/cpu_kernel_ab.py, 2 vCPUs of a Sapphire Rapids-class Xeon, 2026-12-04), AMX against the
// AVX-512 path: 1 row 3.88 vs 2.63 ms, 2 rows 3.98 vs 3.62, 3 rows 4.28 vs 4.74, 4 rows 3.48 vs 5.68,
// 16 rows 6.14 vs 21.55, 64 rows 20.08 vs 88.34 (0.23x). At 128 rows it ties the tiles' dequantize +
// oneDNN GEMM, and loses above (the per-group scaling grows with the rows): the host measurement keeps
// the fused kernel to the decode sizes it times (hardware.DECODE_ROWS).
constexpr int64_t kAmxMinRows = DUOSERVE_FUSED_AMX_MIN_ROWS;

// Rows from which steps run on AMX tiles here (0: never; built with AMX and permitted).
int64_t int4pack_mm_amx_rows() { return DUOSERVE_INT4MM_AMX && duoserve::amx::amx_permitted() ? kAmxMinRows : 0; }

// x [M, K] bfloat16 @ W.T, W the [N, K] int4-packed matrix (blocks of 64 rows): y [M, N] bfloat16.
// amx_min_rows: from how many rows the AMX path runs (tests and benchmarks; default kAmxMinRows).
at::Tensor int4pack_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                       std::optional<int64_t> amx_min_rows) {
  TORCH_CHECK(int4pack_mm_available(), "int4pack_mm was not compiled for this CPU (needs AVX512-BF16, VBMI)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2,
              "x must be contiguous bfloat16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "packed must be contiguous uint8 [N, K/2]");
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(packed.size(1) * 2 == k && k % kGroup == 0, "K must match the codes and be whole groups of 32");
  TORCH_CHECK(n % kBlock == 0, "N must be whole blocks of 64 rows");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(0) * kGroup == k &&
                  scales_and_zeros.size(1) == n && scales_and_zeros.size(2) == 2,
              "scales_and_zeros must be contiguous bfloat16 [K/32, N, 2]");
  at::Tensor y = at::empty({m, n}, x.options());
#if DUOSERVE_INT4MM
  if (m == 0) return y;
  std::vector<float> xsum(static_cast<size_t>(m * (k / kGroup)));
  const auto* xbits = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  group_sums(xbits, m, k, xsum.data());
  const Problem problem{xbits,
                        packed.data_ptr<uint8_t>(),
                        reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>()),
                        xsum.data(),
                        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
                        m,
                        n,
                        k};
  const Shuffles shuffles;
#if DUOSERVE_INT4MM_AMX
  if (int4pack_mm_amx_rows() && m >= amx_min_rows.value_or(kAmxMinRows)) {
    run_amx(problem, shuffles);
    return y;
  }
#endif
  at::parallel_for(0, n / kBlock, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      for (int64_t row = 0; row < problem.m; row += kPassRows) {
        switch (std::min<int64_t>(problem.m - row, kPassRows)) {
          case 4: block_pass<4>(problem, b, row, shuffles); break;
          case 3: block_pass<3>(problem, b, row, shuffles); break;
          case 2: block_pass<2>(problem, b, row, shuffles); break;
          default: block_pass<1>(problem, b, row, shuffles); break;
        }
      }
    }
  });
#endif
  return y;
}

}  // namespace

namespace duoserve {

at::Tensor int4pack_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros) {
  return ::int4pack_mm(x, packed, scales_and_zeros, std::nullopt);
}

}  // namespace duoserve

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("int4pack_mm_available() -> bool", &int4pack_mm_available);
  m.def("int4pack_mm_amx_rows() -> int", &int4pack_mm_amx_rows);
  m.def("int4pack_mm(Tensor x, Tensor packed, Tensor scales_and_zeros, int? amx_min_rows=None) -> Tensor",
        &int4pack_mm);
}
