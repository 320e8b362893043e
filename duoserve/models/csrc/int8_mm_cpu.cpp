// bfloat16 activations times int8 codes with one scale per output row (Int8Linear's layout: codes
// [N, K] row-major, as torch's `_weight_int8pack_mm` reads them), the codes converted in registers: a
// bfloat16 model's 8-bit linears at 1-32 rows (SmolLM2's Q8_0 lm_head: 28 M weights, a fifth of a
// decode step's), where torch's int8 kernel grows with the rows (and at 1-4 rows reads its codes at
// ~30 GB/s where this reads ~40, machine D) and tiles write and read back a bfloat16 copy of every
// weight.
//
// y[m, n] = scale[n] * sum_k x[m, k] q[n, k]: an int8 code is an exact bfloat16 (8 significant bits),
// so the sum runs on AVX512-BF16 dot products (exact products, float32 sums), and the scale is applied
// once to the float32 sum before the one rounding to bfloat16.
//
// Blocking: each thread takes 16 output rows at a time. Up to kGemvRows rows of x (block_gemv), passes
// of 1, 2 or 4 rows convert the codes in registers against 16, 8 or 4 output rows (16 float32
// accumulators whose lanes run along K, summed at the end by one transposing reduction); the first
// pass reads the block from memory, prefetching the next one, later passes from L1/L2. Above that
// (block_product), the block's codes are converted once into a scratch row block (L1/L2) and every row
// of x runs over it, tiles of 4 rows of x by 4 output rows. Each code byte is read from memory once per
// call either way; converting again per pass costs less than the scratch's store and reload up to ~24
// rows (the 16384 x 2048 measurement matrix from memory: 0.43-0.49x the scratch's time at 1-4 rows,
// 0.58x at 8, 0.80x at 16, 0.88x at 24, equal at 32, 1.13x at 64; benchmarks/cpu_kernel_ab.py).
//
// Compiled only where the compiler targets AVX512-BF16 (-march=native on such a host); elsewhere
// `int8_mm_available()` is false and the op refuses. Where it also targets AMX (Sapphire Rapids and
// later) and Linux grants the tiles, steps of kAmxMinRows rows or more multiply on AMX tiles instead
// (run_amx below).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "../../csrc/cpu_amx.h"
#include "../../csrc/cpu_ops.h"
#include "../../csrc/cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define DUOSERVE_INT8MM 1
#include <immintrin.h>
#else
#define DUOSERVE_INT8MM 0
#endif
#define DUOSERVE_INT8MM_AMX (DUOSERVE_INT8MM && DUOSERVE_AMX)
// Intel cores with AMX run vdpbf16ps at a quarter of the float32 FMA's rate (benchmarks/isa_rates.cpp:
// 115 against 233 GFLOP/s on machine E), so there the few-row path (gemv) widens x and the codes to
// float32 and multiplies with the FMA: SmolLM2's lm_head (49152 x 576) at 1 row 1.18-1.55 against
// 1.30-1.80 ms, at 2 rows 1.22-1.51 against 1.42-1.72 (benchmarks/cpu_kernel_ab.py, three runs). AMD's
// Zen 4/5 run the dot product at full rate: they keep it.
#if DUOSERVE_INT8MM && defined(__AMX_BF16__) && !defined(DUOSERVE_INT8MM_GEMV_FMA)
#define DUOSERVE_INT8MM_GEMV_FMA 1
#endif

namespace {

constexpr int64_t kRows = 16;   // output rows converted at a time
constexpr int64_t kChunk = 32;  // columns per dot product step (one vector of bfloat16)
constexpr int64_t kGemvRows = 24;  // rows of x up to which block_gemv runs (see Blocking above)

#if DUOSERVE_INT8MM

inline __m512bh as_bf16(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// Codes [rows, K] (int8, row stride k) -> bfloat16 [rows, K], exactly.
void convert_rows(const int8_t* codes, int64_t rows, int64_t k, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < k; c += kChunk) {
      const int8_t* p = codes + r * k + c;
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
      // words 0-15 from the second argument, 16-31 from the first: columns in order.
      const __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);
      _mm512_storeu_si512(out + r * k + c, reinterpret_cast<const __m512i&>(both));
    }
  }
}

