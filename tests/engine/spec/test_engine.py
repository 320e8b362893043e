"""Speculative decoding inside the engine, on tiny random models: greedy outputs identical to plain
decoding for every proposer, across batch mixes, chunked prefill and preemption; exact KV
accounting after rejections; stop conditions inside accepted drafts; per-request fallback."""

from __future__ import annotations

import time

import pytest

from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import TINY_VOCAB, random_prompt

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

BASE_ARGS = dict(num_kv_blocks=128, block_size=4, max_num_batched_tokens=512, dtype="float32", device="cpu")
# The mechanics under test must not depend on step timings: the rate back-off is tested on its own.
SPEC_ARGS = dict(speculative_rate_backoff=False)


def make_llm(path: str, **engine_args) -> LLM:
    extra = SPEC_ARGS if "speculative" in engine_args else {}
    return LLM(model=path, **{**BASE_ARGS, **extra, **engine_args})


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def generate_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


class OracleProposer:
    """Proposes the known continuation of each prompt, with every third proposal's tail corrupted:
    both full acceptance and rejections at varying positions, for each k."""

    def __init__(self, truth: dict[tuple[int, ...], list[int]], max_drafts: dict[tuple[int, ...], int]):
        self.truth = truth
        self.max_drafts = max_drafts
        self.calls = 0

    def propose(self, requests, num_drafts):
        out = []
        for request, k in zip(requests, num_drafts, strict=True):
            prompt = tuple(request.prompt_token_ids)
            done = len(request.output_token_ids)
            drafts = list(self.truth[prompt][done : done + min(k, self.max_drafts[prompt])])
            self.calls += 1
            if self.calls % 3 == 0 and drafts:
                cut = self.calls % len(drafts)
                drafts[cut:] = [(t + 1) % 300 for t in drafts[cut:]]
            out.append(drafts)
        return out

    def retain(self, request_ids):
        pass


