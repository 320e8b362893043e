"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) in plain torch, over a flat token batch.

Every step is one flat batch of tokens from many sequences (no padding, no batch dimension):
positions say where each token sits in its sequence, the attention metadata says which
sequence it belongs to. Projections are fused (QKV, gate+up) so each layer runs few, large
matmuls; RMSNorm, RoPE and SwiGLU follow transformers' math so logits match it in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionBackend, AttentionMetadata
from duoserve.kv.cache import KVCache
from duoserve.models.config import ModelConfig

# Vocabulary columns per lm_head matmul.
_LOGITS_CHUNK = 8192


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim / 2], with Llama-3 or linear scaling (as transformers)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) / factor * scaled + smooth * scaled
    is_medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(is_medium, smoothed, scaled)


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        attention: AttentionBackend,
        device: torch.device,
        dtype: torch.dtype,
        max_positions: int,
    ) -> None:
        self.config = config
        self.attention = attention
        self.dtype = dtype
        self.scale = config.head_dim**-0.5
        w = {name: t.to(device=device, dtype=dtype) for name, t in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        lm_head = self.embed if config.tie_word_embeddings else w.pop("lm_head.weight")
        # Stored [hidden, vocab]: x @ W streams W row by row, which on CPUs runs several times faster
        # than x @ W.T with the [vocab, hidden] layout for a few rows (measured in BENCHMARKS.md).
        self.lm_head_t = lm_head.t().contiguous()
        self.norm = w["model.norm.weight"]
        self.layers = [_Layer.from_weights(w, i, config) for i in range(config.num_hidden_layers)]
        # cos/sin tables for every position, computed in float32 as transformers does.
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(config))
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] before the final norm."""
        cfg = self.config
        self.attention.prepare(meta)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        x = F.embedding(input_ids, self.embed)
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (cfg.hidden_size,), layer.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split(layer.qkv_sizes, dim=-1)
            q = _rope(q.view(-1, cfg.num_attention_heads, cfg.head_dim), cos, sin)
            k = _rope(k.view(-1, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
            v = v.view(-1, cfg.num_key_value_heads, cfg.head_dim)
            attn = self.attention.forward(q, k, v, kv_cache.layer(index), meta, self.scale)
            x = x + F.linear(attn.flatten(1), layer.o_proj)
            h = F.rms_norm(x, (cfg.hidden_size,), layer.post_norm, cfg.rms_norm_eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down_proj)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given hidden-state rows."""
        h = F.rms_norm(hidden, (self.config.hidden_size,), self.norm, self.config.rms_norm_eps)
        # Column chunks keep each matmul's output in cache; one big [rows, vocab] GEMM does not.
        chunks = [
            h @ self.lm_head_t[:, i : i + _LOGITS_CHUNK]
            for i in range(0, self.lm_head_t.shape[1], _LOGITS_CHUNK)
        ]
        return torch.cat(chunks, dim=1).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half RoPE: x [T, heads, dim], cos/sin [T, 1, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    """One decoder layer's weights, with Q/K/V and gate/up fused into single matmuls."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    qkv_sizes: list[int]
    o_proj: torch.Tensor
    gate_up: torch.Tensor
    down_proj: torch.Tensor

    @classmethod
    def from_weights(cls, w: dict[str, torch.Tensor], index: int, config: ModelConfig) -> _Layer:
        p = f"model.layers.{index}."
        attn, mlp = p + "self_attn.", p + "mlp."
        qkv_sizes = [
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        ]
        bias = None
        if config.attention_bias:
            bias = torch.cat([w[f"{attn}{n}_proj.bias"] for n in "qkv"])
        return cls(
            input_norm=w[p + "input_layernorm.weight"],
            post_norm=w[p + "post_attention_layernorm.weight"],
            qkv=torch.cat([w[f"{attn}{n}_proj.weight"] for n in "qkv"]),
            qkv_bias=bias,
            qkv_sizes=qkv_sizes,
            o_proj=w[attn + "o_proj.weight"],
            gate_up=torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]),
            down_proj=w[mlp + "down_proj.weight"],
        )