// Lane i of the result: the sum of a[i]'s 16 lanes (i = 4 * row of x + output row).
inline __m512 transpose_sums(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // c[i]'s 128-bit lane L: sources 4i..4i+3 summed over lane L; sum over the four lanes.
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(3, 1, 3, 1)));
}

struct Problem {
  const uint16_t* x;  // [M, K] bfloat16 bits
  const int8_t* codes;  // [N, K]
  const float* scales;  // [N]
  uint16_t* y;        // [M, N] bfloat16 bits
  int64_t m, n, k;
};

// ROWS (1-4) rows of x from `first` against 4 converted output rows w (bfloat16 [4, K]) -> y[:, n..n+3].
template <int ROWS>
__attribute__((noinline)) void tile(const Problem& t, int64_t first, const uint16_t* w, int64_t n) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < t.k; c += kChunk) {
    __m512i xs[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) xs[r] = _mm512_loadu_si512(t.x + (first + r) * t.k + c);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512bh codes = as_bf16(_mm512_loadu_si512(w + j * t.k + c));
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) acc[r * 4 + j] = _mm512_dpbf16_ps(acc[r * 4 + j], as_bf16(xs[r]), codes);
    }
  }
  const __m512 scale = _mm512_broadcast_f32x4(_mm_loadu_ps(t.scales + n));
  const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(transpose_sums(acc), scale));
  alignas(32) uint16_t out[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<const __m256i&>(rounded));
  for (int r = 0; r < ROWS; ++r) std::copy(out + 4 * r, out + 4 * r + 4, t.y + (first + r) * t.n + n);
}

void block_product(const Problem& t, int64_t block, std::vector<uint16_t>& scratch) {
  const int64_t n0 = block * kRows;
  convert_rows(t.codes + n0 * t.k, kRows, t.k, scratch.data());
  for (int64_t first = 0; first < t.m;) {
    const int64_t rows = std::min<int64_t>(4, t.m - first);
    for (int64_t q = 0; q < kRows; q += 4) {
      const uint16_t* w = scratch.data() + q * t.k;
      switch (rows) {
        case 4: tile<4>(t, first, w, n0 + q); break;
        case 3: tile<3>(t, first, w, n0 + q); break;
        case 2: tile<2>(t, first, w, n0 + q); break;
        default: tile<1>(t, first, w, n0 + q); break;
      }
    }
    first += rows;
  }
}

// ROWS (1, 2 or 4) rows of x from `first` against output rows n..n+16/ROWS-1, the codes converted in
// registers: at up to four rows each converted code feeds at most four dot products, so the scratch
// copy block_product makes costs more than it saves, and 16 accumulators keep the dot products'
// latency hidden (tile<1> has 4).
// Each step also prefetches `lines` cache lines from `ahead` (the next rows' codes): 16 rows read side
// by side are 16 short streams, which the hardware prefetcher follows late.
template <int ROWS>
void gemv(const Problem& t, int64_t first, int64_t n, const char* ahead, int64_t lines) {
  constexpr int kOut = 16 / ROWS;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t steps = t.k / kChunk;
  for (int64_t c = 0, step = 0; c < t.k; c += kChunk, ++step) {
    for (int64_t line = step * lines / steps; line < (step + 1) * lines / steps; ++line) {
      _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
#ifdef DUOSERVE_INT8MM_GEMV_FMA
    // x widened to float32 (16 columns c..c+15, then c+16..c+31), each code too, multiplied by the float32
    // FMA: exact products, float32 sums, lanes along K as the dot products' are.
    __m512 xlo[ROWS], xhi[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      xlo[r] = duoserve::load_bf16(t.x + (first + r) * t.k + c);
      xhi[r] = duoserve::load_bf16(t.x + (first + r) * t.k + c + 16);
    }
#else
    __m512bh xs[ROWS];
    for (int r = 0; r < ROWS; ++r) xs[r] = as_bf16(_mm512_loadu_si512(t.x + (first + r) * t.k + c));
#endif
#pragma GCC unroll 16
    for (int j = 0; j < kOut; ++j) {
      const int8_t* p = t.codes + (n + j) * t.k + c;
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
#ifdef DUOSERVE_INT8MM_GEMV_FMA
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        acc[r * kOut + j] = _mm512_fmadd_ps(xhi[r], hi, _mm512_fmadd_ps(xlo[r], lo, acc[r * kOut + j]));
      }
#else
      const __m512bh codes = _mm512_cvtne2ps_pbh(hi, lo);  // exact: 8 significant bits
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) acc[r * kOut + j] = _mm512_dpbf16_ps(acc[r * kOut + j], xs[r], codes);
#endif
    }
  }
  // Lane r * kOut + j: row r of x, output row n + j.
  __m512 scale;
  if (ROWS == 1) {
    scale = _mm512_loadu_ps(t.scales + n);
  } else if (ROWS == 2) {
    scale = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(reinterpret_cast<const double*>(t.scales + n))));
  } else {
    scale = _mm512_broadcast_f32x4(_mm_loadu_ps(t.scales + n));
  }
  const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(transpose_sums(acc), scale));
  alignas(32) uint16_t out[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<const __m256i&>(rounded));
  for (int r = 0; r < ROWS; ++r) std::copy(out + kOut * r, out + kOut * (r + 1), t.y + (first + r) * t.n + n);
}

