"""PEFT adapters read against the model: what loads, and the clear errors for what does not fit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from duoserve.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from duoserve.lora.request import LoRARequest, prefix_root_hash
from duoserve.models.loader import config_from_hf
from tests.lora.adapters import ALL_TARGETS, peft_adapter

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tiny_models):
    hf, _ = tiny_models("llama_gqa")
    return hf, config_from_hf(hf.config.to_dict())


@pytest.fixture(scope="module")
def adapter_dir(base, tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapter")
    peft_adapter(base[0], directory, ALL_TARGETS, r=4, alpha=8, seed=1)
    return directory


def _load(directory, config, max_rank: int = 16):
    return load_adapter(LoRARequest("a", 1, str(directory)), config, max_rank)


def test_peft_adapter_loads_with_its_scaling(base, adapter_dir):
    hf, config = base
    adapter = _load(adapter_dir, config)
    assert adapter.rank == 4 and len(adapter.weights) == 7 * config.num_hidden_layers
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = adapter.weights[(1, "down_proj")]
    assert torch.equal(a, tensors[f"{prefix}.lora_A.weight"])
    assert torch.allclose(b, tensors[f"{prefix}.lora_B.weight"] * 8 / 4)


def test_rslora_scales_by_alpha_over_sqrt_rank(base, tmp_path):
    hf, config = base
    peft_adapter(hf, tmp_path, ["q_proj"], r=4, alpha=8, seed=2, use_rslora=True)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    _, b = _load(tmp_path, config).weights[(0, "q_proj")]
    expected = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] * 8 / math.sqrt(4)
    assert torch.allclose(b, expected)


def test_rank_above_max_lora_rank_is_refused(base, adapter_dir):
    with pytest.raises(ValueError, match="rank 4 is larger than --max-lora-rank 2"):
        _load(adapter_dir, base[1], max_rank=2)


def test_adapter_of_another_shape_is_refused(base, adapter_dir, tmp_path):
    _, config = base
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])  # another model's k_proj
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    (tmp_path / CONFIG_FILE).write_text((adapter_dir / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match=r"layer 0 k_proj: lora_A \(4, 48\) and lora_B \(25, 4\) do not fit"):
        _load(tmp_path, config)


def test_rank_that_disagrees_with_the_config_is_refused(base, adapter_dir, tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes((adapter_dir / WEIGHTS_FILE).read_bytes())
    peft = json.loads((adapter_dir / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**peft, "r": 8}))
    with pytest.raises(ValueError, match="has rank 4, the config says 8"):
        _load(tmp_path, base[1])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, r"target modules \['lm_head'\] are not supported"),
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 0}, "needs a positive 'r'"),
    ],
)
def test_unsupported_configs_are_refused(base, adapter_dir, tmp_path, change, message):
    (tmp_path / WEIGHTS_FILE).write_bytes((adapter_dir / WEIGHTS_FILE).read_bytes())
    peft = json.loads((adapter_dir / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**peft, **change}))
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, base[1])


def test_tensors_of_other_modules_are_refused(base, adapter_dir, tmp_path):
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 48)
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    (tmp_path / CONFIG_FILE).write_text((adapter_dir / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="cannot serve tensor 'base_model.model.lm_head.lora_A.weight'"):
        _load(tmp_path, base[1])


def test_missing_or_damaged_files_are_refused(base, adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json there"):
        _load(tmp_path / "nowhere", base[1])
    (tmp_path / CONFIG_FILE).write_text((adapter_dir / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="no adapter_model.safetensors there"):
        _load(tmp_path, base[1])
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read adapter_model.safetensors"):
        _load(tmp_path, base[1])


def test_lora_request_is_checked_and_keys_the_prefix_cache_by_name_and_path():
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")
    roots = {
        prefix_root_hash(None, 0),
        prefix_root_hash(LoRARequest("a", 1, "/x"), 0),
        prefix_root_hash(LoRARequest("b", 1, "/x"), 0),
        prefix_root_hash(LoRARequest("a", 1, "/y"), 0),
    }
    assert len(roots) == 4 and prefix_root_hash(None, 0) == 0
    # The id does not matter (a router and its workers may number adapters differently).
    assert prefix_root_hash(LoRARequest("a", 1, "/x"), 0) == prefix_root_hash(LoRARequest("a", 7, "/x"), 0)
