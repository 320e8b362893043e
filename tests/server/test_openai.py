"""The server through the official openai SDK (sync and async, streamed and not, chat and completions),
checked token for token against the offline `LLM` on the same model."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from duoserve.tokenizer import load_tokenizer
from tests.helpers import random_prompt
from tests.server.harness import ENGINE_ARGS

pytest.importorskip("transformers")

# Extras vLLM accepts in the body: no eos (random weights may emit it any time), token ids in logprobs.
IDS = {"ignore_eos": True, "return_tokens_as_token_ids": True}
MESSAGES = [
    {"role": "system", "content": "w10 w11"},
    {"role": "user", "content": "w12 w13 w14"},
    {"role": "assistant", "content": "w15"},
    {"role": "user", "content": "w16 w17"},
]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model=model_dir, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def token_ids(tokens: list[str]) -> list[int]:
    """Tokens rendered as 'token_id:N' (return_tokens_as_token_ids) back to ids."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


def offline(llm: LLM, prompt, **params):
    (output,) = llm.generate([prompt], SamplingParams(**params), use_tqdm=False)
    return output


def test_models_lists_the_served_model(client, server):
    (model,) = client.models.list().data
    assert model.id == server.model
    assert model.model_extra["max_model_len"] == 256


def test_greedy_completion_streamed_equals_non_streamed_and_offline(client, server, llm):
    prompt = random_prompt(12, seed=1)
    expected = offline(llm, prompt, temperature=0, max_tokens=24, ignore_eos=True).outputs[0]
    args = dict(model=server.model, prompt=prompt, max_tokens=24, temperature=0, logprobs=0, extra_body=IDS)

    response = client.completions.create(**args)
    (choice,) = response.choices
    assert choice.text == expected.text
    assert token_ids(choice.logprobs.tokens) == expected.token_ids
    assert choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (12, 24)

    text, ids, finish, usage = "", [], None, None
    for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.text
            ids += token_ids(c.logprobs.tokens) if c.logprobs else []
            finish = c.finish_reason or finish
    assert (text, ids, finish) == (expected.text, expected.token_ids, "length")
    assert usage.completion_tokens == 24 and usage.total_tokens == 36


def test_greedy_chat_streamed_equals_non_streamed_and_offline(server, llm):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    (expected,) = llm.chat(MESSAGES, params, use_tqdm=False)
    completion = expected.outputs[0]
    args = dict(model=server.model, messages=MESSAGES, max_completion_tokens=16, temperature=0)

    async def run():
        async with async_client(server) as client:
            response = await client.chat.completions.create(
                **args, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}
            )
            chunks = [
                chunk
                async for chunk in await client.chat.completions.create(
                    **args, stream=True, extra_body={"ignore_eos": True}
                )
            ]
            return response, chunks

    response, chunks = asyncio.run(run())
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == completion.text
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    # Each entry: the chosen token and the 2 most likely ones, as the engine ranked them.
    entries = choice.logprobs.content
    assert [e.token for e in entries] == completion.text.split(" ")
    for entry, position in zip(entries, completion.logprobs, strict=True):
        assert [t.token for t in entry.top_logprobs] == [
            lp.decoded_token for lp in list(position.values())[:2]
        ]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == completion.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_and_several_prompts_stream_each_choice_by_index(server, llm):
    prompts = ["w5 w6 w7", "w8 w9"]
    args = dict(
        model=server.model, prompt=prompts, n=2, max_tokens=8, temperature=1.0, seed=7, extra_body=IDS
    )

    async def run():
        async with async_client(server) as client:
            response = await client.completions.create(**args)
            streamed: dict[int, str] = {}
            async for chunk in await client.completions.create(**args, stream=True):
                for c in chunk.choices:
                    streamed[c.index] = streamed.get(c.index, "") + c.text
            return response, streamed

    response, streamed = asyncio.run(run())
    # Choice index = prompt index * n + sequence index, as OpenAI and vLLM number them.
    texts = {c.index: c.text for c in response.choices}
    assert sorted(texts) == [0, 1, 2, 3] and streamed == texts
    for i, prompt in enumerate(prompts):
        expected = offline(llm, prompt, n=2, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
        assert [texts[i * 2], texts[i * 2 + 1]] == [c.text for c in expected.outputs]
    assert response.usage.completion_tokens == 4 * 8


def test_stop_strings_are_never_streamed_even_in_part(client, server, llm):
    prompt = random_prompt(6, seed=3)
    words = offline(llm, prompt, temperature=0, max_tokens=20, ignore_eos=True).outputs[0].text.split(" ")
    # Ends inside a token, so the stream must hold back the "... w" it has seen until the stop completes.
    stop = f"{words[5]} {words[6][:2]}"
    expected = offline(llm, prompt, temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]).outputs[0]
    assert expected.finish_reason == "stop" and stop not in expected.text

    args = dict(model=server.model, prompt=prompt, max_tokens=20, temperature=0, stop=[stop], extra_body=IDS)
    response = client.completions.create(**args)
    assert response.choices[0].text == expected.text
    assert (
        response.choices[0].finish_reason == "stop" and response.choices[0].model_extra["stop_reason"] == stop
    )
    pieces = [c.text for chunk in client.completions.create(**args, stream=True) for c in chunk.choices]
    assert "".join(pieces) == expected.text


