"""LoRA end to end through LLM.generate, against transformers + peft in float32: batches that mix the
base model and two adapters, prefilled in chunks; adapters per batch (max_loras); the prefix cache
keyed by adapter."""

from __future__ import annotations

import pytest

from duoserve.llm import LLM
from duoserve.lora.request import LoRARequest
from duoserve.sampling_params import SamplingParams
from tests.helpers import EngineRecorder, hf_greedy, hf_logits, random_prompt, rel_err
from tests.lora.adapters import ALL_TARGETS, peft_adapter

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = 1e-4  # float32: the sums run in another order than peft's, nothing else differs
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """The base model, and two adapters (all projections at rank 4; three of them at rank 8 with
    rsLoRA) with their peft references."""
    hf, path = tiny_models("llama_gqa")
    root = tmp_path_factory.mktemp("adapters")
    peft_a = peft_adapter(hf, root / "a", ALL_TARGETS, r=4, alpha=8, seed=1)
    peft_b = peft_adapter(
        hf, root / "b", ["q_proj", "v_proj", "down_proj"], r=8, alpha=16, seed=2, use_rslora=True
    )
    loras = {"a": LoRARequest("a", 1, str(root / "a")), "b": LoRARequest("b", 2, str(root / "b"))}
    references = {None: hf, "a": peft_a, "b": peft_b}
    return path, loras, references


def make_llm(path: str, **engine_args) -> LLM:
    args = dict(num_kv_blocks=96, block_size=4, dtype="float32", device="cpu", enable_lora=True, max_loras=2)
    return LLM(model=path, **{**args, "max_lora_rank": 8, **engine_args})


def greedy(llm: LLM, prompts, loras):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return llm.generate(prompts, params, use_tqdm=False, lora_request=loras)


def _name(request) -> str | None:
    return None if request.lora is None else request.lora.name


def test_mixed_batch_of_base_and_two_adapters_with_chunked_prefill_matches_peft(setup):
    path, loras, references = setup
    # A small token budget: prompts are prefilled in chunks, beside other requests' decodes.
    llm = make_llm(path, max_num_batched_tokens=16)
    recorder = EngineRecorder(llm.engine.core)
    prompts = [random_prompt(11 + i, seed=i) for i in range(5)]
    names = [None, "a", "b", "a", None]
    outputs = greedy(llm, prompts, [None if n is None else loras[n] for n in names])

    # Every computed position's logits equal the request's own model's (peft with its adapter).
    for request_id, request in recorder.requests.items():
        reference = hf_logits(references[_name(request)], request.all_token_ids)
        for position in recorder.positions_of(request_id):
            for ours in recorder.logits[(request_id, position)]:
                assert rel_err(ours, reference[position]) < TOLERANCE, (_name(request), position)
    # The same greedy tokens as peft's generate, and the adapters did change them.
    for prompt, name, output in zip(prompts, names, outputs, strict=True):
        model = references[name].get_base_model() if name else references[name]
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, MAX_TOKENS), name
    assert len({tuple(o.outputs[0].token_ids) for o in outputs[:3]}) == 3
    # The batches did mix: a step held base and both adapters' tokens, and some prompt took several chunks.
    adapters_per_step = [
        {_name(recorder.requests[rid]) for rid, _, _ in step.chunks} for step in recorder.steps
    ]
    assert any(names_in_step == {None, "a", "b"} for names_in_step in adapters_per_step)
    assert any(start > 0 and length > 1 for step in recorder.steps for _, start, length in step.chunks)


def test_max_loras_bounds_the_adapters_of_every_step(setup):
    path, loras, references = setup
    llm = make_llm(path, max_loras=1)
    recorder = EngineRecorder(llm.engine.core)
    prompts = [random_prompt(9, seed=10 + i) for i in range(4)]
    names = ["a", "b", None, "b"]
    outputs = greedy(llm, prompts, [None if n is None else loras[n] for n in names])
    for step in recorder.steps:
        assert len({_name(recorder.requests[rid]) for rid, _, _ in step.chunks} - {None}) <= 1
    for prompt, name, output in zip(prompts, names, outputs, strict=True):
        model = references[name].get_base_model() if name else references[name]
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, MAX_TOKENS), name


def test_prefix_cache_never_shares_blocks_across_adapters(setup):
    path, loras, references = setup
    llm = make_llm(path)
    prompt = random_prompt(13, seed=20)  # 3 full blocks of 4, and one token
    runs = [None, "a", "a", "b", None]
    cached = []
    for name in runs:
        (output,) = greedy(llm, [prompt], None if name is None else loras[name])
        cached.append(output.num_cached_tokens)
        model = references[name].get_base_model() if name else references[name]
        assert output.outputs[0].token_ids == hf_greedy(model, prompt, MAX_TOKENS), name
    # Each adapter hits only its own blocks: the base's are no use to "a", nor "a"'s to "b".
    assert cached == [0, 0, 12, 0, 12]


def test_bad_lora_requests_raise_value_error(setup, tmp_path):
    path, loras, _ = setup
    llm = make_llm(path, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8 is larger than --max-lora-rank 4"):
        greedy(llm, [[5, 6, 7]], loras["b"])
    with pytest.raises(ValueError, match="no adapter_config.json there"):
        greedy(llm, [[5, 6, 7]], LoRARequest("c", 3, str(tmp_path)))
    greedy(llm, [[5, 6, 7]], loras["a"])
    with pytest.raises(ValueError, match="is loaded from"):  # the same name from elsewhere
        greedy(llm, [[5, 6, 7]], LoRARequest("a", 1, str(tmp_path)))
    assert not llm.engine.core.has_unfinished()
    plain = LLM(model=path, num_kv_blocks=16, block_size=4, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="start the engine with --enable-lora"):
        greedy(plain, [[5, 6, 7]], loras["a"])


def test_lora_modules_load_at_start_and_bad_ones_fail_the_engine(setup, tmp_path):
    path, loras, _ = setup
    llm = make_llm(path, lora_modules=[f"a={loras['a'].lora_path}"])
    assert list(llm.engine.core.lora.adapters) == ["a"]
    with pytest.raises(ValueError, match="lora_modules needs enable_lora"):
        LLM(model=path, lora_modules=[f"a={loras['a'].lora_path}"])
    with pytest.raises(ValueError, match="name=path"):
        make_llm(path, lora_modules=["a"])
    with pytest.raises(ValueError, match="no adapter_config.json there"):
        make_llm(path, lora_modules=[f"x={tmp_path}"])
