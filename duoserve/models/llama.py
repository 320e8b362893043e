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
from duoserve.models.gguf_quants import GGUFTensor
from duoserve.models.linear import (
    QUANTIZED_MAX_ROWS,
    DenseLinear,
    Weight,
    dense_weight,
    make_embedding,
    make_linear,
    quantized_kernels_available,
)


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
        weights: dict[str, Weight],
        attention: AttentionBackend,
        device: torch.device,
        dtype: torch.dtype,
        max_positions: int,
        quantized: dict[str, GGUFTensor] | None = None,
        quantized_max_rows: int = QUANTIZED_MAX_ROWS,
    ) -> None:
        """`weights`: dense tensors, and GGUF-quantized ones as the file stores them (`quantized`, a
        subset). Where fast kernels exist and `quantized` is given, those stay quantized; otherwise each is
        dequantized into `dtype` as its layer is built. Quantized linears run their kernels on steps of up
        to `quantized_max_rows` rows (the host's own threshold: duoserve/hardware.py)."""
        self.config = config
        self.attention = attention
        self.dtype = dtype
        self.scale = config.head_dim**-0.5
        q = _Build(
            dtype, device, bool(quantized) and quantized_kernels_available(device, dtype), quantized_max_rows
        )
        w = {
            n: t if q.quantized and isinstance(t, GGUFTensor) else dense_weight(t, dtype, device)
            for n, t in weights.items()
        }
        self.embed = make_embedding(w["model.embed_tokens.weight"], dtype, device, q.quantized)
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self.lm_head = _linear(w, q, [head])
        self.norm = w["model.norm.weight"]
        self.layers = [_Layer.from_weights(w, q, i, config) for i in range(config.num_hidden_layers)]
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
        x = self.embed(input_ids)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            q, k, v = layer.qkv(h).split(layer.qkv_sizes, dim=-1)
            q = _rope(q.view(-1, cfg.num_attention_heads, cfg.head_dim), cos, sin)
            k = _rope(k.view(-1, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
            v = v.view(-1, cfg.num_key_value_heads, cfg.head_dim)
            attn = self.attention.forward(
                q, k, v, kv_cache.layer(index), meta, self.scale, sliding_window=layer.sliding_window
            )
            x = x + layer.o_proj(attn.flatten(1))
            h = _rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down_proj(F.silu(gate) * up)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given hidden-state rows."""
        h = _rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, then scale in the model's dtype.

    torch's fused rms_norm on bfloat16 input loses too much in its sum of squares: SmolLM2's residual
    stream has outlier channels, and its bfloat16 answers went wrong (greedy "What is the capital of
    France?" gave "L'Etoile, la Marseillaise..." instead of "...Paris.").
    """
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half RoPE: x [T, heads, dim], cos/sin [T, 1, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


Linear = DenseLinear  # or one of its quantized subclasses


@dataclass
class _Layer:
    """One decoder layer's weights, with Q/K/V and gate/up fused into single matmuls."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    qkv_sizes: list[int]
    o_proj: Linear
    gate_up: Linear
    down_proj: Linear
    sliding_window: int | None  # this layer's attention window (Mistral), None = the whole context

    @classmethod
    def from_weights(cls, w: dict[str, Weight], q: _Build, index: int, config: ModelConfig) -> _Layer:
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
            qkv=_linear(w, q, [f"{attn}{n}_proj.weight" for n in "qkv"], bias),
            qkv_sizes=qkv_sizes,
            o_proj=_linear(w, q, [attn + "o_proj.weight"]),
            gate_up=_linear(w, q, [mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
            down_proj=_linear(w, q, [mlp + "down_proj.weight"]),
            sliding_window=config.layer_sliding_window(index),
        )


@dataclass(frozen=True)
class _Build:
    """How linears are built: their dtype and device, and whether quantized weights stay quantized."""

    dtype: torch.dtype
    device: torch.device
    quantized: bool
    max_rows: int  # quantized linears run their kernels on steps of up to this many rows


def _linear(w: dict[str, Weight], q: _Build, names: list[str], bias: torch.Tensor | None = None) -> Linear:
    """One matmul over the named weights stacked along their outputs."""
    return make_linear([w[n] for n in names], bias, q.dtype, q.device, q.quantized, q.max_rows)
