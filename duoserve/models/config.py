"""Model architecture description shared by the loaders and the model code."""

from __future__ import annotations

import dataclasses
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
    # The window of the sliding-window layers (None: no layer slides), and which layers those are:
    # transformers' layer_types ("sliding_attention" / "full_attention"); None = every layer.
    sliding_window: int | None = None
    layer_types: list[str] | None = None

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
        return self.layer_sliding_window(index) is not None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
                )
            if unknown := set(self.layer_types) - set(_LAYER_TYPES):
                raise ValueError(
                    f"unsupported layer_types {sorted(unknown)}; supported: {', '.join(_LAYER_TYPES)}"
                )

    def first_layers(self, num_layers: int) -> ModelConfig:
        """The same model cut to its first `num_layers` layers (a self-speculative draft), with every
        per-layer list cut with it."""
        if not 1 <= num_layers <= self.num_hidden_layers:
            raise ValueError(f"num_layers must be in [1, {self.num_hidden_layers}], got {num_layers}")
        return dataclasses.replace(
            self,
            num_hidden_layers=num_layers,
            layer_types=None if self.layer_types is None else self.layer_types[:num_layers],
            dense_mlp_layers=[i for i in self.dense_mlp_layers if i < num_layers],
        )

    def layer_sliding_window(self, index: int) -> int | None:
        """The window of layer `index`: a query at position p sees keys (p - window, p]; None = all keys."""
        if self.layer_types is not None and self.layer_types[index] != "sliding_attention":
            return None
        return self.sliding_window

    def kv_sliding_window(self) -> int | None:
        """The window every layer has, or None when some layer sees the whole context: only then can
        the KV cache free blocks that slid out of the window (one block table serves all layers)."""
        windows = {self.layer_sliding_window(i) for i in range(self.num_hidden_layers)}
        return None if None in windows else max(windows)


_LAYER_TYPES = ("full_attention", "sliding_attention")

# Model types whose layers all slide when `sliding_window` is set; transformers ignores their
# `layer_types` (Mistral warns about it).
_EVERY_LAYER = ("mistral", "mixtral", "phi3", "qwen3_moe")

# Which layers slide when config.json has no `layer_types`, as transformers' configs derive it.
_DEFAULT_SLIDING_LAYERS = {
    # Qwen2/Qwen3: the layers from max_window_layers on.
    "qwen2": lambda i, cfg: i >= cfg.get("max_window_layers", 28),
    "qwen3": lambda i, cfg: i >= cfg.get("max_window_layers", 28),
    # Gemma 2: even layers slide, odd ones are global.
    "gemma2": lambda i, cfg: (i + 1) % 2 != 0,
    # Gemma 3: every sliding_window_pattern-th layer is global (pattern 6: 5 local, then 1 global).
    "gemma3": lambda i, cfg: (i + 1) % cfg.get("sliding_window_pattern", 6) != 0,
    "gemma3_text": lambda i, cfg: (i + 1) % cfg.get("sliding_window_pattern", 6) != 0,
}

# transformers' default `sliding_window` where config.json has none (Mixtral and Phi-3: None).
_DEFAULT_WINDOW = {
    "mistral": 4096,
    "qwen2": 4096,
    "qwen3": 4096,
    "qwen3_moe": 4096,
    "gemma2": 4096,
    "gemma3": 4096,
    "gemma3_text": 4096,
}

# Model types whose window applies only with use_sliding_window: true (transformers sets it to None
# otherwise).
_GATED_BY_USE_SLIDING_WINDOW = ("qwen2", "qwen3", "qwen3_moe")


def sliding_window_from_hf(cfg: dict, model_type: str) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) of a `config.json` dict, as transformers reads them.

    Mistral, Mixtral, Phi-3: every layer, when `sliding_window` is set. Qwen2/Qwen3: only with
    `use_sliding_window`, then the layers from `max_window_layers` on (Qwen3-MoE: every layer).
    Gemma 2: alternating local/global; Gemma 3: `sliding_window_pattern`. Where transformers reads
    `layer_types` from the file, it wins over these rules. Other model types (Llama) never slide.
    """
    if model_type not in _EVERY_LAYER and model_type not in _DEFAULT_SLIDING_LAYERS:
        return None, None
    if model_type.startswith("gemma3") and cfg.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 with use_bidirectional_attention (an embedding model) is not supported")
    window = cfg.get("sliding_window", _DEFAULT_WINDOW.get(model_type))
    if model_type in _GATED_BY_USE_SLIDING_WINDOW and not cfg.get("use_sliding_window", False):
        window = None
    if window is None or model_type in _EVERY_LAYER:
        return (None if window is None else int(window)), None
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        rule = _DEFAULT_SLIDING_LAYERS[model_type]
        layer_types = [
            "sliding_attention" if rule(i, cfg) else "full_attention" for i in range(cfg["num_hidden_layers"])
        ]
    if "sliding_attention" not in layer_types:
        return None, None
    return int(window), list(layer_types)