// One pass of ROWS rows of x from `first` over the 16 output rows from n0, in ROWS calls of 16 / ROWS
// outputs, spreading the prefetch of `lines` lines from `next` over them.
template <int ROWS>
void pass_gemv(const Problem& t, int64_t first, int64_t n0, const char* next, int64_t lines) {
  constexpr int64_t kOut = 16 / ROWS;  // outputs per gemv call
  constexpr int64_t calls = kRows / kOut;
  for (int64_t i = 0; i < calls; ++i) {
    const int64_t part = lines / calls;
    gemv<ROWS>(t, first, n0 + i * kOut, next + 64 * i * part, i + 1 < calls ? part : lines - i * part);
  }
}

// Output rows 16b..16b+15 for the (up to kGemvRows) rows of x, in passes of 4, 2 or 1 rows; the first
// pass prefetches block b + 1's codes (when b + 1 < last, the thread's end), later passes find the
// block in L1/L2.
void block_gemv(const Problem& t, int64_t b, int64_t last) {
  const int64_t n0 = b * kRows;
  const char* next = reinterpret_cast<const char*>(t.codes + (n0 + kRows) * t.k);
  int64_t lines = b + 1 < last ? kRows * t.k / 64 : 0;
  for (int64_t first = 0; first < t.m; lines = 0) {
    const int64_t rows = t.m - first;
    if (rows >= 4) {
      pass_gemv<4>(t, first, n0, next, lines);
      first += 4;
    } else if (rows >= 2) {
      pass_gemv<2>(t, first, n0, next, lines);
      first += 2;
    } else {
      pass_gemv<1>(t, first, n0, next, lines);
      first += 1;
    }
  }
}

#endif  // DUOSERVE_INT8MM

#if DUOSERVE_INT8MM_AMX

// The AMX path: the codes converted (exactly, as above) into A tiles of 16 output rows x 32 columns,
// x packed once per call into B tiles (16 column pairs x 16 rows of x, zero rows past M), and
// tdpbf16ps summing over all of K in the tiles: C[output row, row of x], scaled and rounded once at the
// end, transposed into y. Tiles: 0-3 the sums of four chunks of 16 rows of x, 4 the codes, 5-7 x.
constexpr int64_t kAmxChunk = 16;      // rows of x per B tile
constexpr int64_t kAmxChunks = 4;      // chunks of x summed together (one C tile each)
constexpr int64_t kTileWords = 16 * 32;  // bfloat16 words per tile (16 rows x 64 bytes)