def test_sampling_parameters_are_honoured(client, server, llm):
    """OpenAI's and vLLM's parameters reach the engine: the server samples exactly what LLM.generate does."""
    prompt = random_prompt(10, seed=4)
    openai_params = dict(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=11)
    vllm_params = dict(top_k=20, min_p=0.02, repetition_penalty=1.2, min_tokens=3, ignore_eos=True)
    expected = offline(llm, prompt, max_tokens=12, **openai_params, **vllm_params).outputs[0]
    response = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=12, **openai_params, extra_body=vllm_params
    )
    assert response.choices[0].text == expected.text

    # stop_token_ids: generation ends at the first of them, which is left out of the text.
    greedy = offline(llm, prompt, temperature=0, max_tokens=12, ignore_eos=True).outputs[0]
    stop_at = next(i for i, t in enumerate(greedy.token_ids) if i >= 2 and t not in greedy.token_ids[:i])
    response = client.completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={**IDS, "stop_token_ids": [greedy.token_ids[stop_at]]},
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == stop_at + 1
    assert response.choices[0].text == " ".join(greedy.text.split(" ")[:stop_at])


def test_tokenize_and_detokenize(server, model_dir):
    tokenizer = load_tokenizer(model_dir)
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        body = http.post("/tokenize", json={"prompt": "w5 w17 w200"}).json()
        assert body == {"count": 3, "max_model_len": 256, "tokens": tokenizer.encode("w5 w17 w200")}
        chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
        text = tokenizer.apply_chat_template(MESSAGES)
        assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
        assert http.post("/detokenize", json={"tokens": [5, 17, 200]}).json() == {"prompt": "w5 w17 w200"}


def test_metrics_use_vllm_names_and_meanings(client, server):
    long_prompt = random_prompt(40, seed=9)
    for _ in range(2):  # the second one finds the first one's prompt blocks in the prefix cache
        client.completions.create(model=server.model, prompt=long_prompt, max_tokens=5, extra_body=IDS)
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert m[f"duoserve:{name}"] == 0  # idle now
    assert m["duoserve:prefix_cache_queries_total"] >= 80
    assert m["duoserve:prefix_cache_hits_total"] >= 36  # 9 full blocks of 4 tokens
    assert m["duoserve:num_preemptions_total"] == 0
    assert m["duoserve:prompt_tokens_total"] >= 80 and m["duoserve:generation_tokens_total"] >= 10
    assert m['duoserve:request_success_total{finished_reason="length"}'] >= 2
    for histogram in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
    ):
        assert m[f"duoserve:{histogram}_count"] >= 2, histogram
        assert m[f'duoserve:{histogram}_bucket{{le="+Inf"}}'] == m[f"duoserve:{histogram}_count"]
    text = httpx.get(f"{server.base_url}/metrics").text
    assert f'model_name="{server.model}"' in text and "vllm:" not in text
