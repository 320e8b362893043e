// Peak rates of one core for the instructions duoserve's bfloat16 CPU kernels are built on: the
// AVX512-BF16 dot product (vdpbf16ps), the float32 FMA, and AMX's bfloat16 tile product (tdpbf16ps),
// each with enough independent chains to hide its latency. On an AMX CPU they tell whether a kernel
// belongs on tiles (BENCHMARKS.md, machine E: 115, 233 and 3,396 GFLOP/s).
//
//     g++ -O3 -march=native benchmarks/isa_rates.cpp -o /tmp/isa_rates && /tmp/isa_rates
//
// Needs AVX512-BF16 and AMX (Sapphire Rapids and later): elsewhere it does not compile.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
struct alignas(64) Cfg { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; };
int main() {
  long r = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
  printf("perm %ld\n", r);
  // vdpbf16ps throughput: 24 independent chains
  __m512 acc[24]; for (int i=0;i<24;++i) acc[i]=_mm512_setzero_ps();
  __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x3f803f80);
  long n = 100000000;
  auto t0 = std::chrono::steady_clock::now();
  for (long it=0; it<n/24; ++it) {
#pragma GCC unroll 24
    for (int i=0;i<24;++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
    __asm__ volatile("" : "+x"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  float sink=0; for (int i=0;i<24;++i) sink += _mm512_reduce_add_ps(acc[i]);
  printf("vdpbf16ps: %.2f G/s -> %.1f GFLOP/s (sink %g)\n", n/s/1e9, n/s*64/1e9, sink);
  // fp32 fma throughput
  __m512 f[24]; for (int i=0;i<24;++i) f[i]=_mm512_setzero_ps();
  __m512 x = _mm512_set1_ps(1.0001f);
  t0 = std::chrono::steady_clock::now();
  for (long it=0; it<n/24; ++it) {
#pragma GCC unroll 24
    for (int i=0;i<24;++i) f[i] = _mm512_fmadd_ps(f[i], x, x);
    __asm__ volatile("" : "+v"(x));
  }
  s = std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  sink=0; for (int i=0;i<24;++i) sink += _mm512_reduce_add_ps(f[i]);
  printf("vfmadd: %.2f G/s -> %.1f GFLOP/s (sink %g)\n", n/s/1e9, n/s*32/1e9, sink);
  // AMX
  Cfg cfg; memset(&cfg,0,sizeof cfg); cfg.palette=1;
  for (int t=0;t<8;++t){cfg.rows[t]=16; cfg.colsb[t]=64;}
  _tile_loadconfig(&cfg);
  alignas(64) static uint16_t A[16*32], B[16*32]; for (int i=0;i<512;++i){A[i]=0x3f80;B[i]=0x3f80;}
  alignas(64) static float C[16*16];
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, A, 64); _tile_loadd(5, A, 64); _tile_loadd(6, B, 64); _tile_loadd(7, B, 64);
  long m = 20000000;
  t0 = std::chrono::steady_clock::now();
  for (long it=0; it<m/4; ++it) {
    _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,4,7); _tile_dpbf16ps(2,5,6); _tile_dpbf16ps(3,5,7);
  }
  s = std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  _tile_stored(0, C, 64);
  printf("tdpbf16ps: %.3f G/s -> %.1f GFLOP/s (C %g)\n", m/s/1e9, m/s*16*16*32*2/1e9, C[0]);
  _tile_release();
}
