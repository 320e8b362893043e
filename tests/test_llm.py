"""LLM.generate end to end on a tiny random Llama: text, stop conditions, logprobs, prompt logprobs,
and the errors a caller gets for requests the engine cannot serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import EOS, hf_greedy, hf_logits, random_prompt, word

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

NUM_BLOCKS = 64


def make_llm(path: str, **engine_args) -> LLM:
    args = dict(num_kv_blocks=NUM_BLOCKS, block_size=4, dtype="float32", device="cpu")
    return LLM(model=path, **{**args, **engine_args})


@pytest.fixture(scope="module")
def tiny(tiny_models):
    hf, path = tiny_models("llama_gqa")
    return hf, path, make_llm(path)


def generate_one(llm: LLM, prompt, **params):
    (output,) = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)
    assert output.finished
    return output


def greedy_run(llm: LLM, prompt: list[int], max_tokens: int = 16):
    """The unconstrained greedy continuation: (token ids, text)."""
    out = generate_one(llm, prompt, temperature=0, max_tokens=max_tokens, ignore_eos=True).outputs[0]
    return out.token_ids, out.text


def assert_engine_idle(llm: LLM) -> None:
    core = llm.engine.core
    assert not core.has_unfinished() and not core.kv.tables
    assert core.kv.pool.num_free_blocks == core.kv.num_blocks


# ---------------------------------------------------------------------------------------------------
# Text, max_tokens, finish reasons


def test_text_prompt_and_output_text(tiny):
    _, _, llm = tiny
    output = generate_one(llm, "w5 w17 w33 w250", temperature=0, max_tokens=7, ignore_eos=True)
    assert output.prompt == "w5 w17 w33 w250" and output.prompt_token_ids == [5, 17, 33, 250]
    (completion,) = output.outputs
    assert len(completion.token_ids) == 7
    assert completion.finish_reason == "length" and completion.stop_reason is None
    assert completion.text == " ".join(word(t) for t in completion.token_ids)
    assert completion.cumulative_logprob is None and completion.logprobs is None


def test_prompt_forms_and_order(tiny):
    _, _, llm = tiny
    a, b = random_prompt(5, seed=1), random_prompt(9, seed=2)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outputs = llm.generate([a, {"prompt_token_ids": b}, {"prompt": "w7 w8"}], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == [a, b, [7, 8]]
    # A single prompt given as token ids is one prompt, not many.
    assert len(llm.generate(a, params, use_tqdm=False)) == 1
    assert_engine_idle(llm)


# ---------------------------------------------------------------------------------------------------
# Stop strings and stop tokens


def _boundary_stop(ids: list[int], text: str) -> tuple[str, int, int]:
    """A stop string spanning the end of token k and the start of token k + 1, whose first occurrence
    in `text` is exactly there: (stop, its position, k)."""
    words = text.split(" ")
    assert words == [word(t) for t in ids]
    for k in range(2, len(words) - 2):
        stop = words[k][-1] + " " + words[k + 1][:2]  # e.g. "7 w1"
        boundary = len(" ".join(words[: k + 1]))
        if text.find(stop) == boundary - 1:
            return stop, boundary - 1, k
    raise AssertionError("no suitable stop string")


def test_stop_string_across_token_boundary(tiny):
    _, _, llm = tiny
    prompt = random_prompt(8, seed=3)
    ids, text = greedy_run(llm, prompt)
    stop, pos, k = _boundary_stop(ids, text)
    params = dict(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    out = generate_one(llm, prompt, **params).outputs[0]
    assert out.text == text[:pos]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # Generation stopped at the token completing the stop string; it stays in token_ids.
    assert out.token_ids == ids[: k + 2]
    out = generate_one(llm, prompt, **params, include_stop_str_in_output=True).outputs[0]
    assert out.text == text[: pos + len(stop)] and out.token_ids == ids[: k + 2]
    # The earliest of several stop strings wins, whatever their order.
    late = " ".join(text.split(" ")[k + 3 : k + 5])
    out = generate_one(llm, prompt, **{**params, "stop": [late, stop]}).outputs[0]
    assert out.stop_reason == stop and out.text == text[:pos]
    # A stop string ended sequence is aborted in the core: its blocks are freed.
    assert_engine_idle(llm)


def test_stop_string_waits_for_min_tokens(tiny):
    _, _, llm = tiny
    prompt = random_prompt(8, seed=3)
    ids, text = greedy_run(llm, prompt)
    stop, pos, k = _boundary_stop(ids, text)
    # The stop string is completed by token k + 2: with min_tokens = k + 2 it does not count yet.
    out = generate_one(
        llm, prompt, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], min_tokens=k + 2
    ).outputs[0]
    assert out.token_ids == ids and out.finish_reason == "length" and out.text == text
    out = generate_one(
        llm, prompt, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], min_tokens=k + 1
    ).outputs[0]
    assert out.token_ids == ids[: k + 2] and out.finish_reason == "stop"
    # Text of the first min_tokens tokens is never searched, even next to a longer stop string.
    first = text.split(" ")[0]
    assert text.find(first, 1) == -1
    out = generate_one(
        llm, prompt, temperature=0, max_tokens=16, ignore_eos=True, stop=["x" * 12, first], min_tokens=1
    ).outputs[0]
    assert out.token_ids == ids and out.finish_reason == "length" and out.text == text


def test_stop_token_ids(tiny):
    _, _, llm = tiny
    prompt = random_prompt(6, seed=4)
    ids, _ = greedy_run(llm, prompt)
    index = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    params = dict(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[ids[index], 299])
    out = generate_one(llm, prompt, **params).outputs[0]
    assert out.token_ids == ids[: index + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ids[index]
    # The stop token is in token_ids but not in the text, unless asked for (as vLLM).
    assert out.text == " ".join(word(t) for t in ids[:index])
    out = generate_one(llm, prompt, **params, include_stop_str_in_output=True).outputs[0]
    assert out.text == " ".join(word(t) for t in ids[: index + 1])
    # Stop tokens are masked until min_tokens tokens are out.
    out = generate_one(llm, prompt, **params, min_tokens=index + 1).outputs[0]
    assert ids[index] not in out.token_ids[: index + 1] and len(out.token_ids) > index + 1


@pytest.fixture(scope="module")
def eos_model(tiny, tmp_path_factory):
    """The same weights with an ordinary word as eos: one the greedy continuation of PROMPT emits."""
    hf, path, llm = tiny
    prompt = random_prompt(7, seed=5)
    ids, _ = greedy_run(llm, prompt)
    index = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    directory = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(path, directory)
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = ids[index]
    (directory / "config.json").write_text(json.dumps(config))
    return hf, make_llm(str(directory)), prompt, ids, index


def test_eos_stops_unless_ignored(eos_model):
    hf, llm, prompt, ids, index = eos_model
    eos = ids[index]
    assert eos in llm.engine.eos_token_ids and EOS in llm.engine.eos_token_ids
    out = generate_one(llm, prompt, temperature=0, max_tokens=16).outputs[0]
    assert out.token_ids == ids[: index + 1] == hf_greedy(hf, prompt, 16, eos_token_id=eos)
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == " ".join(word(t) for t in ids[:index])
    out = generate_one(llm, prompt, temperature=0, max_tokens=16, ignore_eos=True).outputs[0]
    assert out.token_ids == ids and out.finish_reason == "length"


@pytest.mark.parametrize("min_tokens", [1, 6, 12])
def test_min_tokens_masks_eos_like_transformers(eos_model, min_tokens):
    hf, llm, prompt, ids, index = eos_model
    eos = ids[index]
    out = generate_one(llm, prompt, temperature=0, max_tokens=16, min_tokens=min_tokens).outputs[0]
    expected = hf_greedy(hf, prompt, 16, eos_token_id=eos, min_new_tokens=min_tokens)
    assert out.token_ids == expected
    assert eos not in out.token_ids[:min_tokens]
    if min_tokens > index:  # the masked eos changed the continuation
        assert out.token_ids[index] != eos
    assert out.finish_reason == ("stop" if out.token_ids[-1] == eos else "length")


# ---------------------------------------------------------------------------------------------------
# Logprobs


def _check_logprob_entry(entry, chosen: int, ref: torch.Tensor, num_top: int) -> None:
    """One position's {id: Logprob} against the reference log-softmax row."""
    top = ref.topk(num_top).indices.tolist()
    assert list(entry)[:num_top] == top
    assert chosen in entry
    assert set(entry) == set(top) | {chosen}
    for position, token in enumerate(top, start=1):
        if token != chosen:
            assert entry[token].rank == position
    assert entry[chosen].rank == 1 + int((ref > ref[chosen]).sum())
    for token, logprob in entry.items():
        assert abs(logprob.logprob - ref[token].item()) < 1e-4
        assert logprob.decoded_token == word(token)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0, logprobs=5),
        dict(temperature=1.5, seed=3, logprobs=2),
        dict(temperature=1.5, seed=4, logprobs=0),
        dict(temperature=0.7, top_k=20, seed=5, logprobs=20),
    ],
)
def test_logprobs_match_transformers(tiny, params):
    hf, _, llm = tiny
    prompt = random_prompt(10, seed=6)
    out = generate_one(llm, prompt, max_tokens=12, ignore_eos=True, **params).outputs[0]
    ref = torch.log_softmax(hf_logits(hf, prompt + out.token_ids), dim=-1)[len(prompt) - 1 : -1]
    assert len(out.logprobs) == len(out.token_ids) == 12
    for i, (entry, chosen) in enumerate(zip(out.logprobs, out.token_ids, strict=True)):
        _check_logprob_entry(entry, chosen, ref[i], params["logprobs"])
    if params["temperature"] == 0:
        assert all(entry[t].rank == 1 for entry, t in zip(out.logprobs, out.token_ids, strict=True))
    expected_sum = sum(ref[i, t].item() for i, t in enumerate(out.token_ids))
    assert abs(out.cumulative_logprob - expected_sum) < 1e-3