// x [M, K] -> [chunks][K / 32][16 pairs][16 rows][2] words: each (chunk, step) a B tile.
std::vector<uint16_t> pack_x(const Problem& t, int64_t chunks) {
  const int64_t steps = t.k / kChunk;
  std::vector<uint16_t> packed(static_cast<size_t>(chunks * steps * kTileWords), 0);
  auto* out = reinterpret_cast<uint32_t*>(packed.data());
  const auto* x = reinterpret_cast<const uint32_t*>(t.x);  // column pairs of x
  for (int64_t row = 0; row < t.m; ++row) {
    const int64_t chunk = row / kAmxChunk, r = row % kAmxChunk;
    for (int64_t pair = 0; pair < t.k / 2; ++pair) {
      const int64_t step = pair / 16, p = pair % 16;
      out[((chunk * steps + step) * 16 + p) * 16 + r] = x[row * (t.k / 2) + pair];
    }
  }
  return packed;
}

// Output rows n0..n0+15's codes for columns c..c+31 as an A tile (bfloat16, 16 x 64 bytes).
inline void convert_tile(const int8_t* codes, int64_t k, uint16_t* tile) {
  for (int r = 0; r < 16; ++r) {
    const int8_t* p = codes + r * k;
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    const __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_store_si512(tile + 32 * r, reinterpret_cast<const __m512i&>(both));
  }
}

// C [16 output rows, 16 rows of x] (float32, from a tile) -> y[row0 + j, n0..n0+15], scaled and rounded.
inline void write_transposed(const Problem& t, const float* c, int64_t row0, int64_t n0) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  const __m512 scale = _mm512_loadu_ps(t.scales + n0);
  for (int64_t j = 0; j < std::min<int64_t>(kAmxChunk, t.m - row0); ++j) {
    const __m512 sums = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(static_cast<int>(j))), c, 4);
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(sums, scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.y + (row0 + j) * t.n + n0),
                        reinterpret_cast<const __m256i&>(rounded));
  }
}

