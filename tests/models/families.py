"""Tiny random transformers models of every supported family beyond Llama, and a GGUF writer that
follows llama.cpp's converter (tensor names from `gguf`'s own name map, Gemma's 1 + w norms, stacked
experts, Phi-3's LongRoPE factor tensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.helpers import BOS, EOS, TINY_VOCAB, word

HIDDEN = 64
LONGROPE_ORIGINAL = 32  # Phi-3's pretraining context in the tiny model: prompts cross it


def _common(**overrides) -> dict:
    return dict(
        vocab_size=TINY_VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        **overrides,
    )


def family_config(kind: str):
    """Each family with its distinctive options off their defaults, so a missed one shows."""
    import transformers

    if kind == "qwen3":  # head_dim 24 != hidden / heads
        return transformers.Qwen3Config(**_common(head_dim=24, rope_theta=1e6))
    if kind == "qwen3_yarn":  # Qwen3's long-context recipe, scaled down
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}
        return transformers.Qwen3Config(**_common(head_dim=16, rope_parameters=yarn))
    if kind == "qwen3_moe":  # layer 1 dense (mlp_only_layers), top-2 of 4 unnormalised
        return transformers.Qwen3MoeConfig(
            **_common(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])
        )
    if kind == "qwen3_moe_norm":  # every layer routed, normalised top-3
        return transformers.Qwen3MoeConfig(
            **_common(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=True)
        )
    if kind == "mixtral":
        return transformers.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2))
    if kind == "gemma2":  # layer 0 slides over 5 tokens; both soft-caps on
        return transformers.Gemma2Config(
            **_common(
                head_dim=16,
                query_pre_attn_scalar=20,
                sliding_window=5,
                attn_logit_softcapping=8.0,
                final_logit_softcapping=10.0,
            )
        )
    if kind == "gemma3":  # layer 0 slides with its own RoPE base, layer 1 is global with linear scaling
        return transformers.Gemma3TextConfig(
            **_common(
                head_dim=16,
                query_pre_attn_scalar=24,
                sliding_window=5,
                layer_types=["sliding_attention", "full_attention"],
                final_logit_softcapping=10.0,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                },
            )
        )
    if kind == "phi3":  # LongRoPE over 12 of 16 dims per head
        rotary_half = int(HIDDEN // 4 * 0.75) // 2
        scaling = dict(
            rope_type="longrope",
            short_factor=[1.0 + 0.1 * i for i in range(rotary_half)],
            long_factor=[2.0 + 0.5 * i for i in range(rotary_half)],
            partial_rotary_factor=0.75,
        )
        return transformers.Phi3Config(
            **_common(rope_scaling=scaling, original_max_position_embeddings=LONGROPE_ORIGINAL)
        )
    raise AssertionError(kind)


FAMILIES = ("qwen3", "qwen3_yarn", "qwen3_moe", "qwen3_moe_norm", "mixtral", "gemma2", "gemma3", "phi3")


def family_model(kind: str, seed: int = 0):
    """A random fp32 model, weights drawn as tests.helpers.tiny_hf_model draws them (wide, so greedy
    choices have margins); Gemma's embeddings narrower, since the model scales them by sqrt(hidden)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(family_config(kind), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                std = 0.05 if kind.startswith("gemma") and "embed" in name else 0.3
                param.copy_(std * torch.randn(param.shape, generator=generator))
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# GGUF, as llama.cpp's convert_hf_to_gguf.py writes these families

