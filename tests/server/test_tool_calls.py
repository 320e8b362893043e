"""Tool calls read from reply text: whole, and streamed in any chunking, with the same result."""

from __future__ import annotations

import json

import pytest

from duoserve.server.protocol import ChatCompletionRequest
from duoserve.server.tool_calls import CallDelta, ToolCalling

HERMES_REPLY = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {"tz": "<CET>"}}</tool_call>'
)
LLAMA3_REPLY = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}'
)
REQUIRED_REPLY = (
    '[{"name": "get_weather", "parameters": {"city": "a]}\\"{"}}, {"name": "f", "parameters": {}}]'
)


def gather(calling: ToolCalling, chunks: list[str]) -> tuple[str, list[dict]]:
    """Content and calls from streamed chunks, merged as an OpenAI client does."""
    reader = calling.reader()
    events = [e for chunk in chunks for e in reader.feed(chunk)] + reader.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, CallDelta):
            call = calls.setdefault(e.index, {"id": e.id, "name": e.name, "arguments": ""})
            assert e.id is None or call["id"] == e.id
            call["arguments"] += e.arguments
    return content, [calls[i] for i in sorted(calls)]


def chunkings(text: str):
    yield [text]
    yield list(text)  # one character at a time
    yield [text[i : i + 5] for i in range(0, len(text), 5)]


@pytest.mark.parametrize("chunks", list(chunkings(HERMES_REPLY)), ids=["whole", "chars", "fives"])
def test_hermes_calls_whatever_the_chunking(chunks):
    content, calls = gather(ToolCalling("auto", parser="hermes"), chunks)
    assert content == "Let me look.\n"
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris", "unit": "C"}, {"tz": "<CET>"}]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]


def test_hermes_edge_cases():
    hermes = ToolCalling("auto", parser="hermes")
    # Text that only looks like the start of a tag is content once it is clearly not one.
    assert gather(hermes, ["a <tool", "_cal", "x> b"]) == ("a <tool_calx> b", [])
    # A block that is not a call stays content, as written.
    assert gather(hermes, ["<tool_call>not json</tool_call>"]) == ("<tool_call>not json</tool_call>", [])
    # A reply that ends inside a block with whole JSON (no end tag) is still a call.
    _, calls = gather(hermes, ['<tool_call>{"name": "f", "arguments": {"x": 1}}'])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("f", {"x": 1})]
    # Without parallel calls only the first counts.
    _, calls = gather(ToolCalling("auto", parser="hermes", parallel=False), [HERMES_REPLY])
    assert [c["name"] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("chunks", list(chunkings(LLAMA3_REPLY)), ids=["whole", "chars", "fives"])
def test_llama3_json_calls(chunks):
    content, calls = gather(ToolCalling("auto", parser="llama3_json"), chunks)
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("f", {}),
    ]


def test_llama3_json_plain_replies_stream_as_content():
    llama3 = ToolCalling("auto", parser="llama3_json")
    reader = llama3.reader()
    assert reader.feed("  Hel") == ["  Hel"]  # content from the first characters on, not held to the end
    assert reader.feed("lo") == ["lo"]
    assert gather(llama3, ['{"not": "a call"}']) == ('{"not": "a call"}', [])


@pytest.mark.parametrize("chunks", list(chunkings(REQUIRED_REPLY)), ids=["whole", "chars", "fives"])
def test_required_array_of_calls(chunks):
    content, calls = gather(ToolCalling("required"), chunks)
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": 'a]}"{'}),
        ("f", {}),
    ]


def test_required_cut_short_is_content():
    text = '[{"name": "f", "parameters": {"x": 1}}, {"name": "g", "param'
    content, calls = gather(ToolCalling("required"), [text])
    assert [c["name"] for c in calls] == ["f"]
    assert content == ', {"name": "g", "param'


def test_named_call_streams_its_arguments():
    named = ToolCalling("named", function="f")
    reader = named.reader()
    first, second = reader.feed('{"x"'), reader.feed(": 1}")
    assert first[0].name == "f" and first[0].id and first[0].arguments == '{"x"'
    assert second[0].name is None and second[0].id is None and second[0].arguments == ": 1}"
    message, reason = named.message('{"x": 1}', "stop")
    assert reason == "stop" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_messages_and_finish_reasons():
    hermes = ToolCalling("auto", parser="hermes")
    message, reason = hermes.message(HERMES_REPLY, "stop")
    assert (
        reason == "tool_calls" and message["content"] == "Let me look.\n" and len(message["tool_calls"]) == 2
    )
    message, reason = hermes.message("just text", "length")
    assert (message["content"], message["tool_calls"], reason) == ("just text", [], "length")
    assert ToolCalling("required").finish_reason("stop", called=True) == "tool_calls"
    assert ToolCalling("required").finish_reason("length", called=True) == "length"


def request(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "g"}},
]


def test_which_requests_read_calls():
    assert ToolCalling.of(request(), "hermes", True) is None
    assert ToolCalling.of(request(tools=TOOLS, tool_choice="none"), "hermes", True) is None
    assert ToolCalling.of(request(tools=TOOLS), "hermes", True).mode == "auto"  # the default with tools
    assert ToolCalling.of(request(tools=TOOLS, tool_choice="required"), None, False).mode == "required"
    named = {"type": "function", "function": {"name": "g"}}
    assert ToolCalling.of(request(tools=TOOLS, tool_choice=named), None, False).function == "g"
    with pytest.raises(Exception, match="enable-auto-tool-choice"):
        ToolCalling.of(request(tools=TOOLS), None, False)


def test_forced_calls_become_grammars():
    params = request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False).to_sampling_params()
    schema = params.structured_outputs.json
    assert schema["maxItems"] == 1 and schema["minItems"] == 1
    assert [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]] == [["f"], ["g"]]
    named = {"type": "function", "function": {"name": "f"}}
    assert request(tools=TOOLS, tool_choice=named).to_sampling_params().structured_outputs.json == {
        "type": "object"
    }
    assert request(tools=TOOLS, tool_choice="auto").to_sampling_params().structured_outputs is None
