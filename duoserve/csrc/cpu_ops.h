// The CPU kernels' ops as C++ functions, for other kernels of the same library to call without going
// through Python and torch's dispatcher (models/csrc/decode_layers_cpu.cpp). Each is the op registered
// under the same name in TORCH_LIBRARY(duoserve_cpu): same checks, same results.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace duoserve {

// models/csrc/int4pack_mm_cpu.cpp, int8_mm_cpu.cpp
at::Tensor int4pack_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros);
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);

// models/csrc/quantized_matmul_cpu.cpp (float32 models' GGUF codes)
at::Tensor q4_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale_min,
                     int64_t activation_bits);
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     int64_t activation_bits);

// models/csrc/decode_ops_cpu.cpp
at::Tensor norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_norm_rows(const at::Tensor& x, const at::Tensor& delta,
                                                 const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                           const at::Tensor& sin);
void store_kv(at::Tensor k_pool, at::Tensor v_pool, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots);

// attention/csrc/paged_attention_cpu.cpp
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                        int64_t sliding_window, double logits_soft_cap, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale);

// attention/csrc/prefill_attention_cpu.cpp
bool prefill_attention_available();
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

}  // namespace duoserve