GGUF_ARCH = {
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "qwen3_moe_norm": "qwen3moe",
    "mixtral": "llama",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "phi3": "phi3",
}


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (Q/K rows of the llama architecture)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_family_gguf(path: Path, kind: str, model, qtype=None) -> Path:
    """`model` as a GGUF file; `qtype` (e.g. Q8_0) for the 2-D matrices whose rows allow it."""
    import gguf

    arch = GGUF_ARCH[kind]
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    # The tests' word vocabulary as a byte-level BPE without merges (prompts are given as ids).
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([word(i) for i in range(cfg.vocab_size)])
    w.add_token_types([3 if i < 3 else 1 for i in range(cfg.vocab_size)])
    w.add_token_merges([])
    tensors = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        del tensors["lm_head.weight"]
    if kind.startswith("qwen3_moe") or kind == "mixtral":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if kind.startswith("qwen3_moe"):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if kind.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
        w.add_attention_scale(cfg.query_pre_attn_scalar**-0.5)
        if cfg.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if kind == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        else:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
            w.add_rope_freq_base_swa(cfg.rope_parameters["sliding_attention"]["rope_theta"])
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
    if kind == "phi3":
        scaling = cfg.rope_parameters
        w.add_rope_dimension_count(int(head_dim * scaling["partial_rotary_factor"]))
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        factor = cfg.max_position_embeddings / scaling["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(factor) / np.log(LONGROPE_ORIGINAL))))
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], np.float32))
    else:
        w.add_rope_dimension_count(head_dim)
    for hf_name, tensor in tensors.items():
        array = tensor.numpy()
        if hf_name.endswith("experts.gate_up_proj"):
            gate, up = np.split(array, 2, axis=1)
            prefix = names.get_name(hf_name.replace("experts.gate_up_proj", "experts.down_proj"))
            for part, values in (("gate", gate), ("up", up)):
                w.add_tensor(prefix.replace("down", part) + ".weight", np.ascontiguousarray(values))
            continue
        base, suffix = (hf_name, ".weight") if hf_name.endswith("_proj") else hf_name.rsplit(".", 1)
        suffix = suffix if suffix.startswith(".") else "." + suffix
        name = names.get_name(base) + suffix
        if kind.startswith("gemma") and hf_name.endswith("norm.weight"):
            array = array + 1
        if arch == "llama" and ".q_proj." in hf_name:
            array = _permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            array = _permute(array, cfg.num_key_value_heads)
        if qtype is not None and array.ndim == 2 and array.shape[1] % 32 == 0 and "embd" not in name:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------------
# A tiny random Llama written straight as GGUF blocks of chosen types (no transformers model behind it)

LLAMA_HIDDEN, LLAMA_FFN, LLAMA_HEADS, LLAMA_KV_HEADS, LLAMA_VOCAB, LLAMA_LAYERS = 256, 512, 4, 2, 320, 2


def _llama_shape(name: str) -> tuple[int, int]:
    head_dim = LLAMA_HIDDEN // LLAMA_HEADS
    kv_rows = LLAMA_KV_HEADS * head_dim
    rows = {"attn_k": kv_rows, "attn_v": kv_rows, "ffn_gate": LLAMA_FFN, "ffn_up": LLAMA_FFN}
    part = name.split(".")[-2]
    if name == "token_embd.weight" or name == "output.weight":
        return LLAMA_VOCAB, LLAMA_HIDDEN
    return rows.get(part, LLAMA_HIDDEN), LLAMA_FFN if part == "ffn_down" else LLAMA_HIDDEN


def write_llama_gguf(path: Path, types: dict[str, str]) -> Path:
    """A LLAMA_LAYERS-layer Llama whose matrices are random blocks of `types` (GGUF tensor name -> block
    type, e.g. "blk.0.attn_q.weight": "Q4_K"), its norms random around 1."""
    import gguf

    from duoserve.models.gguf_quants import random_blocks

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LLAMA_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(LLAMA_HIDDEN)
    writer.add_feed_forward_length(LLAMA_FFN)
    writer.add_head_count(LLAMA_HEADS)
    writer.add_head_count_kv(LLAMA_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(LLAMA_VOCAB)
    generator = torch.Generator().manual_seed(0)
    for name, type_name in types.items():
        qtype = gguf.GGMLQuantizationType[type_name]
        raw = random_blocks(type_name, *_llama_shape(name), generator, scale=0.05)
        writer.add_tensor(name, raw.numpy(), raw_dtype=qtype)
    norms = ["output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(LLAMA_LAYERS) for n in ("attn_norm", "ffn_norm")
    ]
    for name in norms:
        writer.add_tensor(name, (1 + 0.1 * torch.randn(LLAMA_HIDDEN, generator=generator)).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
