"""Model architecture description shared by the loaders and the model code."""

from __future__ import annotations

from dataclasses import dataclass, field

# Architectures (HF `model_type` names) whose weights map onto duoserve.models.llama.LlamaModel.
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "gemma3_text",
    "phi3",
)
# MLP activations: SwiGLU (silu) and Gemma's GeGLU (GELU, tanh approximation).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")

SLIDING_ATTENTION = "sliding_attention"  # transformers' `layer_types` value for windowed layers


def rope_type(scaling: dict | None) -> str:
    """The HF rope type of a rope_scaling dict ('su' is LongRoPE's old name in Phi-3 configs)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    return "longrope" if kind == "su" else kind


def check_rope_scaling(scaling: dict | None) -> None:
    if (kind := rope_type(scaling)) not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


@dataclass
class ModelConfig:
    """Decoder-only transformer hyper-parameters (HF `config.json` names where one exists).

    One decoder covers every family; the fields below the Llama ones say which per-family pieces a
    layer has (norm kind, q/k norms, sandwich norms, MLP kind, scales, caps, windows).
    """

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope_scaling dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Qwen2 puts a bias on q/k/v projections; Llama/Mistral do not.
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    # --- per-family pieces -------------------------------------------------------------------------
    hidden_act: str = "silu"  # one of SUPPORTED_ACTIVATIONS
    # RoPE rotates the first head_dim * partial_rotary_factor dims of each head (Phi-4-mini: 0.75).
    partial_rotary_factor: float = 1.0
    # Gemma: RMSNorm scales by (1 + weight), computed in float32 (weights are stored as HF has them).
    norm_plus_one: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMSNorm over each head of q and k, before RoPE
    # Gemma 2/3: the attention output is normed before the residual add, and the MLP sits between
    # pre_feedforward_layernorm and post_feedforward_layernorm.
    sandwich_norms: bool = False
    fused_projections: bool = False  # Phi-3 checkpoints store qkv_proj and gate_up_proj fused
    embedding_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size), in the model dtype
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default: head_dim)
    attn_logit_softcapping: float | None = None  # Gemma 2: cap * tanh(scores / cap) before softmax
    final_logit_softcapping: float | None = None  # Gemma 2/3: the same on the output logits
    # Attention windows: a sliding layer's query i sees keys j with i - j < sliding_window
    # (transformers' semantics). layer_types names each layer's kind; None means every layer slides
    # when sliding_window is set (Mistral, Phi-3).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (unscaled)

    # --- mixture of experts (Qwen3-MoE, Mixtral) ---------------------------------------------------
    num_experts: int = 0  # 0: every layer has a dense MLP
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    dense_mlp_layers: list[int] = field(default_factory=list)  # layers of an MoE model with a dense MLP

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts > 0 and index not in self.dense_mlp_layers

    def is_sliding_layer(self, index: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[index] == SLIDING_ATTENTION

    def layer_sliding_window(self, index: int) -> int | None:
        """The attention window of layer `index` in tokens; None for full attention."""
        return self.sliding_window if self.is_sliding_layer(index) else None