class KVChecker:
    """After every step: each running request holds exactly ceil(computed / block_size) blocks, and
    every block registered in the prefix cache holds tokens that the request committed."""

    def __init__(self, llm: LLM) -> None:
        self.core = llm.engine.core
        self.steps = 0
        step = self.core.step

        def checked_step():
            outputs = step()
            self.check()
            return outputs

        self.core.step = checked_step

    def check(self) -> None:
        core, kv = self.core, self.core.kv
        bs = kv.block_size
        self.steps += 1
        for request_id, table in kv.tables.items():
            request = core.scheduler.requests[request_id]
            assert len(table.block_ids) == -(-request.num_computed_tokens // bs), request_id
            for i, block_id in enumerate(table.block_ids[: len(table.block_hashes)]):
                block = kv.pool.blocks[block_id]
                if block.block_hash is not None:
                    assert block.token_ids == tuple(request.all_token_ids[i * bs : (i + 1) * bs])

    def assert_empty_at_end(self) -> None:
        kv = self.core.kv
        assert not kv.tables
        assert kv.pool.num_free_blocks == kv.num_blocks


def run_with_oracle(path, prompts, params, max_drafts, **engine_args):
    plain = generate_ids(make_llm(path, **engine_args), prompts, params)
    llm = make_llm(path, speculative="ngram", num_speculative_tokens=4, **engine_args)
    truth = {tuple(p): out for p, out in zip(prompts, plain, strict=True)}
    llm.engine.core.speculator.proposer = OracleProposer(truth, dict(zip(truth, max_drafts, strict=True)))
    checker = KVChecker(llm)
    speculative = generate_ids(llm, prompts, params)
    return plain, speculative, llm, checker


def test_greedy_identical_with_rejections_and_different_k(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(n, seed=n) for n in (3, 9, 17, 30)]
    params = [greedy(n) for n in (20, 13, 2, 25)]
    plain, speculative, llm, checker = run_with_oracle(path, prompts, params, [4, 1, 3, 2])
    assert speculative == plain
    stats = llm.engine.core.stats()
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert stats["spec_decode_num_accepted_tokens_per_pos:3"] > 0  # a k=4 request accepted all four
    # Speculation made fewer steps than tokens generated.
    assert checker.steps < sum(len(p) for p in plain)
    checker.assert_empty_at_end()


def test_greedy_identical_with_chunked_prefill_in_the_same_steps(tiny_models):
    _, path = tiny_models("qwen2")
    prompts = [random_prompt(n, seed=200 + n) for n in (5, 41, 23, 11)]
    # A budget of 6: a decode with 4 drafts (5 tokens) leaves 1 for prefill chunks, or drafts shrink.
    plain, speculative, llm, checker = run_with_oracle(
        path, prompts, greedy(15), [4, 4, 3, 2], max_num_batched_tokens=6
    )
    assert speculative == plain
    assert llm.engine.core.stats()["spec_decode_num_accepted_tokens"] > 0
    checker.assert_empty_at_end()


def test_greedy_identical_under_preemption(tiny_models):
    _, path = tiny_models("llama_gqa")
    # 12 blocks of 4 = 48 tokens; three requests of 10 + 20 tokens need 24 blocks together.
    prompts = [random_prompt(10, seed=40 + i) for i in range(3)]
    plain, speculative, llm, checker = run_with_oracle(
        path, prompts, greedy(20), [4, 4, 4], num_kv_blocks=12, max_num_batched_tokens=16
    )
    assert speculative == plain
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0
    assert core.stats()["spec_decode_num_accepted_tokens"] > 0
    checker.assert_empty_at_end()


def test_prefix_cache_never_holds_a_rejected_token(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(6, seed=300 + i) for i in range(3)]
    plain, speculative, llm, checker = run_with_oracle(path, prompts, greedy(30), [4, 4, 4])
    assert speculative == plain
    bs = llm.engine.core.kv.block_size
    committed = {
        tuple((prompt + out)[i * bs : (i + 1) * bs])
        for prompt, out in zip(prompts, plain, strict=True)
        for i in range(len(prompt + out) // bs)
    }
    cached = [b for b in llm.engine.core.kv.pool.blocks if b.block_hash is not None]
    assert len(cached) >= len(committed) - len(prompts)  # generated blocks were cached too ...
    assert all(block.token_ids in committed for block in cached)  # ... and only committed tokens
    checker.assert_empty_at_end()


def test_stops_apply_per_accepted_token(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(7, seed=400 + i) for i in range(3)]
    unbounded = generate_ids(make_llm(path), prompts, greedy(24))
    # Stop at a token that appears mid-output (inside accepted drafts), and at max_tokens.
    params = [
        greedy(24, stop_token_ids=[unbounded[0][9]]),
        greedy(24, stop_token_ids=[unbounded[1][5]], min_tokens=8),
        greedy(11),
    ]
    plain, speculative, llm, checker = run_with_oracle(path, prompts, params, [4, 4, 4])
    assert speculative == plain
    assert len(plain[2]) == 11 and len(plain[0]) <= 10
    checker.assert_empty_at_end()


def test_logprobs_requests_fall_back_to_plain_decoding_in_the_same_batch(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(8, seed=500 + i) for i in range(3)]
    params = [greedy(12), greedy(12, logprobs=2), greedy(12, presence_penalty=0.5, repetition_penalty=1.2)]
    plain = [o.outputs[0] for o in make_llm(path).generate(prompts, params, use_tqdm=False)]
    llm = make_llm(path, speculative="draft")  # the draft is the target: every draft is accepted
    speculated = {}
    propose = llm.engine.core.speculator.proposer.propose

    def recording_propose(requests, num_drafts):
        for request in requests:
            speculated[request.request_id] = True
        return propose(requests, num_drafts)

    llm.engine.core.speculator.proposer.propose = recording_propose
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain]
    # Logprobs as without speculation (up to float rounding: the batch layout differs).
    for ours, ref in zip(outputs[1].logprobs, plain[1].logprobs, strict=True):
        assert list(ours) == list(ref)
        assert all(abs(ours[t].logprob - ref[t].logprob) < 1e-5 for t in ours)
    # The logprobs request never speculated; the penalised one did, and matches.
    assert len(speculated) == 2 and all(int(i) % 3 != 1 for i in speculated)


@pytest.mark.parametrize("draft_args", [{}, {"draft_num_layers": 1}])
def test_draft_model_greedy_identical(tiny_models, draft_args):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(n, seed=600 + n) for n in (4, 13, 21)]
    params = [greedy(n) for n in (18, 9, 14)]
    plain = generate_ids(make_llm(path), prompts, params)
    llm = make_llm(
        path, speculative="draft", num_speculative_tokens=3, max_num_batched_tokens=8, **draft_args
    )
    checker = KVChecker(llm)
    assert generate_ids(llm, prompts, params) == plain
    stats = llm.engine.core.stats()
    if draft_args:  # one layer of two: some drafts rejected
        assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    else:  # the target as its own draft: everything accepted
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0
    checker.assert_empty_at_end()
    draft_kv = llm.engine.core.speculator.proposer.kv
    assert not draft_kv.tables and draft_kv.pool.num_free_blocks == draft_kv.num_blocks


