"""The engine against transformers on tiny random Llama-family models (fp32).

Every position the engine computes (prefill chunks, decodes, recomputation after preemption, the
tail after a prefix-cache hit) is compared with transformers' logits of the same tokens, and greedy
continuations with transformers' `generate(do_sample=False)`.
"""

from __future__ import annotations

import pytest

from duoserve.kv import block_pool as block_pool_module
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import TINY_KINDS, EngineRecorder, hf_greedy, random_prompt

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = 1e-4
KINDS = list(TINY_KINDS)


def make_llm(path: str, **engine_args) -> tuple[LLM, EngineRecorder]:
    args = dict(num_kv_blocks=128, block_size=4, max_num_batched_tokens=512, dtype="float32", device="cpu")
    llm = LLM(model=path, **{**args, **engine_args})
    return llm, EngineRecorder(llm.engine.core)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def generate_ids(llm: LLM, prompts: list[list[int]], params) -> list[list[int]]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_matches_hf(hf, recorder: EngineRecorder, prompts, outputs, max_tokens) -> None:
    max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for prompt, out, n in zip(prompts, outputs, max_tokens, strict=True):
        assert out == hf_greedy(hf, prompt, n)
    assert recorder.max_rel_err_vs(hf) < TOLERANCE


@pytest.mark.parametrize("kind", KINDS)
def test_single_sequence(kind, tiny_models):
    hf, path = tiny_models(kind)
    llm, recorder = make_llm(path)
    prompt = random_prompt(13, seed=1)
    outputs = generate_ids(llm, [prompt], greedy(12))
    assert len(outputs[0]) == 12
    # Every prompt position and every decoded one (all but the last sampled token) was compared.
    assert recorder.positions_of("0") == list(range(13 + 12 - 1))
    assert_matches_hf(hf, recorder, [prompt], outputs, 12)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_of_different_lengths(kind, tiny_models):
    hf, path = tiny_models(kind)
    llm, recorder = make_llm(path)
    prompts = [random_prompt(n, seed=n) for n in (1, 5, 17, 33)]
    max_tokens = [9, 14, 4, 11]
    params = [greedy(n) for n in max_tokens]
    outputs = generate_ids(llm, prompts, params)
    # All four prompts were prefilled in one step, then decoded together.
    assert sorted(n for _, _, n in recorder.steps[0].chunks) == [1, 5, 17, 33]
    assert len(recorder.steps[1].chunks) == 4
    assert_matches_hf(hf, recorder, prompts, outputs, max_tokens)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("chunk", [3, 7, 16, 64])
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_chunked_prefill(kind, chunk, async_scheduling, tiny_models):
    """With async scheduling too (CUDA's default): each step's tokens fed to the next from the device."""
    hf, path = tiny_models(kind)
    llm, recorder = make_llm(path, max_num_batched_tokens=chunk, async_scheduling=async_scheduling)
    prompts = [random_prompt(n, seed=100 + n) for n in (41, 9, 23)]
    outputs = generate_ids(llm, prompts, greedy(10))
    assert all(sum(n for _, _, n in step.chunks) <= chunk for step in recorder.steps)
    # Prompts longer than the budget were cut into chunks, some resuming mid-block.
    starts = {start for step in recorder.steps for _, start, n in step.chunks if n > 1}
    if chunk < 41:
        assert any(start % 4 for start in starts)
    assert_matches_hf(hf, recorder, prompts, outputs, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_cache_hit_in_a_later_call(kind, tiny_models):
    hf, path = tiny_models(kind)
    llm, recorder = make_llm(path)
    shared = random_prompt(18, seed=7)  # 4 full blocks of 4, and 2 tokens more
    first = shared + random_prompt(5, seed=8)
    second = shared + random_prompt(3, seed=9)
    out_first = generate_ids(llm, [first], greedy(6))
    assert llm.engine.core.kv.prefix_cache_hits == 0
    outputs = llm.generate([second], greedy(6), use_tqdm=False)
    kv = llm.engine.core.kv
    assert kv.prefix_cache_hits == 16 and outputs[0].num_cached_tokens == 16
    # The second request only computed what follows the cached blocks.
    assert recorder.positions_of("1")[0] == 16
    assert_matches_hf(hf, recorder, [first, second], [out_first[0], outputs[0].outputs[0].token_ids], 6)


def test_prefix_cache_hit_on_generated_tokens(tiny_models):
    """A follow-up turn whose prompt is the first request's prompt + output hits blocks filled while
    decoding, not only prompt blocks."""
    hf, path = tiny_models("llama_gqa")
    llm, recorder = make_llm(path)
    first = random_prompt(6, seed=11)
    out_first = generate_ids(llm, [first], greedy(12))
    second = first + out_first[0] + random_prompt(2, seed=12)
    out_second = generate_ids(llm, [second], greedy(5))
    # 6 + 12 = 18 tokens were computed (the last sampled one has no KV): 4 full blocks of 4.
    assert llm.engine.core.kv.prefix_cache_hits == 16
    assert recorder.positions_of("1")[0] == 16
    assert_matches_hf(hf, recorder, [first, second], [out_first[0], out_second[0]], [12, 5])


@pytest.mark.parametrize("kind", ["llama_mha_tied", "qwen2"])
def test_prefix_cache_hit_within_one_batch(kind, tiny_models):
    hf, path = tiny_models(kind)
    llm, recorder = make_llm(path)
    shared = random_prompt(12, seed=21)
    prompts = [shared + random_prompt(n, seed=22 + n) for n in (3, 1, 6)]
    outputs = generate_ids(llm, prompts, greedy(7))
    # The later requests of the same step read the blocks the first one writes in that step.
    assert len(recorder.steps[0].chunks) == 3
    assert llm.engine.core.kv.prefix_cache_hits == 2 * 12
    assert [recorder.positions_of(str(i))[0] for i in range(3)] == [0, 12, 12]
    assert_matches_hf(hf, recorder, prompts, outputs, 7)


def test_hash_collisions_never_share_kv(tiny_models, monkeypatch):
    """Every block hashes alike: only blocks whose tokens (and parent) match may be reused."""
    monkeypatch.setattr(block_pool_module, "hash_block", lambda parent, token_ids: 1234)
    hf, path = tiny_models("llama_gqa")
    llm, recorder = make_llm(path)
    tail = random_prompt(9, seed=90)
    first = random_prompt(4, seed=91) + tail
    other_head = random_prompt(4, seed=92) + tail  # same tokens after a different first block
    same_head = first[:4] + random_prompt(7, seed=93)
    outputs = [generate_ids(llm, [p], greedy(6))[0] for p in (first, other_head, same_head)]
    # Only the one block whose tokens match was reused.
    assert llm.engine.core.kv.prefix_cache_hits == 4
    assert [recorder.positions_of(str(i))[0] for i in range(3)] == [0, 0, 4]
    assert_matches_hf(hf, recorder, [first, other_head, same_head], outputs, 6)


def test_a_hash_collision_does_not_leak_kv_into_later_blocks(tiny_models, monkeypatch):
    """The first blocks of two prompts collide; their second blocks are equal. The second block
    computed after one first block must not serve the other prompt."""
    real_hash = block_pool_module.hash_block
    x, z, y = (random_prompt(4, seed=s) for s in (94, 95, 96))

    def colliding(parent, token_ids):
        if parent == block_pool_module.ROOT_HASH and list(token_ids) in (x, z):
            return 4321
        return real_hash(parent, token_ids)

    monkeypatch.setattr(block_pool_module, "hash_block", colliding)
    hf, path = tiny_models("llama_gqa")
    llm, recorder = make_llm(path)
    prompts = [
        z + random_prompt(3, seed=97),
        x + y + random_prompt(2, seed=98),
        z + y + random_prompt(2, seed=99),
    ]
    outputs = [generate_ids(llm, [p], greedy(5))[0] for p in prompts]
    assert_matches_hf(hf, recorder, prompts, outputs, 5)
    assert llm.engine.core.kv.prefix_cache_hits == 4  # the last prompt's first block, nothing more


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_mha_tied"])
def test_n_greedy_sequences_share_the_prompt_blocks(kind, tiny_models):
    hf, path = tiny_models(kind)
    llm, recorder = make_llm(path)
    prompt = random_prompt(21, seed=31)  # 5 full blocks of 4 and one token more
    outputs = llm.generate([prompt], greedy(8, n=3), use_tqdm=False)
    assert len(outputs) == 1 and len(outputs[0].outputs) == 3
    expected = hf_greedy(hf, prompt, 8)
    assert [c.token_ids for c in outputs[0].outputs] == [expected] * 3
    assert [c.index for c in outputs[0].outputs] == [0, 1, 2]
    # The prompt's 5 full blocks are shared by the three sequences in every step; each only holds
    # the blocks from the prompt's last token on (1, then 2 as decoding crosses a block boundary).
    assert len(recorder.steps) == 8
    for step in recorder.steps:
        tables = [step.tables[f"0#{i}"] for i in range(3)]
        assert tables[0][:5] == tables[1][:5] == tables[2][:5]
        own = len(tables[0]) - 5
        assert len({b for t in tables for b in t}) == 128 - step.num_free_blocks == 5 + 3 * own
        assert 5 + 3 * own < 3 * len(tables[0])
    assert len(recorder.steps[-1].tables["0#0"]) == 7
    assert recorder.max_rel_err_vs(hf) < TOLERANCE


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_preemption_recomputes_and_matches(kind, async_scheduling, tiny_models):
    hf, path = tiny_models(kind)
    # 12 blocks of 4 = 48 tokens; three requests of 10 + 20 tokens need 24 blocks together.
    llm, recorder = make_llm(
        path, num_kv_blocks=12, max_num_batched_tokens=16, async_scheduling=async_scheduling
    )
    prompts = [random_prompt(10, seed=40 + i) for i in range(3)]
    outputs = generate_ids(llm, prompts, greedy(20))
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0
    # Some positions were computed twice (before and after a preemption), and both times right.
    assert any(len(v) > 1 for v in recorder.logits.values())
    assert_matches_hf(hf, recorder, prompts, outputs, 20)
    assert core.kv.pool.num_free_blocks == 12


# ---------------------------------------------------------------------------------------------------
# Seeded sampling


SEEDED = dict(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True)


def test_seeded_request_is_reproducible_across_batch_compositions(tiny_models):
    _, path = tiny_models("llama_gqa")
    target = random_prompt(11, seed=50)
    params = SamplingParams(seed=1234, **SEEDED)
    llm, _ = make_llm(path)
    alone = generate_ids(llm, [target], params)[0]
    others = [random_prompt(n, seed=60 + n) for n in (3, 19, 7)]
    batch_params = [
        SamplingParams(**SEEDED),
        params,
        SamplingParams(seed=99, **SEEDED),
        SamplingParams(temperature=1.0, max_tokens=9),
    ]
    in_batch = generate_ids(llm, [others[0], target, others[1], others[2]], batch_params)
    assert in_batch[1] == alone
    # Another engine, chunked prefill, and the request arriving last: still the same tokens.
    llm2, _ = make_llm(path, max_num_batched_tokens=5, seed=7)
    assert generate_ids(llm2, [*others, target], [*batch_params[:1], *batch_params[2:], params])[3] == alone
    # The seed matters.
    assert generate_ids(llm, [target], SamplingParams(seed=4321, **SEEDED))[0] != alone


def test_seeded_n2_gives_two_reproducible_samples(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompt = random_prompt(9, seed=70)
    params = SamplingParams(n=2, seed=5, **SEEDED)
    llm, _ = make_llm(path)
    first = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    assert first[0] != first[1]
    again = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    assert again == first
    other = random_prompt(15, seed=71)
    batched = llm.generate([other, prompt], [SamplingParams(**SEEDED), params], use_tqdm=False)
    assert [c.token_ids for c in batched[1].outputs] == first
