"""A fused paged-attention decode kernel for CPUs (C++, built on first use with torch's extension builder).

The torch backend's decode gathers every sequence's context blocks into a padded batch buffer, then
runs SDPA over it: the context is read, written, and read again, and padding is computed too. At
batch 64 that gather-and-attend costs several times the model's weight reads (BENCHMARKS.md). This
kernel walks each sequence's block table in place instead: one read of each K/V row, no padding.

Work is split over (sequence, KV head) pairs with ATen's thread pool; each pair handles its whole
query-head group, so a K/V row is loaded once for all the heads that share it (GQA).
"""

from __future__ import annotations

import logging
import os
import platform

import torch

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

// 8 floats, as GCC vector extensions: AVX registers with -march=native, plain loops elsewhere.
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float* p) { v8 r; __builtin_memcpy(&r, p, sizeof r); return r; }
static inline void store8(float* p, v8 x) { __builtin_memcpy(p, &x, sizeof x); }

static inline float dot(const float* a, const float* b, int64_t n) {
  v8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  int64_t i = 0;
  const v8 av = {a, a, a, a, a, a, a, a};
  for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + av * load8(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// q: [D, H, dim]; k_pool, v_pool: [N, block_size, KVH, dim]; block_tables: [D, max_blocks] int64;
// context_lens: [D] int64. Returns [D, H, dim]. All float32, contiguous.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_pool.size(1), num_kv_heads = k_pool.size(2);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = num_kv_heads * dim;  // floats between consecutive tokens in a block
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads, kh = item % num_kv_heads, len = lens[s];
      const float* qs = qp + (s * num_heads + kh * group) * dim;
      float* o = op + (s * num_heads + kh * group) * dim;
      scores.resize(group * len);
      for (int64_t t = 0; t < len; ++t) {  // each K row is loaded once for the whole head group
        const int64_t block = tables[s * max_blocks + t / block_size];
        const float* k = kp + (block * block_size + t % block_size) * row + kh * dim;
        for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(qs + g * dim, k, dim) * fscale;
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) { sg[t] = std::exp(sg[t] - mx); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      std::fill(o, o + group * dim, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t block = tables[s * max_blocks + t / block_size];
        const float* v = vp + (block * block_size + t % block_size) * row + kh * dim;
        for (int64_t g = 0; g < group; ++g) axpy(o + g * dim, scores[g * len + t], v, dim);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
"""

_module = None
_failed = False


def _flags() -> list[str]:
    flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Some VMs list AMX without granting its tiles; code using them would crash.
        flags += ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    return flags


def load() -> object | None:
    """The compiled kernel module, or None where it cannot be built (no compiler): callers fall back."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("DUOSERVE_DISABLE_CPU_KERNELS"):
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline(
            name="duoserve_cpu_attention_v2",
            cpp_sources=_SOURCE,
            extra_cflags=_flags(),
            verbose=False,
        )
    except Exception as err:  # a missing compiler or headers: the torch path still works
        logger.warning("CPU attention kernel unavailable (%s); using the torch gather path", err)
        _failed = True
    return _module


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention of q [D, heads, dim] over each sequence's paged context (see module doc)."""
    return _module.paged_decode(q.contiguous(), k_pool, v_pool, block_tables, context_lens, scale)
