// Dequantizing rows of torch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`) into bfloat16
// or float32 tiles, in one pass: the many-rows path of a bfloat16 model's 4-bit linears
// (duoserve/int4pack.py), which runs the dense GEMM on such tiles.
//
// Layout: the [N, K] codes are stored as blocks of B output rows (B = 64 where torch's kernels use
// AVX-512, 32 with AVX2; the caller finds it and passes it), each block [K, B/2] bytes: byte (k, j) holds
// row j's code (low nibble) and row j + B/2's (high nibble) of column k. scales_and_zeros: bfloat16
// [K/32, N, 2], a (scale, zero) pair per group of 32 columns and row: w = (q - 8) * scale + zero.
//
// The value is computed exactly as the Python path does (int4pack.py: addcmul in float32, then one
// rounding to bfloat16), so that both give the same tiles bit for bit: c = zero - 8 * scale (8 * scale
// is exact), w = q * scale + c (q * scale is exact: a 4-bit code times an 8-bit significand), rounded
// to float32 once, then to bfloat16 by round-to-nearest-even (torch's conversion).
//
// Reading a column of a block is a strided walk (B/2 bytes apart), so the vector paths gather: one
// 32-bit gather of 16 (AVX-512) or 8 (AVX2) consecutive columns at byte offset j reads rows j..j+3 and
// j+B/2..j+B/2+3 of those columns, 8 output vectors. Other CPUs take a plain loop (so do calls with
// vectorized=False: tests compare the two).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr float kZeroCode = 8.0f;

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// What one call works on: the codes, the (scale, zero) pairs and the output tile.
struct Int4Tile {
  const uint8_t* packed;
  const uint16_t* pairs;  // bfloat16 bits, [K/32, N, 2]
  int64_t n;              // rows of the whole matrix
  int64_t k;              // columns
  int64_t block;          // rows per block of the layout
  int64_t start;          // first row of the tile
  void* out;              // [end - start, K], bfloat16 or float32

  // c = zero - 8 * scale and the scale of row `row`, group `group`.
  inline void pair(int64_t group, int64_t row, float* scale, float* offset) const {
    const uint16_t* p = pairs + (group * n + row) * 2;
    *scale = bf16_bits_to_float(p[0]);
    *offset = bf16_bits_to_float(p[1]) - kZeroCode * *scale;
  }
  inline const uint8_t* block_codes(int64_t b) const { return packed + b * block * (k / 2); }
};

// ---- Plain loop: any CPU, any block size ------------------------------------------------------------

template <typename Out>
void dequantize_block_plain(const Int4Tile& t, int64_t b) {
  const int64_t half = t.block / 2;
  const uint8_t* codes = t.block_codes(b);
  Out* out = static_cast<Out*>(t.out);
  for (int64_t j = 0; j < t.block; ++j) {
    const int64_t row = b * t.block + j;
    const int64_t byte = j % half;
    const int shift = j < half ? 0 : 4;
    Out* dst = out + (row - t.start) * t.k;
    for (int64_t g = 0; g < t.k / kGroup; ++g) {
      float scale, offset;
      t.pair(g, row, &scale, &offset);
      for (int64_t c = g * kGroup; c < (g + 1) * kGroup; ++c) {
        const float q = static_cast<float>((codes[c * half + byte] >> shift) & 0x0F);
        const float value = q * scale + offset;
        if constexpr (std::is_same_v<Out, float>) {
          dst[c] = value;
        } else {
          dst[c] = c10::BFloat16(value);  // round to nearest even, as torch's conversion
        }
      }
    }
  }
}

// ---- AVX-512: 16 columns per vector ------------------------------------------------------------------

#if defined(__AVX512F__)
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }

inline void store16(c10::BFloat16* dst, __m512 v) {
  // torch's float -> bfloat16: round to nearest even on the bits, NaN -> 0x7FC0.
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, lsb), _mm512_set1_epi32(0x7FFF)), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
}

inline void store32(float* dst, __m512 first, __m512 second) {
  _mm512_storeu_ps(dst, first);
  _mm512_storeu_ps(dst + 16, second);
}

inline void store32(c10::BFloat16* dst, __m512 first, __m512 second) {
#if defined(__AVX512BF16__)
  // One instruction for 32 values, round to nearest even as torch's conversion, but for values below
  // float32's normal range (flushed to zero: not a weight's) and NaN payloads.
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(second, first));
#else
  store16(dst, first);
  store16(dst + 16, second);
#endif
}

template <typename Out>
void dequantize_block_avx512(const Int4Tile& t, int64_t b) {
  const int64_t half = t.block / 2;
  const uint8_t* codes = t.block_codes(b);
  Out* out = static_cast<Out*>(t.out);
  const __m512i columns = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(half)));
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  // Rows j..j+3 (low nibbles) and j+half..j+half+3 (high nibbles) of this block at a time, along the
  // whole row: 8 output streams (all 64 rows of a block at once, 4 KiB apart, thrashed L1's sets).
  for (int64_t j = 0; j < half; j += 4) {
    for (int64_t g = 0; g < t.k / kGroup; ++g) {
      __m512 scale[8], offset[8];
      Out* dst[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = b * t.block + j + (i & 3) + (i < 4 ? 0 : half);
        float s, o;
        t.pair(g, row, &s, &o);
        scale[i] = _mm512_set1_ps(s);
        offset[i] = _mm512_set1_ps(o);
        dst[i] = out + (row - t.start) * t.k + g * kGroup;
      }
      // Columns 0-15 and 16-31 of the group: byte i of each word holds row j + i in its low nibble,
      // row j + half + i in its high one.
      const uint8_t* column = codes + g * kGroup * half + j;
      const __m512i first = _mm512_i32gather_epi32(columns, column, 1);
      const __m512i second = _mm512_i32gather_epi32(columns, column + 16 * half, 1);
      const auto emit = [&](int shift, int i) {
        const __m512i early = _mm512_srli_epi32(first, shift), late = _mm512_srli_epi32(second, shift);
        const auto value = [&](__m512i byte, int r) {
          return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(byte, nibble)), scale[r], offset[r]);
        };
        store32(dst[i], value(early, i), value(late, i));
        store32(dst[i + 4], value(_mm512_srli_epi32(early, 4), i + 4), value(_mm512_srli_epi32(late, 4), i + 4));
      };
      emit(0, 0);
      emit(8, 1);
      emit(16, 2);
      emit(24, 3);
    }
  }
}
#endif

