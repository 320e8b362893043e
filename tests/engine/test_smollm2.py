"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) in fp32 against transformers loaded from the
same GGUF: per-position logits and greedy continuations of a batch of two prompts, on the dequantized
weights and on the file's codes (int16 activations).

transformers' GGUF loading dominates the time; its fixture is shared with tests/models/test_loader.py.
"""

from __future__ import annotations

import pytest

from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import EngineRecorder, hf_greedy, hf_logits, rel_err

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz named "
    "Johannes Gutenberg",
    "Once upon a time",
]
MAX_TOKENS = 20
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
]
ANSWER_TOKENS = 12
ANSWER_PREFIX = 5  # tokens every bfloat16 answer must share with the fp32 one


# Largest relative error of a position's logits against transformers in float32: the engine on the
# file's weights dequantized ("none": float32 sums, so only summation order differs), and on its codes
# with activations rounded to int16 per group of 32 ("auto": every row count, the kernels' integer
# products). A group holding one of SmolLM2's outlier activations leaves the others ~9 bits: 1.5e-3 here,
# 2.7e-3 at most over 256 decode steps, at a mean KL divergence of 6e-7 from float32
# (benchmarks/quantized_activations.py, BENCHMARKS.md; int8 is measured there too).
LOGITS_BOUND = {"none": 1e-4, "auto": 4e-3}


@pytest.fixture(scope="module", params=list(LOGITS_BOUND))
def engine_run(request, smollm2_gguf_path):
    quantization = request.param
    llm = LLM(
        dtype="float32",
        device="cpu",
        num_kv_blocks=16,
        block_size=16,
        quantization=quantization,
        quantized_activations="int16",
    )
    assert llm.engine.model_name == smollm2_gguf_path
    recorder = EngineRecorder(llm.engine.core)
    prompts = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return prompts, outputs, recorder, LOGITS_BOUND[quantization]


def _answers(llm: LLM) -> list[list[int]]:
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outputs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def float32_answers(smollm2_gguf_path):
    return _answers(
        LLM(dtype="float32", device="cpu", num_kv_blocks=16, block_size=16, quantized_activations="int16")
    )


def test_prompt_logits_match_transformers(engine_run, smollm2_hf):
    prompts, _, recorder, bound = engine_run
    assert len(prompts[0]) >= 18 and len(prompts[1]) < len(prompts[0])
    # Both prompts were prefilled together in the first step.
    assert sorted(n for _, _, n in recorder.steps[0].chunks) == sorted(len(p) for p in prompts)
    for request_id, prompt in zip(("0", "1"), prompts, strict=True):
        ref = hf_logits(smollm2_hf, prompt)
        for p in range(len(prompt)):
            (ours,) = recorder.logits[(request_id, p)]
            assert rel_err(ours, ref[p]) < bound, (request_id, p)


def test_batched_greedy_matches_transformers(engine_run, smollm2_hf):
    prompts, outputs, recorder, bound = engine_run
    for prompt, output in zip(prompts, outputs, strict=True):
        (completion,) = output.outputs
        assert completion.finish_reason == "length"
        assert completion.token_ids == hf_greedy(smollm2_hf, prompt, MAX_TOKENS)
    # The decoded positions' logits too (the last sampled token is never fed back).
    assert recorder.max_rel_err_vs(smollm2_hf) < bound


@pytest.mark.parametrize("quantization", ["auto", "none"])
def test_bfloat16_stays_close_to_float32_transformers(smollm2_hf, float32_answers, quantization):
    """The fast CPU path: bfloat16, with the file's Q4_1 / Q8_0 weights run by 4/8-bit kernels
    ("auto") or dequantized ("none"). bfloat16 cannot match fp32 to 1e-4; it must stay within the
    ~2% that bfloat16 rounding gives, pick the same next token almost everywhere, and start its answers
    to short questions as fp32 does (a bfloat16 sum of squares in RMSNorm once garbled them from the
    first token on; later tokens may part ways on near-ties)."""
    llm = LLM(dtype="bfloat16", device="cpu", num_kv_blocks=16, block_size=16, quantization=quantization)
    model = llm.engine.core.model
    quantized = (type(model.layers[0].qkv).__name__, type(model.lm_head).__name__)
    assert quantized == (("Int4Linear", "Int8Linear") if quantization == "auto" else ("DenseLinear",) * 2)
    recorder = EngineRecorder(llm.engine.core)
    prompts = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    errors, same_top = [], []
    for request_id, prompt in zip(("0", "1"), prompts, strict=True):
        ref = hf_logits(smollm2_hf, prompt)
        for p in range(len(prompt)):
            (ours,) = recorder.logits[(request_id, p)]
            errors.append(rel_err(ours, ref[p]))
            same_top.append(ours.argmax().item() == ref[p].argmax().item())
    errors.sort()
    assert errors[len(errors) // 2] < 0.04 and errors[-1] < 0.2, errors
    assert sum(same_top) >= 0.9 * len(same_top)
    assert [a[:ANSWER_PREFIX] for a in _answers(llm)] == [a[:ANSWER_PREFIX] for a in float32_answers]
