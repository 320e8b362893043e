// bfloat16 activations times torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`), the
// codes dequantized in registers: a bfloat16 model's 4-bit linears at 8-64 rows (duoserve/int4pack.py,
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
// Blocking: each thread takes blocks of 64 output rows; per group it unpacks the block's 32 x 64 codes
// once into 64 vectors (4 KiB, L1) and runs every row of x over them, 4 rows at a time against all 64
// outputs (16 float32 accumulators), so each weight byte is read from memory once per call. Columns of a
// vector pair up as the dot product needs: 32-bit lane i = (column k, column k + 1) of output row i.
//
// Compiled only where the compiler targets AVX512-BF16 and AVX512-VBMI (byte shuffles), i.e. with
// -march=native on such a host (Zen 4/5, Cooper Lake for BF16 only: no VBMI there, Sapphire Rapids and
// later); elsewhere `int4pack_mm_available()` is false and the op refuses, and the engine keeps torch's
// kernel and the tiles.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define DUOSERVE_INT4MM 1
#include <immintrin.h>
#else
#define DUOSERVE_INT4MM 0
#endif

namespace {

constexpr int64_t kBlock = 64;   // output rows per block of the layout (AVX-512 hosts)
constexpr int64_t kGroup = 32;   // columns per (scale, zero)
constexpr int64_t kPass = 64;    // rows of x accumulated at a time (64 x 64 float32: 16 KiB)

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

// One group (32 columns, 1 KiB of codes) of a block into w[pair * 4 + v]: bfloat16 pairs 128 + q of
// rows 16v..16v+15 (v = 0, 1: low nibbles; 2, 3: high nibbles, rows 32-63).
__attribute__((noinline)) void unpack_group(const uint8_t* codes, const Shuffles& shuffles, __m512i* w) {
  const __mmask64 words = 0x5555555555555555ULL;
  const __m512i nibble = _mm512_set1_epi32(0x000F000F);
  const __m512i magic = _mm512_set1_epi32(0x43004300);  // bfloat16 128.0 in both words
#pragma GCC unroll 4
  for (int p = 0; p < kPairs; ++p) {
    const __m512i bytes = _mm512_loadu_si512(codes + p * 64);
    const __m512i first = _mm512_maskz_permutexvar_epi8(words, shuffles.first, bytes);
    const __m512i second = _mm512_maskz_permutexvar_epi8(words, shuffles.second, bytes);
    // (a & b) | c: the low nibble with the magic exponent.
    w[p * 4 + 0] = _mm512_ternarylogic_epi32(first, nibble, magic, 0xEA);
    w[p * 4 + 1] = _mm512_ternarylogic_epi32(second, nibble, magic, 0xEA);
    w[p * 4 + 2] = _mm512_or_si512(_mm512_srli_epi16(first, 4), magic);
    w[p * 4 + 3] = _mm512_or_si512(_mm512_srli_epi16(second, 4), magic);
  }
}

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

// ROWS rows of x (bfloat16, row stride k) against one unpacked group: acc[r][64] += that group's part.
// Not inlined: inlined into the block loop, GCC kept unpacked codes in registers across calls and
// spilled the accumulators instead (the kernel ran at a third of the speed).
template <int ROWS>
__attribute__((noinline)) void group_rows(const uint16_t* x, int64_t k, const __m512i* w, const __m512* scale,
                       const __m512* offset, const float* xsum, int64_t groups, float* acc) {
  __m512 inner[ROWS][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) inner[r][v] = _mm512_setzero_ps();
  }
#pragma GCC unroll 16
  for (int p = 0; p < kPairs; ++p) {
    __m512i xs[ROWS];
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      int32_t both;
      std::memcpy(&both, x + r * k + 2 * p, sizeof(both));
      xs[r] = _mm512_set1_epi32(both);
    }
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      const __m512bh codes = as_bf16(_mm512_load_si512(w + p * kVectors + v));
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) inner[r][v] = _mm512_dpbf16_ps(inner[r][v], as_bf16(xs[r]), codes);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    const __m512 sum = _mm512_set1_ps(xsum[r * groups]);
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      float* out = acc + r * kBlock + 16 * v;
      const __m512 partial = _mm512_fmadd_ps(offset[v], sum, _mm512_loadu_ps(out));
      _mm512_storeu_ps(out, _mm512_fmadd_ps(scale[v], inner[r][v], partial));
    }
  }
}