def test_draft_beside_a_quantized_kv_cache(tiny_models):
    """The target's KV in int8, the draft's in the model's dtype: greedy output is plain int8 decoding's."""
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(n, seed=700 + n) for n in (5, 17)]
    plain = generate_ids(make_llm(path, kv_cache_dtype="int8"), prompts, greedy(12))
    llm = make_llm(
        path, kv_cache_dtype="int8", speculative="draft", num_speculative_tokens=3, draft_num_layers=1
    )
    assert generate_ids(llm, prompts, greedy(12)) == plain
    assert llm.engine.core.stats()["spec_decode_num_draft_tokens"] > 0
    draft = llm.engine.core.speculator.proposer
    assert draft.kv_cache.data.dtype == llm.engine.core.model.dtype
    assert llm.engine.core.kv_cache.data.dtype.itemsize == 1


def test_draft_layers_of_a_model_with_sliding_layers(tmp_path):
    """Gemma 2's layers alternate sliding and full attention (config layer_types): a one-layer draft
    keeps layer 0's type, and speculation leaves greedy outputs as they were."""
    from tests.helpers import save_tiny_model
    from tests.models.families import family_model

    path = save_tiny_model(family_model("gemma2"), tmp_path)
    prompts = [random_prompt(n, seed=650 + n) for n in (4, 11)]
    params = [greedy(n) for n in (12, 9)]
    plain = generate_ids(make_llm(path), prompts, params)
    llm = make_llm(path, speculative="draft", num_speculative_tokens=3, draft_num_layers=1)
    assert llm.engine.core.speculator.proposer.model.config.layer_types == ["sliding_attention"]
    assert generate_ids(llm, prompts, params) == plain
    assert llm.engine.core.stats()["spec_decode_num_draft_tokens"] > 0


def test_draft_model_from_another_checkpoint(tiny_models):
    _, path = tiny_models("llama_gqa")
    _, other = tiny_models("llama_mha_tied")  # same vocabulary, other weights
    prompts = [random_prompt(9, seed=700 + i) for i in range(2)]
    plain = generate_ids(make_llm(path), prompts, greedy(12))
    llm = make_llm(path, speculative="draft", draft_model=other)
    assert generate_ids(llm, prompts, greedy(12)) == plain
    assert llm.engine.core.stats()["spec_decode_num_drafts"] > 0


def test_ngram_greedy_identical_on_repetitive_prompts(tiny_models):
    _, path = tiny_models("llama_gqa")
    # Every word once, then a repeated phrase: whatever token the random model emits has occurred
    # before, so each decode step has an n-gram match to propose from (else drafting is up to chance).
    words = list(range(3, TINY_VOCAB))
    prompts = [words + random_prompt(6, seed=800 + i) * 4 for i in range(3)]
    args = dict(num_kv_blocks=3 * 90, max_num_batched_tokens=1024, max_model_len=360)
    plain = generate_ids(make_llm(path, **args), prompts, greedy(20))
    llm = make_llm(path, speculative="ngram", ngram_min=1, **args)
    assert generate_ids(llm, prompts, greedy(20)) == plain
    assert llm.engine.core.stats()["spec_decode_num_drafts"] >= len(prompts)  # at least the first step's


def test_seeded_sampling_with_speculation_is_reproducible(tiny_models):
    _, path = tiny_models("llama_gqa")
    target = random_prompt(10, seed=900)
    params = SamplingParams(seed=11, temperature=0.9, top_k=40, max_tokens=16, ignore_eos=True)
    llm = make_llm(path, speculative="draft")
    alone = generate_ids(llm, [target], params)[0]
    others = [random_prompt(n, seed=901 + n) for n in (3, 15)]
    batch_params = [SamplingParams(temperature=1.0, max_tokens=9), params, greedy(7)]
    assert generate_ids(llm, [others[0], target, others[1]], batch_params)[1] == alone
    assert generate_ids(make_llm(path, speculative="draft"), [target], params)[0] == alone
    assert llm.engine.core.stats()["spec_decode_num_drafts"] > 0


