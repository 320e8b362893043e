// Intel AMX for the CPU kernels: the tile configuration and the kernel's permission to use tile data.
//
// AMX multiplies in eight tile registers (16 rows x 64 bytes each) configured per thread; a product of
// bfloat16 tiles (tdpbf16ps: 16 x 16 float32 sums of 32 products each) runs 30x the AVX512-BF16 dot
// product's rate on a Sapphire Rapids core (3.4 TFLOP/s against 115 GFLOP/s, one core of a 2-vCPU Xeon,
// 2026-12-04). Linux hands tile state to a process only after it asks (arch_prctl); a kernel that uses
// tiles calls amx_permitted() first and keeps its AVX-512 path where the answer is no.
#pragma once

// Rows of x from which the fused 4-bit and 8-bit kernels multiply on tiles, where they can: one threshold
// for both (the crossovers each measured are in models/csrc/int4pack_mm_cpu.cpp and int8_mm_cpu.cpp),
// which cpu_kernels.fused_amx_rows reports. -D overrides it (benchmarks/cpu_kernel_ab.py --define).
#ifndef DUOSERVE_FUSED_AMX_MIN_ROWS
#define DUOSERVE_FUSED_AMX_MIN_ROWS 3
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define DUOSERVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

namespace duoserve::amx {

// The layout ldtilecfg reads (palette 1): each tile's rows and bytes per row.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int tile_rows, int bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(tile_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
};

// Whether this process may use tile data: asks Linux once (ARCH_REQ_XCOMP_PERM for XTILEDATA).
inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long kReqPermission = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqPermission, kXtileData) == 0;
  }();
  return permitted;
}

}  // namespace duoserve::amx

#else
#define DUOSERVE_AMX 0
namespace duoserve::amx {
inline bool amx_permitted() { return false; }
}  // namespace duoserve::amx
#endif
