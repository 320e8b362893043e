"""Top-k routed experts (Qwen3-MoE, Mixtral) over a flat token batch.

The router follows transformers exactly: softmax over all experts in float32, top-k, then (Mixtral
always, Qwen3-MoE with `norm_topk_prob`) renormalise the k weights to sum to 1. The (token, expert)
pairs are then sorted by expert, so each expert runs one matmul over the contiguous slice of rows
routed to it: the Python loop runs over the experts that received tokens, never over tokens.

Experts run dense (in the model dtype), even when a GGUF stores them quantized: they are dequantized
at load. torch's grouped matmul (`F.grouped_mm`) would drop the loop, but on CPU it measured ~75x
slower than per-expert `F.linear` in float32 (8 experts, 40 rows, hidden 256; a busy 2-core machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MoE:
    router: torch.Tensor  # [num_experts, hidden]
    gate_up: torch.Tensor  # [num_experts, 2 * moe_intermediate, hidden]: gate rows, then up rows
    down: torch.Tensor  # [num_experts, hidden, moe_intermediate]
    top_k: int
    renormalize: bool
    act: Callable[[torch.Tensor], torch.Tensor]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype, expert ids [T, k]) as transformers' routers compute them."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        rows = order // self.top_k  # the token of each sorted pair
        counts = torch.bincount(flat, minlength=self.router.shape[0]).tolist()
        inputs = x.index_select(0, rows)
        outputs = torch.empty_like(inputs)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate, up = F.linear(inputs[start:end], self.gate_up[expert]).chunk(2, dim=-1)
            outputs[start:end] = F.linear(self.act(gate) * up, self.down[expert])
            start = end
        outputs *= weights.flatten().index_select(0, order)[:, None]
        return torch.zeros_like(x).index_add_(0, rows, outputs)