template <int CHUNKS>
void block_amx_chunks(const Problem& t, const uint16_t* a, const uint16_t* xs, int64_t chunk0, int64_t n0,
                      float* sums) {
  const int64_t steps = t.k / kChunk;
  if (CHUNKS > 0) _tile_zero(0);
  if (CHUNKS > 1) _tile_zero(1);
  if (CHUNKS > 2) _tile_zero(2);
  if (CHUNKS > 3) _tile_zero(3);
  for (int64_t step = 0; step < steps; ++step) {
    _tile_loadd(4, a + step * kTileWords, 64);
    const uint16_t* b = xs + (chunk0 * steps + step) * kTileWords;
    if (CHUNKS > 0) { _tile_loadd(5, b, 64); _tile_dpbf16ps(0, 4, 5); }
    if (CHUNKS > 1) { _tile_loadd(6, b + steps * kTileWords, 64); _tile_dpbf16ps(1, 4, 6); }
    if (CHUNKS > 2) { _tile_loadd(7, b + 2 * steps * kTileWords, 64); _tile_dpbf16ps(2, 4, 7); }
    if (CHUNKS > 3) { _tile_loadd(5, b + 3 * steps * kTileWords, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  if (CHUNKS > 0) _tile_stored(0, sums + 0 * 256, 64);
  if (CHUNKS > 1) _tile_stored(1, sums + 1 * 256, 64);
  if (CHUNKS > 2) _tile_stored(2, sums + 2 * 256, 64);
  if (CHUNKS > 3) _tile_stored(3, sums + 3 * 256, 64);
  for (int i = 0; i < CHUNKS; ++i) write_transposed(t, sums + 256 * i, (chunk0 + i) * kAmxChunk, n0);
}

void run_amx(const Problem& t) {
  const int64_t chunks = (t.m + kAmxChunk - 1) / kAmxChunk;
  const std::vector<uint16_t> xs = pack_x(t, chunks);
  const int64_t steps = t.k / kChunk;
  at::parallel_for(0, t.n / kRows, 1, [&](int64_t first, int64_t last) {
    duoserve::amx::TileConfig config;
    for (int tile = 0; tile < 8; ++tile) config.set(tile, 16, 64);
    _tile_loadconfig(&config);
    auto* a = static_cast<uint16_t*>(std::aligned_alloc(64, steps * kTileWords * sizeof(uint16_t)));
    alignas(64) float sums[kAmxChunks * 256];
    for (int64_t b = first; b < last; ++b) {
      const int64_t n0 = b * kRows;
      for (int64_t step = 0; step < steps; ++step) convert_tile(t.codes + n0 * t.k + step * kChunk, t.k, a + step * kTileWords);
      for (int64_t chunk = 0; chunk < chunks; chunk += kAmxChunks) {
        switch (std::min(kAmxChunks, chunks - chunk)) {
          case 4: block_amx_chunks<4>(t, a, xs.data(), chunk, n0, sums); break;
          case 3: block_amx_chunks<3>(t, a, xs.data(), chunk, n0, sums); break;
          case 2: block_amx_chunks<2>(t, a, xs.data(), chunk, n0, sums); break;
          default: block_amx_chunks<1>(t, a, xs.data(), chunk, n0, sums); break;
        }
      }
    }
    std::free(a);
    _tile_release();
  });
}

#endif  // DUOSERVE_INT8MM_AMX

bool int8_mm_available() { return DUOSERVE_INT8MM != 0; }

// Rows of x from which the AMX path runs, where it can (cpu_amx.h). SmolLM2's lm_head (49152 x 576, 2 vCPUs of a
// Sapphire Rapids-class Xeon, 2026-12-04), AMX against the AVX-512 paths: 1 row 1.28 vs 1.17 ms, 2 rows
// 1.41 vs 1.43, 3 rows 1.36 vs 2.28, 16 rows 1.57 vs 7.65, 32 rows 2.13 vs 11.47, 64 rows 4.17 vs 21.51.
constexpr int64_t kAmxMinRows = DUOSERVE_FUSED_AMX_MIN_ROWS;

// x [M, K] bfloat16 @ (codes [N, K] int8 * scales [N]).T -> y [M, N] bfloat16.
// amx_min_rows: from how many rows the AMX path runs (tests and benchmarks; default kAmxMinRows).
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                   std::optional<int64_t> amx_min_rows) {
  TORCH_CHECK(int8_mm_available(), "int8_mm was not compiled for this CPU (needs AVX512-BF16)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2,
              "x must be contiguous bfloat16 [M, K]");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.dim() == 2,
              "codes must be contiguous int8 [N, K]");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(codes.size(1) == k && k % kChunk == 0, "K must match the codes and be a multiple of 32");
  TORCH_CHECK(n % kRows == 0, "N must be a multiple of 16");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == n, "scales must be [N]");
  const at::Tensor scales32 = scales.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m, n}, x.options());
#if DUOSERVE_INT8MM
  if (m == 0) return y;
  const Problem problem{reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                        codes.data_ptr<int8_t>(),
                        scales32.data_ptr<float>(),
                        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
                        m,
                        n,
                        k};
#if DUOSERVE_INT8MM_AMX
  if (duoserve::amx::amx_permitted() && m >= amx_min_rows.value_or(kAmxMinRows)) {
    run_amx(problem);
    return y;
  }
#endif
  if (m <= kGemvRows) {
    at::parallel_for(0, n / kRows, 1, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) block_gemv(problem, b, last);
    });
    return y;
  }
  at::parallel_for(0, n / kRows, 1, [&](int64_t first, int64_t last) {
    std::vector<uint16_t> scratch(static_cast<size_t>(kRows * k));
    for (int64_t b = first; b < last; ++b) block_product(problem, b, scratch);
  });
#endif
  return y;
}

}  // namespace

namespace duoserve {

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  return ::int8_mm(x, codes, scales, std::nullopt);
}

}  // namespace duoserve

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("int8_mm_available() -> bool", &int8_mm_available);
  m.def("int8_mm(Tensor x, Tensor codes, Tensor scales, int? amx_min_rows=None) -> Tensor", &int8_mm);
}