@pytest.mark.parametrize("budget", [512, 5])
def test_prompt_logprobs_match_transformers(tiny_models, budget):
    hf, path = tiny_models("llama_gqa")
    llm = make_llm(path, max_num_batched_tokens=budget)
    prompt = random_prompt(17, seed=7)
    # Warm the prefix cache with the same prompt: a prompt-logprobs request must not skip positions.
    generate_one(llm, prompt, temperature=0, max_tokens=2)
    out = generate_one(llm, prompt, temperature=0, max_tokens=2, prompt_logprobs=3)
    ref = torch.log_softmax(hf_logits(hf, prompt), dim=-1)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        _check_logprob_entry(out.prompt_logprobs[p], prompt[p], ref[p - 1], 3)
    # prompt_logprobs=0: only the prompt token itself.
    out = generate_one(llm, prompt, temperature=0, max_tokens=1, prompt_logprobs=0)
    assert all(list(e) == [t] for e, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True))
    # A one-token prompt has nothing to score but the placeholder.
    assert generate_one(llm, [9], temperature=0, max_tokens=1, prompt_logprobs=2).prompt_logprobs == [None]


# ---------------------------------------------------------------------------------------------------
# Requests the engine cannot serve


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0), ("logprobs", 21), ("stop", [""])],
)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unservable_requests_raise_and_leave_nothing_behind(tiny_models):
    _, path = tiny_models("llama_gqa")
    llm = make_llm(path, max_model_len=32)
    assert llm.engine.max_model_len == 32
    ok = random_prompt(5, seed=8)
    cases = [
        ([random_prompt(40, seed=9)], SamplingParams(), "40 tokens.*at most 32"),
        ([random_prompt(32, seed=9)], SamplingParams(max_tokens=1), "32 tokens.*at most 32"),
        ([random_prompt(25, seed=9)], SamplingParams(max_tokens=10), "max_tokens=10.*at most 7"),
        ([[5, 300]], SamplingParams(), r"prompt token ids must be in \[0, 300\)"),
        ([{"prompt_token_ids": []}], SamplingParams(), "at least one token"),
        ([ok, ok], [SamplingParams()], "2 prompts"),
        # The first prompt is fine, the second is not: neither runs.
        ([ok, random_prompt(33, seed=9)], SamplingParams(), "at most 32"),
    ]
    for prompts, params, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
        assert_engine_idle(llm)
        assert not llm.engine.processor.requests
    # A prompt that fits with max_tokens=None generates to the end of the context.
    out = generate_one(llm, random_prompt(25, seed=9), temperature=0, max_tokens=None, ignore_eos=True)
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"


