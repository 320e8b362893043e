"""`duoserve plan profile` on a tiny random model: a valid profile, quickly, that reads back."""

from __future__ import annotations

import json

import pytest

from duoserve.config import EngineConfig
from duoserve.plan.profile import Grid, Profile, load_profile, run_profile, write_profile
from duoserve.plan.step_model import StepModel, StepShape, fit_step_model

TINY_GRID = Grid(
    decode_batches=(1, 4),
    context_lens=(16, 64),
    prefill_lens=(8, 32),
    chunked_prompt_len=150,
    decode_steps=2,
    transfer_tokens=(16, 64),
    repeats=1,
)


def test_profile_of_a_tiny_model(tiny_models, single_torch_thread, tmp_path):
    _, path = tiny_models("llama_gqa")
    config = EngineConfig(
        model=path,
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        num_kv_blocks=64,
        block_size=8,
        max_num_batched_tokens=48,
        max_num_seqs=8,
        num_threads=1,
    )
    profile = run_profile(config, TINY_GRID)
    shapes = [StepShape(*s[:-1]) for s in profile.samples]
    # The grid's shapes were measured: pure decodes, decodes with a prompt, chunks over earlier chunks.
    assert any(s.decode_seqs == 4 and s.prefill_tokens == 0 for s in shapes)
    assert any(s.decode_seqs == 4 and s.prefill_tokens == 32 for s in shapes)
    assert any(s.prefill_tokens == 48 and s.prefill_attention > 48 * 48 / 1000 for s in shapes)
    assert profile.fit["num_samples"] == len(profile.samples) >= 10
    assert profile.step_model.seconds(StepShape(decode_seqs=1, decode_context=16)) > 0
    assert profile.limits.num_kv_blocks == 64 and profile.limits.max_model_len == 256
    assert profile.kv_transfer.seconds(64) > 0
    assert profile.engine_args["model"] == path and profile.host["torch"]
    file = tmp_path / "profile.json"
    write_profile(str(file), profile)
    again = load_profile(str(file))
    assert again.step_model == profile.step_model and again.limits == profile.limits


def test_the_fit_recovers_a_linear_model():
    true = StepModel(0.004, 2e-5, 3e-4, 1e-6, 5e-5)
    shapes = [
        StepShape(p, d, d * c, p * (c + p / 2) / 1000)
        for p in (0, 16, 256)
        for d in (0, 1, 8, 32)
        for c in (64, 1024)
        if p or d
    ]
    fit = fit_step_model(shapes, [true.seconds(s) for s in shapes])
    for name, value in true.to_json().items():
        assert getattr(fit.model, name) == pytest.approx(value, rel=1e-6, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("{not json", "is not JSON"),
        (json.dumps({"summary": {}}), "not a duoserve plan profile"),
        (json.dumps([1, 2]), "not a duoserve plan profile"),
        (json.dumps({"kind": "duoserve-plan-profile", "version": 1, "limits": {}}), "malformed"),
    ],
)
def test_bad_profiles_are_clear_errors(tmp_path, content, message):
    file = tmp_path / "p.json"
    file.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_profile(str(file))


def test_a_profile_without_a_step_model_is_refused():
    data = {
        "kind": "duoserve-plan-profile",
        "version": 1,
        "limits": {
            "num_kv_blocks": 8,
            "block_size": 16,
            "max_model_len": 128,
            "max_num_batched_tokens": 64,
            "max_num_seqs": 4,
        },
        "step_model": {"intercept": -1},
    }
    with pytest.raises(ValueError, match="step model"):
        Profile.from_json(data)