// Rows of x per register tile: 16 accumulators, 4 broadcasts, 1 code vector (6 rows, 24 accumulators,
// ran no faster on a Zen 5: ~1.7 dot products a cycle either way, near its 2).
constexpr int kTileRows = 4;

struct Problem {
  const uint16_t* x;       // [M, K] bfloat16 bits
  const uint8_t* packed;   // [N / 64 blocks][K][32]
  const uint16_t* pairs;   // [K / 32, N, 2] bfloat16 bits
  const float* xsum;       // [M, K / 32]: each group's sum of x
  uint16_t* y;             // [M, N] bfloat16 bits
  int64_t m, n, k;
};

void rows_of_group(const Problem& t, int64_t first, int64_t rows, int64_t g, const __m512i* w,
                   const __m512* scale, const __m512* offset, float* acc) {
  const int64_t groups = t.k / kGroup;
  for (int64_t r = 0; r < rows;) {
    const uint16_t* x = t.x + (first + r) * t.k + g * kGroup;
    const float* xsum = t.xsum + (first + r) * groups + g;
    float* a = acc + r * kBlock;
    switch (std::min<int64_t>(rows - r, kTileRows)) {
      case 4: group_rows<4>(x, t.k, w, scale, offset, xsum, groups, a); r += 4; break;
      case 3: group_rows<3>(x, t.k, w, scale, offset, xsum, groups, a); r += 3; break;
      case 2: group_rows<2>(x, t.k, w, scale, offset, xsum, groups, a); r += 2; break;
      default: group_rows<1>(x, t.k, w, scale, offset, xsum, groups, a); r += 1; break;
    }
  }
}

// Output rows 64b..64b+63 for every row of x.
void block_product(const Problem& t, int64_t b, const Shuffles& shuffles) {
  alignas(64) __m512i w[kPairs * kVectors];
  alignas(64) float acc[kPass * kBlock];
  const int64_t groups = t.k / kGroup;
  const uint8_t* codes = t.packed + b * kBlock * (t.k / 2);
  for (int64_t first = 0; first < t.m; first += kPass) {
    const int64_t rows = std::min(kPass, t.m - first);
    std::fill(acc, acc + rows * kBlock, 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      if (g + 1 < groups) {  // the next group's (scale, zero) pairs: 256 bytes, N * 4 bytes further on
        const char* next = reinterpret_cast<const char*>(t.pairs + ((g + 1) * t.n + b * kBlock) * 2);
        for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
      }
      __m512 scale[kVectors], offset[kVectors];
      unpack_group(codes + g * kGroup * (kBlock / 2), shuffles, w);
      group_scales(t.pairs + (g * t.n + b * kBlock) * 2, scale, offset);
      rows_of_group(t, first, rows, g, w, scale, offset, acc);
    }
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* out = t.y + (first + r) * t.n + b * kBlock;
      for (int v = 0; v < kVectors; ++v) {
        // Round to nearest even, as torch's float -> bfloat16.
        const __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(acc + r * kBlock + 16 * v));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * v), reinterpret_cast<const __m256i&>(half));
      }
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

bool int4pack_mm_available() { return DUOSERVE_INT4MM != 0; }

// x [M, K] bfloat16 @ W.T, W the [N, K] int4-packed matrix (blocks of 64 rows): y [M, N] bfloat16.
at::Tensor int4pack_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros) {
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
  at::parallel_for(0, n / kBlock, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) block_product(problem, b, shuffles);
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("int4pack_mm_available() -> bool", &int4pack_mm_available);
  m.def("int4pack_mm(Tensor x, Tensor packed, Tensor scales_and_zeros) -> Tensor", &int4pack_mm);
}