def test_kv_cache_size_bounds_the_context(tiny_models):
    _, path = tiny_models("llama_gqa")
    llm = make_llm(path, num_kv_blocks=5)  # 20 tokens, below the model's 256 positions
    assert llm.engine.max_model_len == 20
    with pytest.raises(ValueError, match="at most 20"):
        llm.generate([random_prompt(20, seed=10)], SamplingParams(), use_tqdm=False)
    out = generate_one(llm, random_prompt(12, seed=10), temperature=0, max_tokens=8, ignore_eos=True)
    assert len(out.outputs[0].token_ids) == 8


def test_duplicate_request_id_is_refused(tiny):
    _, _, llm = tiny
    engine = llm.engine
    engine.add_request("same", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("same", [7], SamplingParams(max_tokens=2))
    engine.abort("same")
    assert_engine_idle(llm)


def test_tokenizer_files_are_what_the_engine_reads(tiny):
    _, path, llm = tiny
    assert (Path(path) / "tokenizer.json").is_file()
    tokenizer = llm.get_tokenizer()
    assert tokenizer.encode("w5 w17") == [5, 17] and tokenizer.eos_token_id == EOS


def test_the_offline_engine_imports_no_transport():
    """Disaggregation lives behind a KV connector that the engine process builds: `from duoserve import
    LLM` loads no ZeroMQ."""
    code = "from duoserve import LLM; import sys; assert 'zmq' not in sys.modules, 'zmq was imported'"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_final_only_steps_return_each_request_once_finished(tiny):
    """LLM.generate's steps (`final_only`, vLLM's FINAL_ONLY): no output until a request ends, then the
    same one that stepping with every update gives last, stop strings included."""
    _, _, llm = tiny
    prompts = [random_prompt(6, seed=s) for s in (1, 2, 3)]
    _, text = greedy_run(llm, prompts[2])
    stop = text.split(" ")[3]  # ends the third request early, through the text
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, stop=[stop] if i == 2 else None)
        for i, n in enumerate((3, 9, 12))
    ]

    def run(final_only: bool) -> tuple[dict, int]:
        engine, last, count = llm.engine, {}, 0
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"final-{final_only}-{i}", prompt, p)
        while engine.has_unfinished():
            for out in engine.step(final_only=final_only):
                assert out.finished or not final_only
                count += out.finished
                last[out.request_id.rsplit("-", 1)[1]] = out
        return last, count

    every, _ = run(False)
    final, count = run(True)
    assert count == 3 and final.keys() == every.keys()
    for key, out in final.items():
        assert out.outputs[0].token_ids == every[key].outputs[0].token_ids
        assert out.outputs[0].text == every[key].outputs[0].text
        assert out.outputs[0].finish_reason == every[key].outputs[0].finish_reason
    assert final["2"].outputs[0].stop_reason == stop
    assert_engine_idle(llm)
