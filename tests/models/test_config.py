"""Each layer's sliding window, read from config.json as transformers reads it: checked against
transformers' own config classes (their `sliding_window` and `layer_types` after __post_init__)."""

from __future__ import annotations

import pytest

from duoserve.models.config import ModelConfig, sliding_window_from_hf
from duoserve.models.loader import config_from_hf

transformers = pytest.importorskip("transformers")

SIZES = dict(
    vocab_size=300, hidden_size=48, intermediate_size=100, num_attention_heads=6, num_key_value_heads=3
)


def _expected(config) -> list[int | None]:
    """transformers' window per layer: every layer for Mistral-like models, else by layer_types."""
    types = getattr(config, "layer_types", None)
    if config.model_type in ("mistral", "mixtral", "phi3", "qwen3_moe") or types is None:
        return [config.sliding_window] * config.num_hidden_layers
    return [config.sliding_window if t == "sliding_attention" else None for t in types]


def _windows(cfg: dict) -> list[int | None]:
    config = config_from_hf({**cfg, "architectures": None})
    return [config.layer_sliding_window(i) for i in range(config.num_hidden_layers)]


CASES = [
    ("MistralConfig", dict(sliding_window=20)),
    ("MistralConfig", dict(sliding_window=None)),
    ("MistralConfig", {}),  # transformers' default window, 4096
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    ("Qwen2Config", dict(use_sliding_window=False, sliding_window=8)),  # the window is off
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=28)),  # no layer slides
    ("Qwen3Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("Gemma2Config", dict(sliding_window=16)),
    ("Gemma3TextConfig", dict(sliding_window=16, sliding_window_pattern=3)),
    ("Gemma3TextConfig", dict(sliding_window=16)),  # pattern 6
    ("MixtralConfig", dict(sliding_window=12)),
    ("Phi3Config", dict(sliding_window=2047)),
]


@pytest.mark.parametrize(("name", "overrides"), CASES)
@pytest.mark.parametrize("with_layer_types", [True, False])
def test_layer_windows_follow_transformers(name: str, overrides: dict, with_layer_types: bool) -> None:
    """As transformers writes config.json (with layer_types), and as older published checkpoints have it
    (without: derived from max_window_layers, Gemma 2's alternation, Gemma 3's sliding_window_pattern)."""
    config = getattr(transformers, name)(num_hidden_layers=7, **SIZES, **overrides)
    cfg = config.to_dict()
    if not with_layer_types:
        cfg.pop("layer_types", None)
        cfg.update({k: v for k, v in overrides.items() if k == "sliding_window_pattern"})
    if "sliding_window" not in overrides:
        cfg.pop("sliding_window", None)  # a file without the key gets transformers' default
    window, layer_types = sliding_window_from_hf(cfg, cfg["model_type"])
    layers = ModelConfig("llama", 300, 48, 100, 7, 6, 3, 8, sliding_window=window, layer_types=layer_types)
    assert [layers.layer_sliding_window(i) for i in range(7)] == _expected(config)


def test_llama_never_slides() -> None:
    cfg = transformers.LlamaConfig(num_hidden_layers=2, **SIZES).to_dict()
    assert sliding_window_from_hf({**cfg, "sliding_window": 16}, "llama") == (None, None)


def test_config_from_hf_and_the_kv_window() -> None:
    """Mistral: every layer slides, so the KV cache may free blocks; Qwen2 with a full layer: it may not."""
    mistral = transformers.MistralConfig(num_hidden_layers=3, sliding_window=20, **SIZES).to_dict()
    assert _windows(mistral) == [20, 20, 20]
    assert config_from_hf(mistral).kv_sliding_window() == 20
    qwen2 = transformers.Qwen2Config(
        num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1, **SIZES
    ).to_dict()
    assert _windows(qwen2) == [None, 8, 8]
    assert config_from_hf(qwen2).kv_sliding_window() is None
    plain = transformers.LlamaConfig(num_hidden_layers=2, **SIZES).to_dict()
    assert _windows(plain) == [None, None] and config_from_hf(plain).kv_sliding_window() is None


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig("mistral", 300, 48, 100, 2, 6, 3, 8, sliding_window=0)
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig("mistral", 300, 48, 100, 2, 6, 3, 8, sliding_window=4, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="chunked_attention"):
        ModelConfig("mistral", 300, 48, 100, 1, 6, 3, 8, sliding_window=4, layer_types=["chunked_attention"])


def test_first_layers_cuts_every_per_layer_list() -> None:
    """A self-speculative draft keeps the first layers: their types and dense-MLP indices go with them."""
    config = ModelConfig(
        architecture="qwen3_moe",
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        dense_mlp_layers=[1, 3],
        **{k: v for k, v in SIZES.items() if k not in ("num_attention_heads", "num_key_value_heads")},
    )
    draft = config.first_layers(3)
    assert draft.num_hidden_layers == 3
    assert draft.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert draft.dense_mlp_layers == [1]
    assert [draft.layer_sliding_window(i) for i in range(3)] == [16, None, 16]
    assert config.num_hidden_layers == 4 and len(config.layer_types) == 4  # the target's is untouched
    for bad in (0, 5):
        with pytest.raises(ValueError, match="num_layers"):
            config.first_layers(bad)
