"""Structured outputs, tool calls and logit_bias through the official openai SDK, against a real server on a
tiny random byte-level model: every constrained reply validates, streamed and not, with n > 1; forced tool
calls parse and follow their function's parameters; bad constraints are 400s naming the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import msgspec
import openai
import pytest

from duoserve.sampling_params import SamplingParams, StructuredOutputsParams
from duoserve.server.engine_messages import AddRequest
from duoserve.server.worker_protocol import add_request_decoder, encode
from duoserve.tokenizer import load_tokenizer
from tests.byte_model import byte_prompt
from tests.server.harness import ServerProcess, engine_flags

pytest.importorskip("transformers")

ENGINE = {"num_kv_blocks": 512, "block_size": 8, "attention_backend": "torch"}  # no C++ kernel to build
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.fixture(scope="module")
def server(byte_model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    flags = [*engine_flags(**ENGINE), "--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    process = ServerProcess(byte_model_dir, log_path, flags).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def chat(client, server, **kwargs):
    messages = kwargs.pop(
        "messages", [{"role": "user", "content": byte_prompt(kwargs.pop("prompt_seed", 0))}]
    )
    return client.chat.completions.create(model=server.model, messages=messages, **kwargs)


def test_json_schema_response_format_validates_over_many_seeds(client, server):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    finished = []
    for seed in range(4):
        response = chat(
            client, server, response_format=response_format, n=6, seed=seed, max_tokens=150, prompt_seed=seed
        )
        finished += [c.message.content for c in response.choices if c.finish_reason == "stop"]
    assert len(finished) >= 18
    for text in finished:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(finished)) > 6


def test_json_object_and_vllm_structured_outputs_streamed(client, server):
    stream = chat(
        client, server, response_format={"type": "json_object"}, n=3, seed=1, max_tokens=150, stream=True
    )
    texts, reasons = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    for index, text in texts.items():
        if reasons[index] == "stop":
            assert isinstance(json.loads(text), dict)
    # vLLM's field on the completions route, streamed: a regex, then a choice.
    pattern = r"[a-f]{3}@\d{2}"
    args = dict(model=server.model, prompt=byte_prompt(3), max_tokens=20, n=4, seed=2)
    for constraint, check in [
        ({"regex": pattern}, lambda t: re.fullmatch(pattern, t)),
        ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ]:
        outs: dict[int, str] = {}
        for chunk in client.completions.create(
            **args, stream=True, extra_body={"structured_outputs": constraint}
        ):
            for c in chunk.choices:
                outs[c.index] = outs.get(c.index, "") + c.text
        assert len(outs) == 4 and all(check(t) for t in outs.values()), outs


def validate_calls(calls, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_calls_parse_and_validate(client, server):
    # JSON allows any whitespace between tokens (vLLM's default), which a random model is fond of: a few
    # replies run to max_tokens; every one that ends is whole.
    response = chat(client, server, tools=TOOLS, tool_choice="required", n=6, seed=3, max_tokens=400)
    done = [c for c in response.choices if c.finish_reason == "tool_calls"]
    assert len(done) >= 3
    assert all(c.finish_reason in ("tool_calls", "length") for c in response.choices)
    for choice in done:
        validate_calls(choice.message.tool_calls, set(SCHEMAS))
    single = chat(
        client,
        server,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=4,
        seed=4,
        max_tokens=400,
    )
    assert all(len(c.message.tool_calls) == 1 for c in single.choices if c.finish_reason == "tool_calls")


def stream_calls(stream) -> tuple[dict[int, dict[int, dict]], dict[int, str]]:
    """Tool-call deltas merged per choice and call index (as the SDK's accumulate does), and the finish
    reasons."""
    calls: dict[int, dict[int, dict]] = {}
    reasons = {}
    for chunk in stream:
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                call = calls.setdefault(c.index, {}).setdefault(delta.index, {"arguments": ""})
                if delta.id:
                    call.update(id=delta.id, name=delta.function.name)
                call["arguments"] += delta.function.arguments or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return calls, reasons


def test_forced_tool_calls_streamed(client, server):
    stream = chat(
        client, server, tools=TOOLS, tool_choice="required", n=3, seed=5, max_tokens=400, stream=True
    )
    calls, reasons = stream_calls(stream)
    assert sum(r == "tool_calls" for r in reasons.values()) >= 2
    for index, reason in reasons.items():
        if reason == "tool_calls":
            for call in calls[index].values():
                jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = chat(client, server, tools=TOOLS, tool_choice=named, n=3, seed=6, max_tokens=400, stream=True)
    calls, reasons = stream_calls(stream)
    for index, reason in reasons.items():
        (call,) = calls[index].values()
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        if reason == "stop":
            jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    response = chat(client, server, tools=TOOLS, tool_choice=named, seed=6, max_tokens=400)
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and response.choices[0].message.content is None


def test_tools_reach_the_template_and_auto_replies_are_read(client, server):
    messages = [{"role": "user", "content": byte_prompt(0)}]
    with_tools = chat(
        client, server, messages=messages, tools=TOOLS, max_tokens=8, seed=1
    )  # tool_choice auto
    tokenizer = load_tokenizer(server.model)
    expected = tokenizer.encode(
        tokenizer.apply_chat_template(messages, tools=TOOLS), add_special_tokens=False
    )
    assert "tools: get_weather add" in tokenizer.apply_chat_template(messages, tools=TOOLS)
    assert with_tools.usage.prompt_tokens == len(expected)
    assert with_tools.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # A conversation that called a tool and got its result back renders and runs.
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    assert chat(client, server, messages=messages, tools=TOOLS, max_tokens=4).choices[0].finish_reason


def test_auto_tool_calls_are_read_by_the_hermes_parser(client, server):
    """A random model never writes a call by itself: a regex makes it write Hermes blocks, which the
    server's --tool-call-parser hermes reads back, whole and streamed."""
    call = r'<tool_call>\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}</tool_call>'
    extra = {"structured_outputs": {"regex": f"(ok )?{call}({call})?"}}
    response = chat(client, server, tools=TOOLS, n=3, seed=2, max_tokens=120, extra_body=extra)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content in (None, "ok ")
        validate_calls(choice.message.tool_calls, {"add"})
    stream = chat(client, server, tools=TOOLS, n=3, seed=2, max_tokens=120, extra_body=extra, stream=True)
    calls, reasons = stream_calls(stream)
    assert set(reasons.values()) == {"tool_calls"}
    for index, choice in enumerate(response.choices):  # seeded: the same calls as the whole replies
        got = [(c["name"], c["arguments"]) for c in calls[index].values()]
        assert got == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_logit_bias(client, server):
    # Byte 62 (">") is token 65 of the byte-level vocabulary.
    response = client.completions.create(
        model=server.model, prompt=byte_prompt(2), max_tokens=5, temperature=0, logit_bias={"65": 100}
    )
    assert response.choices[0].text == ">>>>>"


@pytest.mark.parametrize(
    ("route", "body", "param", "words"),
    [
        (
            "chat",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
            "response_format",
            ["json"],
        ),
        ("chat", {"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
        ("chat", {"response_format": {"type": "xml"}}, "response_format.type", []),
        ("completions", {"structured_outputs": {"regex": "(a"}}, "structured_outputs", ["regex"]),
        (
            "completions",
            {"structured_outputs": {"grammar": "start: nope"}},
            "structured_outputs",
            ["grammar"],
        ),
        (
            "completions",
            {"structured_outputs": {"json": {}, "choice": ["a"]}},
            "structured_outputs",
            ["exactly one"],
        ),
        ("completions", {"logit_bias": {"x": 1}}, "logit_bias", ["integer"]),
        ("completions", {"logit_bias": {"5": 101}}, "logit_bias", ["[-100.0, 100.0]"]),
        ("completions", {"logit_bias": {"100000": 1}}, None, ["logit_bias", "vocabulary"]),
        (
            "chat",
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            ["nope"],
        ),
        ("chat", {"tool_choice": "required"}, "tool_choice", ["needs tools"]),
        (
            "chat",
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
            [],
        ),
        (
            "chat",
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            ["only one"],
        ),
        (
            "chat",
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            },
            "tool_choice",
            ["json"],
        ),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", ["tool_call_id"]),
    ],
)
def test_bad_constraints_are_400_naming_the_problem(client, server, route, body, param, words):
    import httpx

    base = {"model": server.model, "max_tokens": 4}
    if route == "chat":
        url, base = "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": "hi"}]}
    else:
        url, base = "/v1/completions", {**base, "prompt": "hi"}
    response = httpx.post(f"{server.base_url}{url}", json={**base, **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error["message"]


def test_the_router_forwards_the_constraint():
    """What a router sends a worker (AddRequest as msgpack) carries the constraint and the bias."""
    params = SamplingParams(structured_outputs={"json": PERSON}, logit_bias={5: -3.5})
    add = AddRequest("r", ["r"], [1, 2, 3], [params], [2])
    decoded = add_request_decoder.decode(encode(add))
    (got,) = decoded.params
    assert isinstance(got.structured_outputs, StructuredOutputsParams)
    assert got.structured_outputs.json == PERSON and got.logit_bias == {5: -3.5}
    bad = msgspec.msgpack.encode(
        {**msgspec.to_builtins(add), "params": [{"structured_outputs": {"regex": "(a"}}]}
    )
    with pytest.raises(msgspec.ValidationError, match="regex"):
        add_request_decoder.decode(bad)
