"""`duoserve plan profile` on a tiny random model: a valid profile, quickly, that reads back."""

from __future__ import annotations

import json
import os

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
    assert profile.fit["num_samples"] + profile.fit["num_dropped"] == len(profile.samples) >= 10
    assert profile.step_model.seconds(StepShape(decode_seqs=1, decode_context=16)) > 0
    assert profile.limits.num_kv_blocks == 64 and profile.limits.max_model_len == 256
    assert profile.kv_transfer.seconds(64) > 0
    assert profile.engine_args["model"] == path and profile.host["torch"]
    file = tmp_path / "profile.json"
    write_profile(str(file), profile)
    again = load_profile(str(file))
    assert again.step_model == profile.step_model and again.limits == profile.limits


def _grid_shapes() -> list[StepShape]:
    """Steps on both sides of a 32-row quantized threshold, as `plan profile` measures them."""
    return [
        StepShape(p, d, d * c, p * (c + p / 2) / 1000, tiled=int(p + d > 32))
        for p in (0, 16, 256)
        for d in (0, 1, 8, 32)
        for c in (64, 1024)
        if p or d
    ]


TRUE_MODEL = StepModel(0.004, 6e-3, 4e-3, 1e-6, 5e-5, 0.1)


def test_the_fit_recovers_a_linear_model():
    shapes = _grid_shapes()
    fit = fit_step_model(shapes, [TRUE_MODEL.seconds(s) for s in shapes])
    for name, value in TRUE_MODEL.to_json().items():
        assert getattr(fit.model, name) == pytest.approx(value, rel=1e-6, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0) and fit.num_dropped == 0


def test_steps_slowed_by_noise_are_dropped_from_the_fit():
    """On a shared machine a few steps run several times slower; they must not move the model."""
    shapes = _grid_shapes() * 2
    seconds = [TRUE_MODEL.seconds(s) * (1 + 0.02 * (i % 3 - 1)) for i, s in enumerate(shapes)]
    slowed = range(3, len(shapes), 9)
    for i in slowed:
        seconds[i] *= 3.0
    fit = fit_step_model(shapes, seconds)
    assert fit.num_dropped == len(slowed)
    small_decode = StepShape(decode_seqs=1, decode_context=64)
    assert fit.model.seconds(small_decode) == pytest.approx(TRUE_MODEL.seconds(small_decode), rel=0.03)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("{not json", "is not JSON"),
        (json.dumps({"summary": {}}), "not a duoserve plan profile"),
        (json.dumps([1, 2]), "not a duoserve plan profile"),
        (json.dumps({"kind": "duoserve-plan-profile", "version": 2, "limits": {}}), "malformed"),
        (json.dumps({"kind": "duoserve-plan-profile", "version": 0, "limits": {}}), "version 0"),
    ],
)
def test_bad_profiles_are_clear_errors(tmp_path, content, message):
    file = tmp_path / "p.json"
    file.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_profile(str(file))


LIMITS = {
    "num_kv_blocks": 8,
    "block_size": 16,
    "max_model_len": 128,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 4,
}


def test_a_profile_without_a_step_model_is_refused():
    data = {"kind": "duoserve-plan-profile", "version": 2, "limits": LIMITS, "step_model": {"intercept": -1}}
    with pytest.raises(ValueError, match="step model"):
        Profile.from_json(data)


def test_a_version_1_profile_is_refitted_from_its_measured_steps():
    """Version 1 stored the same StepShape fields per step; only the model's features changed."""
    shapes = _grid_shapes()
    samples = [[*s.values(), TRUE_MODEL.seconds(s)] for s in shapes]
    old_model = {"intercept": 0.1, "prefill_tokens": 1e-3, "decode_seqs": 1e-3}
    data = {"kind": "duoserve-plan-profile", "version": 1, "limits": LIMITS, "step_model": old_model}
    profile = Profile.from_json(data | {"samples": samples})
    assert profile.step_model.tiled_rows == pytest.approx(TRUE_MODEL.tiled_rows, rel=1e-6)
    assert profile.fit["num_samples"] == len(shapes)
    with pytest.raises(ValueError, match="version 1"):
        Profile.from_json(data)  # nothing to refit from


def test_plan_profile_runs_in_the_engine_processs_environment(tiny_models, tmp_path, monkeypatch, capsys):
    """The served engine's OpenMP threads sleep when they wait (engine_env): so do the profiled ones,
    in a process started as the server starts its engine."""
    from duoserve.cli import main
    from duoserve.engine.engine_env import WAIT_VARS

    for name in WAIT_VARS:
        monkeypatch.delenv(name, raising=False)
    _, path = tiny_models("llama_gqa")
    out = tmp_path / "profile.json"
    engine = ["--device", "cpu", "--dtype", "float32", "--attention-backend", "torch", "--num-threads", "1"]
    engine += ["--num-kv-blocks", "32", "--block-size", "8", "--max-num-batched-tokens", "32"]
    grid = [
        "--decode-batches",
        "1,2",
        "--context-lens",
        "16",
        "--prefill-lens",
        "8",
        "--chunked-prompt-len",
        "40",
    ]
    grid += ["--transfer-tokens", "8,16", "--repeats", "1"]
    assert main(["plan", "profile", path, *engine, *grid, "-o", str(out)]) == 0
    assert load_profile(str(out)).host["openmp_wait"] == {"GOMP_SPINCOUNT": "3000"}
    assert "wrote" in capsys.readouterr().out
    assert "GOMP_SPINCOUNT" not in os.environ  # set only while the profiling process started


def test_the_fit_separates_the_lm_heads_rows_and_the_front_ends_streaming():
    """Served steps stream the previous step's tokens (streamed), in-process ones none; only sampling
    rows go through the LM head. A grid of both recovers every coefficient."""
    model = StepModel(0.005, 5e-4, 3.7e-4, 2e-7, 6e-4, 0.02, sampled_rows=1e-4, streamed=3e-4)
    shapes = [
        StepShape(p, d, d * c, p * (c + p / 2) / 1000, int(p + d > 32), d + int(p > 0 and last), streamed)
        for p in (0, 16, 256)
        for d in (0, 1, 8, 32)
        for c in (64, 1024)
        for last in (False, True)
        for streamed in {0, d}
        if p or d
    ]
    fit = fit_step_model(shapes, [model.seconds(s) for s in shapes])
    for name, value in model.to_json().items():
        assert getattr(fit.model, name) == pytest.approx(value, rel=1e-6, abs=1e-12)


def test_a_step_model_from_before_the_lm_head_and_streaming_terms_reads_as_zero_for_them():
    old = {"intercept": 0.01, "kernel_rows": 1e-3, "tiled_rows": 1e-3, "decode_context": 0.0}
    old |= {"prefill_attention": 0.0, "tiled": 0.0}
    model = StepModel.from_json(old)
    assert model.sampled_rows == model.streamed == 0.0
    assert model.seconds(StepShape(decode_seqs=2, sampled=2, streamed=2)) == pytest.approx(0.012)