// ---- AVX2 + FMA: 8 columns per vector ----------------------------------------------------------------

#if defined(__AVX2__) && defined(__FMA__)
inline void store8(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }

inline void store8(c10::BFloat16* dst, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, lsb), _mm256_set1_epi32(0x7FFF)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // Values fit in 16 bits: pack within each 128-bit lane, then bring the two lanes' halves together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}

template <typename Out>
void dequantize_block_avx2(const Int4Tile& t, int64_t b) {
  const int64_t half = t.block / 2;
  const uint8_t* codes = t.block_codes(b);
  Out* out = static_cast<Out*>(t.out);
  const __m256i columns =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(half)));
  const __m256i nibble = _mm256_set1_epi32(0x0F);
  for (int64_t j = 0; j < half; j += 4) {  // as the AVX-512 loop: 8 output streams at a time
    for (int64_t g = 0; g < t.k / kGroup; ++g) {
      __m256 scale[8], offset[8];
      Out* dst[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = b * t.block + j + (i & 3) + (i < 4 ? 0 : half);
        float s, o;
        t.pair(g, row, &s, &o);
        scale[i] = _mm256_set1_ps(s);
        offset[i] = _mm256_set1_ps(o);
        dst[i] = out + (row - t.start) * t.k + g * kGroup;
      }
      for (int64_t c = 0; c < kGroup; c += 8) {
        const __m256i word = _mm256_i32gather_epi32(
            reinterpret_cast<const int*>(codes + (g * kGroup + c) * half + j), columns, 1);
        const auto emit = [&](__m256i byte, int i) {
          const __m256i lo = _mm256_and_si256(byte, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(byte, 4), nibble);
          store8(dst[i] + c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), scale[i], offset[i]));
          store8(dst[i + 4] + c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), scale[i + 4], offset[i + 4]));
        };
        emit(word, 0);
        emit(_mm256_srli_epi32(word, 8), 1);
        emit(_mm256_srli_epi32(word, 16), 2);
        emit(_mm256_srli_epi32(word, 24), 3);
      }
    }
  }
}
#endif

template <typename Out>
void dequantize_blocks(const Int4Tile& t, int64_t first, int64_t last, bool vector) {
  for (int64_t b = first; b < last; ++b) {
#if defined(__AVX512F__)
    if (vector) {
      dequantize_block_avx512<Out>(t, b);
      continue;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (vector) {
      dequantize_block_avx2<Out>(t, b);
      continue;
    }
#endif
    dequantize_block_plain<Out>(t, b);
  }
}

// N and K of an int4-packed matrix and its (scale, zero) pairs, checked.
std::pair<int64_t, int64_t> checked_shape(const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                                          int64_t block) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2,
              "packed must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous() &&
                  scales_and_zeros.dim() == 3 && scales_and_zeros.size(2) == 2,
              "scales_and_zeros must be contiguous bfloat16 [K/32, N, 2]");
  const int64_t n = packed.size(0), k = packed.size(1) * 2;
  TORCH_CHECK(scales_and_zeros.size(0) * kGroup == k && scales_and_zeros.size(1) == n, "shape mismatch");
  TORCH_CHECK(block >= 2 && block % 2 == 0 && n % block == 0, "rows must be whole blocks of the layout");
  return {n, k};
}

Int4Tile make_tile(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t n, int64_t k,
                   int64_t block, int64_t start, void* out) {
  return Int4Tile{packed.data_ptr<uint8_t>(),
                  reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<at::BFloat16>()),
                  n,
                  k,
                  block,
                  start,
                  out};
}

// Rows [start, end) (whole blocks) of the int4-packed matrix into `out` [end - start, K].
void int4pack_dequantize(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t start,
                         int64_t end, int64_t block, const at::Tensor& out, bool vectorized) {
  const auto [n, k] = checked_shape(packed, scales_and_zeros, block);
  TORCH_CHECK(start >= 0 && start <= end && end <= n && start % block == 0 && end % block == 0,
              "rows out of range or not whole blocks");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == end - start && out.size(1) == k,
              "out must be a contiguous [end - start, K] matrix");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat,
              "out must be bfloat16 or float32");
  const Int4Tile tile = make_tile(packed, scales_and_zeros, n, k, block, start, out.data_ptr());
  // The gathers read 4 bytes at offsets j..half-4 of a column: whole groups of 4 rows per nibble.
  const bool vector = vectorized && (block / 2) % 4 == 0;
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(start / block, end / block, 1, [&](int64_t first, int64_t last) {
    if (bf16) {
      dequantize_blocks<c10::BFloat16>(tile, first, last, vector);
    } else {
      dequantize_blocks<float>(tile, first, last, vector);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.def("int4pack_dequantize(Tensor packed, Tensor scales_and_zeros, int start, int end, int block, "
        "Tensor(a!) out, bool vectorized=True) -> ()",
        &int4pack_dequantize);
}
