"""Sliding-window models through the engine, against transformers on tiny random weights (fp32).

A Mistral whose window (7 tokens) is shorter than its prompts and not a multiple of the block size (4):
every computed position's logits and the greedy tokens match transformers across mixed batches,
chunked prefill, prefix hits and preemption, on both attention backends; its KV blocks are freed as
they slide out of the window, so a long generation holds a bounded number of blocks. A Qwen2 with
one full and one sliding layer frees nothing, and matches too.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from duoserve.kv.kv_cache_manager import NULL_BLOCK
from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import BOS, EOS, TINY_VOCAB, EngineRecorder, hf_greedy, random_prompt, save_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOLERANCE = 1e-4
WINDOW = 7
BLOCK = 4
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(shutil.which("c++") is None, reason="no c++")),
]


def tiny_model(config_cls, seed: int = 0, **overrides):
    config = config_cls(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wide weights, as tests.helpers.tiny_hf_model: clear greedy margins
        for name, param in model.named_parameters():
            scale, offset = (0.2, 1.0) if "norm" in name else (0.3, 0.0)
            param.copy_(offset + scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_mistral():
    """A random 2-layer Mistral whose every layer attends through a 7-token window."""
    return tiny_model(transformers.MistralConfig, sliding_window=WINDOW)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    model = tiny_mistral()
    return model, save_tiny_model(model, tmp_path_factory.mktemp("mistral-swa"))


@pytest.fixture(scope="module")
def qwen2_mixed(tmp_path_factory):
    """Layer 0 full attention, layer 1 a window of 5."""
    model = tiny_model(
        transformers.Qwen2Config, use_sliding_window=True, sliding_window=5, max_window_layers=1
    )
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    return model, save_tiny_model(model, tmp_path_factory.mktemp("qwen2-swa"))


def make_llm(path: str, **engine_args) -> tuple[LLM, EngineRecorder]:
    args = dict(
        num_kv_blocks=128, block_size=BLOCK, max_num_batched_tokens=512, dtype="float32", device="cpu"
    )
    llm = LLM(model=path, **{**args, **engine_args})
    return llm, EngineRecorder(llm.engine.core)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def generate(llm: LLM, prompts, max_tokens) -> list[list[int]]:
    params = [greedy(n) for n in max_tokens] if isinstance(max_tokens, list) else greedy(max_tokens)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_matches_hf(hf, recorder, prompts, outputs, max_tokens) -> None:
    max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for prompt, out, n in zip(prompts, outputs, max_tokens, strict=True):
        assert out == hf_greedy(hf, prompt, n)
    assert recorder.max_rel_err_vs(hf) < TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_with_chunked_prefill(mistral, backend):
    """Prompts shorter than, equal to and longer than the window, prefilled in chunks of 6 (some
    resuming mid-block) next to decodes."""
    hf, path = mistral
    llm, recorder = make_llm(path, attention_backend=backend, max_num_batched_tokens=6)
    assert llm.engine.core.kv.sliding_window == WINDOW
    prompts = [random_prompt(n, seed=n) for n in (3, WINDOW, 19, 30)]
    max_tokens = [12, 9, 14, 10]
    outputs = generate(llm, prompts, max_tokens)
    assert any(start % BLOCK for step in recorder.steps for _, start, n in step.chunks if n > 1)
    assert_matches_hf(hf, recorder, prompts, outputs, max_tokens)
    # Blocks were freed while the requests ran, and nothing is held once they are done.
    assert any(NULL_BLOCK in table for step in recorder.steps for table in step.tables.values())
    assert llm.engine.core.kv.pool.num_free_blocks == 128


def test_one_step_prefill_longer_than_the_window(mistral):
    """A whole 40-token prompt in one chunk: its own keys, masked by the window."""
    hf, path = mistral
    llm, recorder = make_llm(path)
    prompts = [random_prompt(40, seed=40), random_prompt(9, seed=9)]
    outputs = generate(llm, prompts, 8)
    assert sorted(n for _, _, n in recorder.steps[0].chunks) == [9, 40]
    assert_matches_hf(hf, recorder, prompts, outputs, 8)


def test_prefix_hit_on_blocks_freed_by_an_earlier_request(mistral):
    """The first request frees its early blocks as it decodes; they stay in the prefix cache, and a
    later request sharing the prompt hits all of them."""
    hf, path = mistral
    llm, recorder = make_llm(path)
    shared = random_prompt(18, seed=7)  # 4 full blocks and 2 tokens more
    first = shared + random_prompt(5, seed=8)
    second = shared + random_prompt(3, seed=9)
    out_first = generate(llm, [first], 10)
    assert NULL_BLOCK in recorder.steps[-1].tables["0"]  # freed while it ran
    out_second = generate(llm, [second], 6)
    assert llm.engine.core.kv.prefix_cache_hits == 16
    assert recorder.positions_of("1")[0] == 16
    assert_matches_hf(hf, recorder, [first, second], [out_first[0], out_second[0]], [10, 6])


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_with_a_tiny_pool(mistral, backend):
    """6 blocks of 4 tokens: four requests of 23 tokens each cannot all keep their window's blocks."""
    hf, path = mistral
    llm, recorder = make_llm(path, attention_backend=backend, num_kv_blocks=6, max_num_batched_tokens=8)
    prompts = [random_prompt(n, seed=50 + n) for n in (5, 9, 12, 15)]
    max_tokens = [18, 14, 11, 8]
    outputs = generate(llm, prompts, max_tokens)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert_matches_hf(hf, recorder, prompts, outputs, max_tokens)


def test_kv_blocks_of_a_long_generation_stay_bounded(mistral):
    """One request generates 120 tokens: it never holds more than the blocks its window spans.

    A query at p >= N (N tokens computed) sees positions > N - 7, and the block of position N is
    allocated: at most ceil((7 - 1 + 3) / 4) + 1 = 3 blocks, where a full-attention model holds 33.
    """
    hf, path = mistral
    llm, recorder = make_llm(path)
    prompt = random_prompt(10, seed=10)
    outputs = generate(llm, [prompt], 120)
    held = [len([b for b in step.tables["0"] if b != NULL_BLOCK]) for step in recorder.steps]
    decode_steps = held[1:]  # the first step holds the whole prompt (3 blocks) while it is computed
    assert max(decode_steps) <= 3 and len(decode_steps) == 119
    # The pool agrees: apart from what the request holds, every block is free.
    assert all(128 - s.num_free_blocks == h for s, h in zip(recorder.steps, held, strict=True))
    assert len(recorder.steps[-1].tables["0"]) == -(-(10 + 119) // BLOCK)  # the table spans every position
    assert outputs[0] == hf_greedy(hf, prompt, 120)


def test_a_model_with_a_full_attention_layer_frees_nothing(qwen2_mixed):
    hf, path = qwen2_mixed
    llm, recorder = make_llm(path, max_num_batched_tokens=8)
    core = llm.engine.core
    assert [layer.sliding_window for layer in core.model.layers] == [None, 5]
    assert core.kv.sliding_window is None
    prompts = [random_prompt(n, seed=60 + n) for n in (4, 13, 22)]
    outputs = generate(llm, prompts, 12)
    assert not any(NULL_BLOCK in table for step in recorder.steps for table in step.tables.values())
    assert_matches_hf(hf, recorder, prompts, outputs, 12)
