"""LoRA adapters through the server and the official openai SDK: listed in /v1/models, chosen by
`model`, loaded and unloaded at run time (when allowed), and the errors of unknown or bad adapters;
outputs checked token for token against transformers + peft."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from duoserve.config import EngineConfig
from duoserve.disagg.kv_events import prompt_block_hashes
from duoserve.kv.block_pool import ROOT_HASH
from duoserve.lora.request import prefix_root_hash
from duoserve.router.router import RouterClient
from duoserve.router.routing import RouterConfig
from duoserve.sampling_params import SamplingParams
from duoserve.server.api import build_app
from duoserve.server.engine_client import EngineClient
from duoserve.server.settings import RUNTIME_LORA_ENV, ServerSettings
from tests.helpers import hf_greedy, random_prompt
from tests.lora.adapters import ALL_TARGETS, peft_adapter

pytest.importorskip("peft")

MAX_TOKENS = 5
BODY = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    """name -> (directory, greedy reference model) for adapters of the server's model (llama_gqa)."""
    hf, _ = tiny_models("llama_gqa")
    root = tmp_path_factory.mktemp("server-adapters")
    made = {}
    for name, targets, rank, seed in (("a", ALL_TARGETS, 4, 1), ("b", ["q_proj", "down_proj"], 8, 2)):
        model = peft_adapter(hf, root / name, targets, r=rank, alpha=2 * rank, seed=seed)
        made[name] = (str(root / name), model.get_base_model())
    peft_adapter(hf, root / "too_big", ["q_proj"], r=16, alpha=16, seed=3)  # past --max-lora-rank 8
    made[None] = (None, hf)
    made["too_big"] = (str(root / "too_big"), None)
    return made


@pytest.fixture(scope="module")
def server(start_server, adapters):
    return start_server(
        "--enable-lora",
        "--allow-runtime-lora-updating",
        "--lora-modules",
        f"a={adapters['a'][0]}",
        max_loras=2,
        max_lora_rank=8,
    )


def _client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


async def _complete(client: openai.AsyncOpenAI, model: str, prompt: list[int]) -> list[int]:
    response = await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0, extra_body=BODY
    )
    assert response.model == model
    return [int(t.removeprefix("token_id:")) for t in response.choices[0].logprobs.tokens]


def test_models_lists_adapters_with_the_base_model_as_parent(server, model_dir, adapters):
    models = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused").models.list().data
    assert [m.id for m in models] == [model_dir, "a"]
    assert models[1].parent == model_dir and models[1].root == adapters["a"][0]


def test_concurrent_requests_on_base_and_adapters_match_peft(server, model_dir, adapters):
    assert (
        _post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": adapters["b"][0]}).status_code
        == 200
    )
    names = [None, "a", "b", "a", "b", None]
    prompts = [random_prompt(7 + i, seed=30 + i) for i in range(len(names))]

    async def run():
        client = _client(server)
        return await asyncio.gather(
            *(_complete(client, name or model_dir, p) for name, p in zip(names, prompts, strict=True))
        )

    outputs = asyncio.run(run())
    for name, prompt, tokens in zip(names, prompts, outputs, strict=True):
        assert tokens == hf_greedy(adapters[name][1], prompt, MAX_TOKENS), name
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "b"}).status_code == 200


def test_unknown_model_is_404_with_an_openai_body(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="w5 w6", max_tokens=2)
    assert caught.value.body["param"] == "model" and "`a`" in caught.value.body["message"]


def test_runtime_load_and_unload(server, adapters):
    path = adapters["b"][0]
    loaded = _post(server, "/v1/load_lora_adapter", {"lora_name": "b2", "lora_path": path})
    assert loaded.status_code == 200 and "b2" in loaded.text
    models = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    assert {m["id"]: m["parent"] for m in models}["b2"] == models[0]["id"]
    again = _post(server, "/v1/load_lora_adapter", {"lora_name": "b2", "lora_path": path})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "b2"}).status_code == 200
    gone = _post(server, "/v1/completions", {"model": "b2", "prompt": "w5", "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    missing = _post(server, "/v1/unload_lora_adapter", {"lora_name": "b2"})
    assert missing.status_code == 404 and "cannot be found" in missing.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"lora_name": "c", "lora_path": "TOO_BIG"}, "rank 16 is larger than --max-lora-rank 8"),
        ({"lora_name": "c", "lora_path": "/no/such/adapter"}, "no adapter_config.json there"),
        ({"lora_name": "c"}, "lora_path"),
        ({"lora_name": 3, "lora_path": "x"}, "lora_name"),
    ],
)
def test_bad_adapters_are_400_and_change_nothing(server, adapters, body, message):
    if body.get("lora_path") == "TOO_BIG":
        body = {**body, "lora_path": adapters["too_big"][0]}
    response = _post(server, "/v1/load_lora_adapter", body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert [m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]][1:] == ["a"]


def test_runtime_routes_exist_only_when_allowed(model_dir, monkeypatch):
    client = EngineClient(EngineConfig(model=model_dir))
    monkeypatch.delenv(RUNTIME_LORA_ENV, raising=False)
    paths = {route.path for route in build_app(client, ServerSettings()).routes}
    assert "/v1/load_lora_adapter" not in paths and "/v1/unload_lora_adapter" not in paths
    monkeypatch.setenv(RUNTIME_LORA_ENV, "true")
    paths = {route.path for route in build_app(client, ServerSettings()).routes}
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= paths


def test_a_router_passes_the_adapter_through_and_indexes_its_blocks_on_the_adapter_chain(
    server, model_dir, adapters
):
    """A router learns the worker's adapters, sends a request's adapter with it, and its KV index holds
    the blocks the worker's events report on that adapter's chain (never on the base model's)."""
    loop = asyncio.new_event_loop()
    client = RouterClient(model_dir, RouterConfig(decode_urls=[server.base_url], health_interval=0.2))
    try:
        loop.run_until_complete(client.start())
        lora = client.lora_adapters()["a"]
        assert lora.lora_path == adapters["a"][0]
        prompt = random_prompt(13, seed=50)
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)

        async def generate():
            stream = await client.add_request("via-router", None, prompt, params, lora_request=lora)
            return [output async for output in client.outputs(stream)][-1]

        output = loop.run_until_complete(generate())
        tokens = output.outputs[0].token_ids
        assert tokens == hf_greedy(adapters["a"][1], prompt, MAX_TOKENS)
        # The worker computed 17 of the 18 tokens: 4 full blocks of 4, the last one past the prompt
        # (only the worker's events can tell the router about it).
        block_size = client.info.block_size
        chain = prompt_block_hashes(prompt + tokens, block_size, prefix_root_hash(lora, ROOT_HASH))

        async def indexed() -> None:  # the router's event subscription runs on its loop: wait there
            async with asyncio.timeout(60):
                while client.index.overlap(server.base_url, chain) != 4:
                    await asyncio.sleep(0.02)

        loop.run_until_complete(indexed())
        assert client.index.overlap(server.base_url, prompt_block_hashes(prompt, block_size)) == 0
    finally:
        loop.run_until_complete(client.shutdown())
        loop.close()
