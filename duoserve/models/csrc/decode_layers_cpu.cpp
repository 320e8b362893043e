// A pure decode step through every decoder layer of a Llama-family model (bfloat16, or float32 on GGUF
// codes) in one call: the ops models/llama.py's layers run (duoserve/models/cpu_decode.py says which
// models and steps qualify), in the same order on the same tensors, called from C++.
//
// Why: at batch 1 on a 2-core Zen 5 a SmolLM2-135M step spent ~1.5 of its 4.5 ms in Python and torch's
// dispatch around 18 ops a layer (perf: 41% of the main thread's samples in Python, dispatch and libc,
// the OpenMP worker spinning idle half the step), against 2.0 ms for the bytes of its weights; in one
// call 4.3 ms (BENCHMARKS.md). Each op here is the very function registered under its name
// (csrc/cpu_ops.h) or the ATen op llama.py calls (linear, add), so the results are the Python path's bit
// for bit.
//
// weights (DecodeWeights, built once): 10 tensors a layer: input norm, post-attention norm, then (a, b)
// for qkv, o, gate_up and down; and 4 kinds a layer, one per linear: 4 = int4pack_mm(x, a = packed codes,
// b = scales and zeros), 8 = int8_mm(x, a = codes, b = row scales), 16 = a dense weight (b unused); float32
// models' GGUF codes: 4xx = q4_matmul(x, a = codes, b = scale_min, xx activation bits), 8xx = q8_matmul(x,
// a = codes, b = scales, xx bits).

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../../csrc/cpu_ops.h"

namespace {

constexpr int64_t kWeightsPerLayer = 10;
constexpr int64_t kLinearsPerLayer = 4;

// Every layer's weights and linear kinds, handed over once when the loop is built: passed as a list on
// every step, their 300 tensors (SmolLM2) cost ~28 us of argument conversion a step.
struct DecodeWeights : torch::CustomClassHolder {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> kinds;
  DecodeWeights(std::vector<at::Tensor> w, std::vector<int64_t> k) : weights(std::move(w)), kinds(std::move(k)) {
    TORCH_CHECK(kinds.size() * kWeightsPerLayer == weights.size() * kLinearsPerLayer,
                "DecodeWeights: ", weights.size(), " weights for ", kinds.size(), " linear kinds");
  }
};

at::Tensor linear(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b) {
  switch (kind) {
    case 4: return duoserve::int4pack_mm(x, a, b);
    case 8: return duoserve::int8_mm(x, a, b);
    case 16: return at::linear(x, a);
    case 416: return duoserve::q4_matmul(x, a, b, 16);
    case 408: return duoserve::q4_matmul(x, a, b, 8);
    case 816: return duoserve::q8_matmul(x, a, b, 16);
    case 808: return duoserve::q8_matmul(x, a, b, 8);
    default: TORCH_CHECK(false, "decode_layers: unknown linear kind ", kind, " (4, 8, 16, 4xx or 8xx)");
  }
}

// x [T, hidden] (the embeddings) -> the last layer's residual stream plus its output, as llama.py's
// LlamaModel._forward returns before the final norm. kv: the KV cache's tensor, [layers, 2 (K, V),
// blocks, block_size, kv_heads, head_dim] (duoserve/kv/cache.py), the step's K and V stored into it.
at::Tensor decode_layers(const at::Tensor& embeddings, const c10::intrusive_ptr<DecodeWeights>& model,
                         const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv, const at::Tensor& slots,
                         const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, double eps,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(kv.dim() == 6 && kv.size(1) == 2, "decode_layers: kv must be the cache's [layers, 2, ...] tensor");
  const int64_t layers = kv.size(0);
  const std::vector<at::Tensor>& weights = model->weights;
  const std::vector<int64_t>& kinds = model->kinds;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kWeightsPerLayer * layers,
              "decode_layers: ", weights.size(), " weights for ", layers, " layers");
  TORCH_CHECK(embeddings.dim() == 2, "decode_layers: embeddings must be [tokens, hidden]");
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor x = embeddings, delta, h;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = weights.data() + kWeightsPerLayer * layer;
    const int64_t* kind = kinds.data() + kLinearsPerLayer * layer;
    if (!delta.defined()) {
      h = duoserve::norm_rows(x.contiguous(), w[0], eps);
    } else {
      std::tie(x, h) = duoserve::add_norm_rows(x.contiguous(), delta.contiguous(), w[0], eps);
    }
    const at::Tensor qkv = linear(h.contiguous(), kind[0], w[2], w[3]);
    const std::vector<at::Tensor> parts = qkv.split_with_sizes({q_size, kv_size, kv_size}, -1);
    at::Tensor q = parts[0].view({-1, num_heads, head_dim});
    at::Tensor k = parts[1].view({-1, num_kv_heads, head_dim});
    const at::Tensor v = parts[2].view({-1, num_kv_heads, head_dim});
    std::tie(q, k) = duoserve::rope_qk(q, k, cos, sin);
    const at::Tensor k_pool = kv.select(0, layer).select(0, 0), v_pool = kv.select(0, layer).select(0, 1);
    duoserve::store_kv(k_pool, v_pool, k, v, slots);
    const at::Tensor attention = duoserve::paged_decode(q.contiguous(), k_pool, v_pool, tables, lens, scale, 0, 0.0,
                                                        std::nullopt, std::nullopt);
    const at::Tensor out = linear(attention.flatten(1).contiguous(), kind[1], w[4], w[5]);
    std::tie(x, h) = duoserve::add_norm_rows(x.contiguous(), out.contiguous(), w[1], eps);
    delta = linear(duoserve::silu_mul(linear(h.contiguous(), kind[2], w[6], w[7])), kind[3], w[8], w[9]);
  }
  return delta.defined() ? x + delta : x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(duoserve_cpu, m) {
  m.class_<DecodeWeights>("DecodeWeights")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>>())
      .def("kinds", [](const c10::intrusive_ptr<DecodeWeights>& self) { return self->kinds; })
      .def("num_weights", [](const c10::intrusive_ptr<DecodeWeights>& self) {
        return static_cast<int64_t>(self->weights.size());
      });
  m.def("decode_layers(Tensor embeddings, __torch__.torch.classes.duoserve_cpu.DecodeWeights weights, "
        "Tensor cos, Tensor sin, "
        "Tensor(a!) kv, Tensor slots, Tensor block_tables, Tensor context_lens, "
        "float scale, float eps, int num_heads, int num_kv_heads, int head_dim) -> Tensor",
        &decode_layers);
}
