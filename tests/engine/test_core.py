"""EngineCore's use of the host's defaults (duoserve/hardware.py) and of the config's overrides, and a
quantized KV cache through every path that computes a prompt."""

from __future__ import annotations

import pytest

from duoserve import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt


def test_config_overrides_reach_the_model_and_the_startup_line(
    smollm2_gguf_path, single_torch_thread, caplog
):
    """--quantized-max-rows (else the host's threshold) is each quantized linear's, and the startup log
    line gives the host's choices and says which the config replaced."""
    caplog.set_level("INFO", logger="duoserve.engine.core")
    llm = LLM(
        dtype="bfloat16",
        device="cpu",
        attention_backend="torch",
        num_kv_blocks=4,
        block_size=16,
        num_threads=1,
        quantized_max_rows=3,
    )
    qkv = llm.engine.core.model.layers[0].qkv
    assert type(qkv).__name__ == "Int4Linear" and qkv.max_rows == 3
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("host: ")]
    assert " -> dtype " in line and "attention kernel " in line
    assert line.endswith("; set by the config: dtype bfloat16, num_threads 1, quantized_max_rows 3")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantized_kv_gives_one_answer_however_the_prompt_is_computed(
    kv_cache_dtype, tiny_models, single_torch_thread
):
    """Chunked prefill, prefix-cache hits and recomputation after preemption all read the same quantized
    K/V as one unchunked run per prompt: the greedy tokens are the same."""
    path = tiny_models("llama_gqa")[1]
    args = dict(model=path, device="cpu", dtype="float32", block_size=4, kv_cache_dtype=kv_cache_dtype)
    shared = random_prompt(18, seed=7)
    prompts = [shared + random_prompt(n, seed=8 + n) for n in (5, 3, 9)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    whole = LLM(**args, num_kv_blocks=128, enable_prefix_caching=False)
    expected = [whole.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]

    # 14 blocks of 4: the three requests (~28-34 tokens each) cannot all stay; chunks of 7 tokens.
    llm = LLM(**args, num_kv_blocks=14, max_num_batched_tokens=7)
    first = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    rest = [o.outputs[0].token_ids for o in llm.generate(prompts[1:], params, use_tqdm=False)]
    core = llm.engine.core
    assert core.kv_cache.data.dtype == core.kv_cache.spec.dtype and core.kv_cache.spec.quantized
    assert core.kv.prefix_cache_hits > 0 and core.scheduler.num_preemptions > 0
    assert [first, *rest] == expected


class _RecordingObserver:
    """A step observer (duoserve/engine/step_observer.py) that keeps what the core tells it."""

    def __init__(self, core) -> None:
        self.core = core
        self.steps: list[tuple[list[tuple[str, int]], float, float]] = []
        self.closed: list[float] = []

    def record(self, plan, start: float, previous_seconds: float) -> None:
        batch = [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]
        self.steps.append((batch, start, previous_seconds))

    def close(self, last_seconds: float) -> None:
        self.closed.append(last_seconds)


def test_the_step_observer_its_caller_built_sees_every_plan(
    tiny_models, single_torch_thread, tmp_path, caplog
):
    """EngineCore calls the observer its caller passed (as `make_connector`): every step's plan before
    it runs, the previous step's time, and the last one's at close. It opens no trace of its own:
    --step-trace without an observer writes nothing (and says so)."""
    from duoserve.config import EngineConfig
    from duoserve.engine.core import EngineCore
    from duoserve.models.loader import load_model

    path = tiny_models("llama_gqa")[1]
    trace = tmp_path / "steps.jsonl"
    config = EngineConfig(
        model=path, device="cpu", dtype="float32", attention_backend="torch", num_kv_blocks=32,
        block_size=8, max_num_batched_tokens=16, num_threads=1, step_trace=str(trace),
    )  # fmt: skip
    loaded = load_model(path, config.resolved_dtype())
    observers = []

    def make_observer(built: EngineCore) -> _RecordingObserver:
        observers.append(_RecordingObserver(built))
        return observers[-1]

    core = EngineCore(config, loaded, make_step_observer=make_observer)
    (observer,) = observers
    assert observer.core is core and core.step_observer is observer
    core.add_request("a", random_prompt(20, seed=1), SamplingParams(max_tokens=3, ignore_eos=True), [2])
    durations = []
    while core.has_unfinished():
        core.step()
        durations.append(core.last_step.total_seconds)
    core.close()
    # 20 prompt tokens in chunks of 16 then 4 (which samples the first token), then two decodes.
    assert [batch for batch, _, _ in observer.steps] == [[("a", 16)], [("a", 4)], [("a", 1)], [("a", 1)]]
    assert [previous for _, _, previous in observer.steps[1:]] == durations[:-1]
    assert observer.closed == [durations[-1]]

    caplog.set_level("WARNING", logger="duoserve.engine.core")
    EngineCore(config, loaded).close()
    assert not trace.exists() and "writes no step trace" in caplog.text