def test_back_off_pauses_requests_whose_drafts_are_rejected(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(8, seed=1000)]
    plain = generate_ids(make_llm(path), prompts, greedy(40))
    llm = make_llm(path, speculative="ngram", num_speculative_tokens=2)
    wrong = {tuple(prompts[0]): [(t + 1) % 300 for t in plain[0]]}
    llm.engine.core.speculator.proposer = OracleProposer(wrong, {tuple(prompts[0]): 2})
    assert generate_ids(llm, prompts, greedy(40)) == plain
    stats = llm.engine.core.stats()
    # Without back-off all 39 steps after the first token would verify drafts; pauses double.
    assert stats["spec_decode_num_accepted_tokens"] == 0
    assert 0 < stats["spec_decode_num_drafts"] <= 6
    # Cheap proposals: the next request probes on its own anyway.
    assert generate_ids(llm, prompts, greedy(40)) == plain
    assert llm.engine.core.stats()["spec_decode_num_drafts"] > stats["spec_decode_num_drafts"]


def test_costly_useless_proposals_pause_new_requests_from_the_start(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(8, seed=1000)]
    plain = generate_ids(make_llm(path), prompts, greedy(40))
    llm = make_llm(path, speculative="ngram", num_speculative_tokens=2)
    wrong = {tuple(prompts[0]): [(t + 1) % 300 for t in plain[0]]}
    llm.engine.core.speculator.proposer = SlowOracle(wrong, {tuple(prompts[0]): 2})
    assert generate_ids(llm, prompts, greedy(40)) == plain
    num_drafts = llm.engine.core.stats()["spec_decode_num_drafts"]
    assert 0 < num_drafts <= 6
    # Later probes start from that record: of 8 due (one per new request), one goes ahead.
    for _ in range(8):
        assert generate_ids(llm, prompts, greedy(40)) == plain
    assert llm.engine.core.stats()["spec_decode_num_drafts"] == num_drafts + 1


def test_no_speculation_in_large_batches(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(5, seed=1100 + i) for i in range(5)]
    llm = make_llm(path, speculative="draft", speculative_max_num_seqs=4)
    plain = generate_ids(make_llm(path), prompts, greedy(6))
    assert generate_ids(llm, prompts, greedy(6)) == plain
    assert llm.engine.core.stats()["spec_decode_num_drafts"] == 0


class SlowOracle(OracleProposer):
    """Always right, but slower than the target's whole step: speculating cannot pay."""

    def propose(self, requests, num_drafts):
        time.sleep(0.05)
        return super().propose(requests, num_drafts)


def test_back_off_on_proposals_that_cost_more_than_they_save(tiny_models):
    _, path = tiny_models("llama_gqa")
    prompts = [random_prompt(8, seed=1200 + i) for i in range(2)]
    # Two requests: unseeded (priced by time) and seeded (backs off on acceptance only).
    params = [greedy(40), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, seed=3)]
    plain = generate_ids(make_llm(path), prompts, params)
    llm = make_llm(path, speculative="ngram", num_speculative_tokens=2)
    truth = {tuple(p): out for p, out in zip(prompts, plain, strict=True)}
    llm.engine.core.speculator.proposer = SlowOracle(
        {k: v for k, v in truth.items()}, dict.fromkeys(truth, 2)
    )
    verified = {}
    record = llm.engine.core.speculator.record

    def counting_record(request, num_drafts, num_accepted):
        verified[request.request_id] = verified.get(request.request_id, 0) + 1
        return record(request, num_drafts, num_accepted)

    llm.engine.core.speculator.record = counting_record
    assert generate_ids(llm, prompts, params) == plain
    unseeded, seeded = (verified.get(str(i), 0) for i in range(2))
    assert 0 < unseeded <= 6  # paused on cost: a few probes over 40 tokens
    assert seeded > 10  # every draft accepted, so the seeded request kept speculating
