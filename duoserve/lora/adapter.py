"""PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors, read and checked against the model.

An adapter adds `scaling * B @ A` to some of the model's projections (W x + scaling * B A x), with A
[r, in] and B [out, r]; PEFT's scaling is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`
(both per module with `rank_pattern` / `alpha_pattern`). duoserve serves adapters of the attention and
MLP projections (q/k/v/o, gate/up/down) of dense layers; anything else an adapter would change (DoRA,
biases, embeddings, lm_head, `modules_to_save`) is refused when it is loaded, with the reason, rather
than served wrongly.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open

from duoserve.lora.request import LoRARequest
from duoserve.models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Projection -> the fused linear of duoserve's layer it belongs to (llama.py fuses Q/K/V and gate/up).
TARGET_SITES = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "o_proj": "o",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "down_proj": "down",
}
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.\w+)?\.weight$"
)


def target_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection an adapter may target."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int  # the largest rank of its modules
    # (layer, projection) -> (A [r, in], scaling * B [out, r]), float32 on CPU.
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def name(self) -> str:
        return self.request.lora_name


def load_adapter(request: LoRARequest, config: ModelConfig, max_rank: int) -> LoRAAdapter:
    """Read and check a PEFT adapter; ValueError says what does not fit the model or the engine."""
    where = f"LoRA adapter {request.lora_name!r} ({request.lora_path})"
    peft = _read_config(request.lora_path, where)
    tensors = _read_tensors(request.lora_path, where)
    shapes = target_shapes(config)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or match.group(2) not in shapes:
            raise ValueError(
                f"{where}: cannot serve tensor {key!r}: only LoRA A/B weights of the "
                f"{'/'.join(p.removesuffix('_proj') for p in TARGET_SITES)} projections are supported"
            )
        layer, target, half = int(match.group(1)), match.group(2), match.group(3)
        pairs.setdefault((layer, target), {})[half] = tensor
    if not pairs:
        raise ValueError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights")
    weights = {}
    for (layer, target), halves in sorted(pairs.items()):
        _check_module(config, layer, target, where)
        a, b = halves.get("A"), halves.get("B")
        if a is None or b is None:
            raise ValueError(f"{where}: layer {layer} {target} has lora_{'B' if b is None else 'A'} only")
        rank = _check_shapes(a, b, shapes[target], layer, target, max_rank, where)
        block = "self_attn" if TARGET_SITES[target] in ("qkv", "o") else "mlp"
        module = f"model.layers.{layer}.{block}.{target}"
        declared_rank = _pattern(peft.get("rank_pattern") or {}, module, peft["r"])
        if declared_rank != rank:
            raise ValueError(
                f"{where}: layer {layer} {target} has rank {rank}, the config says {declared_rank}"
            )
        alpha = _pattern(peft.get("alpha_pattern") or {}, module, peft["lora_alpha"])
        scaling = alpha / math.sqrt(rank) if peft.get("use_rslora") else alpha / rank
        weights[(layer, target)] = (a.float(), b.float() * scaling)
    return LoRAAdapter(request, max(a.shape[0] for a, _ in weights.values()), weights)


def _read_config(path: str, where: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            peft = json.load(f)
    except FileNotFoundError as err:
        raise ValueError(f"{where}: no {CONFIG_FILE} there") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: cannot read {CONFIG_FILE}: {err}") from err
    if not isinstance(peft, dict):
        raise ValueError(f"{where}: {CONFIG_FILE} is not a JSON object")
    unsupported = {
        "peft_type": peft.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(peft.get("use_dora")),
        "bias": peft.get("bias", "none") != "none",
        "modules_to_save": bool(peft.get("modules_to_save")),
        "fan_in_fan_out": bool(peft.get("fan_in_fan_out")),
    }
    for name, refused in unsupported.items():
        if refused:
            raise ValueError(f"{where}: {name}={peft.get(name)!r} is not supported (plain LoRA only)")
    for name in ("r", "lora_alpha"):
        value = peft.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{where}: {CONFIG_FILE} needs a positive {name!r}, got {value!r}")
    targets = peft.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(TARGET_SITES))
        if unknown:
            raise ValueError(
                f"{where}: target modules {unknown} are not supported; supported: {', '.join(TARGET_SITES)}"
            )
    return peft


def _read_tensors(path: str, where: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{where}: no {WEIGHTS_FILE} there (PEFT safetensors adapters only)")
    try:
        with safe_open(file, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{where}: cannot read {WEIGHTS_FILE}: {err}") from err


def _check_module(config: ModelConfig, layer: int, target: str, where: str) -> None:
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"{where}: layer {layer} does not exist (the model has {config.num_hidden_layers})")
    if config.fused_projections and TARGET_SITES[target] in ("qkv", "gate_up"):
        raise ValueError(f"{where}: {target}: this model's checkpoint fuses its projections (not supported)")
    if TARGET_SITES[target] in ("gate_up", "down") and config.is_moe_layer(layer):
        raise ValueError(f"{where}: layer {layer} has routed experts, not a dense {target}")


def _check_shapes(
    a: torch.Tensor,
    b: torch.Tensor,
    shape: tuple[int, int],
    layer: int,
    target: str,
    max_rank: int,
    where: str,
) -> int:
    in_features, out_features = shape
    rank = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or tuple(b.shape) != (out_features, rank):
        raise ValueError(
            f"{where}: layer {layer} {target}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
            f"fit a [{out_features} x {in_features}] projection "
            f"(expected [r, {in_features}] and [{out_features}, r])"
        )
    if rank > max_rank:
        raise ValueError(f"{where}: rank {rank} is larger than --max-lora-rank {max_rank}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"{where}: layer {layer} {target}: LoRA weights must be floating point")
    return rank


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module rank/alpha: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
