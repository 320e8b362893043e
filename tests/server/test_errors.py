"""Bad input gets a 4xx with an OpenAI-style error body naming the problem, never a 500 or a hang;
and with --api-key every route but /health needs the key."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers import random_prompt

API_KEY = "test-key-123"
MAX_BODY = 65536


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-request-bytes", str(MAX_BODY), api_key=API_KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as client:
        yield client


def completion(server, **body) -> dict:
    return {"model": server.model, "prompt": "w5 w6", "max_tokens": 4, **body}


def chat(server, **body) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 4, **body}


def assert_error(response: httpx.Response, status: int, *words: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param


def test_malformed_bodies(http):
    raw = {"content-type": "application/json"}
    assert_error(http.post("/v1/completions", content=b"{not json", headers=raw), 400, "not valid JSON")
    assert_error(http.post("/v1/completions", content=b'["a list"]', headers=raw), 400, "JSON object")
    bad_utf8 = b'{"prompt": "w5 \xff\xfe", "max_tokens": 2}'
    assert_error(http.post("/v1/completions", content=bad_utf8, headers=raw), 400, "UTF-8")
    assert_error(http.post("/v1/chat/completions", content=b"", headers=raw), 400, "JSON")
    deep = b"[" * 5000 + b"]" * 5000  # past the JSON parser's recursion limit
    assert_error(http.post("/v1/completions", content=deep, headers=raw), 400, "nested")


def test_oversized_body_is_413(http, server):
    body = completion(server, prompt="w5 " * (MAX_BODY // 3))
    assert_error(http.post("/v1/completions", json=body), 413, str(MAX_BODY))


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        ("/v1/completions", {"temperature": "hot"}, "temperature", ["valid number"]),
        ("/v1/completions", {"max_tokens": 2.5}, "max_tokens", ["valid integer"]),
        ("/v1/completions", {"n": True}, "n", ["valid integer"]),
        ("/v1/completions", {"prompt": [1, "two"]}, "prompt", ["token ids"]),
        ("/v1/completions", {"prompt": None}, "prompt", []),
        ("/v1/completions", {"stop": 5}, "stop", ["string"]),
        ("/v1/completions", {"logprobs": 21}, "logprobs", ["20"]),
        ("/v1/completions", {"top_p": 2.0}, "top_p", ["top_p must be in (0, 1]"]),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens", ["max_tokens must be >= 1"]),
        ("/v1/completions", {"echo": True}, "echo", ["not supported"]),
        ("/v1/completions", {"suffix": "w9"}, "suffix", ["not supported"]),
        ("/v1/completions", {"best_of": 3}, "best_of", ["not supported"]),
        ("/v1/completions", {"logit_bias": {"five": 1.0}}, "logit_bias", ["integer"]),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
        ("/v1/completions", {"seed": 2**70}, "seed", ["less than or equal"]),
        ("/v1/completions", {"max_tokens": 2**70}, None, ["out of range"]),
        ("/v1/completions", {"stop_token_ids": [5, 2**70]}, None, ["out of range"]),
        ("/v1/chat/completions", {"messages": []}, "messages", []),
        (
            "/v1/chat/completions",
            {"chat_template_kwargs": {"messages": 1}},
            "chat_template_kwargs",
            ["messages"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "function", "content": "x"}]},
            "messages[0].role",
            [],
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", []),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema"}},
            "response_format",
            ["json_schema"],
        ),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0].function", ["required"]),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", ["logprobs"]),
    ],
)
def test_invalid_parameters_are_400_naming_the_field(http, server, route, body, param, words):
    make = completion if route == "/v1/completions" else chat
    # A request that fails never starts a stream: a 400 JSON body either way.
    for stream in [False] if "stream_options" in body else [False, True]:
        response = http.post(route, json=make(server, stream=stream, **body))
        assert_error(response, 400, *words, param=param)
        assert response.headers["content-type"] == "application/json"


def test_requests_the_engine_cannot_fit_are_400(http, server):
    too_long = random_prompt(300, seed=1)  # the context holds 256 tokens
    assert_error(
        http.post("/v1/completions", json=completion(server, prompt=too_long)), 400, "300 tokens", "256"
    )
    fits = completion(server, prompt=random_prompt(10, seed=2), max_tokens=500)
    assert_error(http.post("/v1/completions", json=fits), 400, "max_tokens=500", "at most 246")
    out_of_vocab = completion(server, prompt=[5, 6, 100000])
    assert_error(http.post("/v1/completions", json=out_of_vocab), 400, "token ids")
    assert_error(http.post("/v1/completions", json=completion(server, prompt="")), 400, "at least one token")
    assert_error(http.post("/detokenize", json={"tokens": [5, 100000]}), 400, "tokens", param="tokens")


def test_unknown_model_route_and_method(http, server):
    assert_error(
        http.post("/v1/completions", json=completion(server, model="gpt-4")), 404, "gpt-4", param="model"
    )
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_openai_sdk_sees_the_errors(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "w5"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}},
        )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="w5")


def test_api_key_is_required_on_every_route_but_health(server):
    base = server.base_url
    assert httpx.get(f"{base}/health").status_code == 200
    for path in ("/ready", "/metrics", "/v1/models"):
        assert_error(httpx.get(f"{base}{path}"), 401, "API key")
        assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{base}{path}", headers=server.headers).status_code == 200
    assert httpx.post(f"{base}/v1/completions", json=completion(server)).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_the_server_is_still_well_after_all_that(http, server):
    response = http.post("/v1/completions", json=completion(server, max_tokens=3))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3
    assert "Traceback" not in server.log() and " 500" not in server.log()
