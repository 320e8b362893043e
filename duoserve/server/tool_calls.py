"""Tool calls read back from a chat reply's text, whole or as it streams.

How a request may call tools (vLLM's rules):
- `tool_choice: "auto"` (the default with tools): the model decides; a parser chosen with
  `--tool-call-parser` finds its calls in the text (`hermes`: `<tool_call>{"name", "arguments"}</tool_call>`
  blocks, as Hermes, Qwen 2.5 and 3 write them; `llama3_json`: a reply that is a `{"name", "parameters"}`
  object, or several separated by `;`, after an optional `<|python_tag|>`). It needs
  `--enable-auto-tool-choice`.
- `"required"`: the grammar makes the reply a JSON array of `{"name", "parameters"}` objects, one per call
  (one at most without parallel_tool_calls), whose parameters follow each function's schema.
- a named function: the grammar makes the reply that function's arguments object.
- `"none"`: the reply is text.

Each reader turns text into events, content text or (pieces of) calls, so a stream sends OpenAI's
`tool_calls` deltas as soon as a call is known (a named call's arguments as they are generated, other
calls once their JSON is complete), and a whole reply is the same events gathered.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from duoserve.server.protocol import APIError, ChatCompletionRequest, NamedToolChoice

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A piece of a call: the first one of a call has its id and name; arguments are JSON text."""

    index: int
    arguments: str
    name: str | None = None
    id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        item: dict[str, Any] = {"index": self.index, "function": function}
        if self.id is not None:
            item |= {"id": self.id, "type": "function"}
        return item


Event = str | CallDelta  # content text, or a piece of a call


class ToolReader(Protocol):
    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class _Calls:
    """Numbers whole calls as they are found; drops those past the first without parallel calls."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.count = 0

    def call(self, name: str, arguments: Any) -> list[Event]:
        if self.count and not self.parallel:
            return []
        self.count += 1
        return [CallDelta(self.count - 1, json.dumps(arguments, ensure_ascii=False), name, _call_id())]


def _as_call(obj: Any, arguments_keys: tuple[str, ...]) -> tuple[str, Any] | None:
    """(name, arguments) of a parsed call object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in arguments_keys:
        if key in obj:
            arguments = obj[key]
            if isinstance(arguments, str):  # some models write the arguments as a JSON string
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            return (obj["name"], arguments) if isinstance(arguments, dict) else None
    return obj["name"], {}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


class HermesReader:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks among content.

    Content streams as it comes, but for a tail that could be the start of `<tool_call>`; a block is one
    call event once its end tag arrives (a block the reply ends inside counts if its JSON is whole).
    A block that is not a call stays content, as written.
    """

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, parallel: bool) -> None:
        self._calls = _Calls(parallel)
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while True:
            if self._in_call:
                end = self._buffer.find(self.END)
                if end < 0:
                    return events
                events += self._block(self._buffer[:end], closed=True)
                self._buffer = self._buffer[end + len(self.END) :]
                self._in_call = False
            else:
                start = self._buffer.find(self.START)
                if start < 0:
                    keep = _partial_suffix(self._buffer, self.START)
                    events += self._content(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return events
                events += self._content(self._buffer[:start])
                self._buffer = self._buffer[start + len(self.START) :]
                self._in_call = True

    def finish(self) -> list[Event]:
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            return self._block(rest, closed=False)
        return self._content(rest)

    def _block(self, body: str, closed: bool) -> list[Event]:
        call = _as_call(_loads(body), ("arguments", "parameters"))
        if call is None:
            return self._content(self.START + body + (self.END if closed else ""))
        return self._calls.call(*call)

    def _content(self, text: str) -> list[Event]:
        # Whitespace between calls is layout, not a reply.
        if not text or (self._calls.count and not text.strip()):
            return []
        return [text]


class Llama3JsonReader:
    """Llama 3's JSON calls: the reply is `{"name": ..., "parameters": {...}}` (several separated by `;`),
    optionally after `<|python_tag|>`. A reply that starts otherwise is content, streamed as it comes;
    one that starts like a call is held until its end, then read as calls, or as content if it is not."""

    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, parallel: bool) -> None:
        self._calls = _Calls(parallel)
        self._text = ""
        self._mode: str | None = None  # "content" | "calls", once the reply's first characters tell

    def feed(self, text: str) -> list[Event]:
        if self._mode == "content":
            return [text] if text else []
        self._text += text
        head = self._text.lstrip()
        if not head or (self.PYTHON_TAG.startswith(head) and head != self.PYTHON_TAG):
            return []
        self._mode = "calls" if head.startswith(("{", self.PYTHON_TAG)) else "content"
        if self._mode == "content":
            text, self._text = self._text, ""
            return [text]
        return []

    def finish(self) -> list[Event]:
        text, self._text = self._text, ""
        if self._mode == "content":
            return [text] if text else []
        calls = _json_calls(text.strip().removeprefix(self.PYTHON_TAG))
        if calls is None:
            return [text] if text else []
        return [event for call in calls for event in self._calls.call(*call)]


def _json_calls(text: str) -> list[tuple[str, Any]] | None:
    """`{...}; {...}` as calls, or None when the text is anything else."""
    decoder, calls, position = json.JSONDecoder(), [], 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] == ";"):
            position += 1
        if position == len(text):
            return calls or None
        try:
            obj, position = decoder.raw_decode(text, position)
        except (json.JSONDecodeError, RecursionError):
            return None
        call = _as_call(obj, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)


class RequiredReader:
    """tool_choice "required": a JSON array of `{"name", "parameters"}`, each element one call as soon as
    its object closes. What does not read as calls (a reply cut by max_tokens) is returned as content."""

    def __init__(self) -> None:
        self._calls = _Calls(parallel=True)  # the grammar already bounds the count
        self._scan = _JsonScanner()
        self._text = ""
        self._element_start: int | None = None
        self._consumed = 0

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        start = len(self._text)
        self._text += text
        for i in range(start, len(self._text)):
            before = self._scan.depth
            self._scan.step(self._text[i])
            if before == 1 and self._scan.depth == 2:
                self._element_start = i
            elif before == 2 and self._scan.depth == 1 and self._element_start is not None:
                call = _as_call(_loads(self._text[self._element_start : i + 1]), ("parameters",))
                if call is not None:
                    events += self._calls.call(*call)
                    self._consumed = i + 1
                self._element_start = None
        return events

    def finish(self) -> list[Event]:
        rest = self._text[self._consumed :].strip().lstrip(",").strip()
        if self._calls.count and rest in ("]", ""):
            return []
        return [self._text[self._consumed :]] if self._text[self._consumed :] else []


@dataclass
class _JsonScanner:
    """Nesting depth of JSON text read one character at a time (brackets inside strings do not count)."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def step(self, char: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "[{":
            self.depth += 1
        elif char in "]}":
            self.depth -= 1


@dataclass
class NamedReader:
    """A named tool_choice: the whole reply is the arguments of that one call, streamed as they come."""

    name: str
    _id: str = field(default_factory=_call_id)
    _started: bool = False

    def feed(self, text: str) -> list[Event]:
        if not text and self._started:
            return []
        first = not self._started
        self._started = True
        return [CallDelta(0, text, self.name if first else None, self._id if first else None)]

    def finish(self) -> list[Event]:
        return self.feed("") if not self._started else []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


@dataclass
class ToolCalling:
    """How one chat request's replies are read for calls: the mode and, for "auto", the parser."""

    mode: str  # "auto" | "required" | "named"
    parser: str | None = None
    function: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, request: ChatCompletionRequest, parser: str | None, auto_enabled: bool) -> ToolCalling | None:
        """None when the reply is plain text; APIError 400 for "auto" on a server not set up for it."""
        choice = request.effective_tool_choice
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            return cls("named", function=choice.function.name)
        if choice == "required":
            return cls("required")
        if not auto_enabled or parser is None:
            raise APIError(
                400,
                '"auto" tool choice needs a server started with --enable-auto-tool-choice and '
                '--tool-call-parser (or send tool_choice "none", "required" or a named function)',
                "tool_choice",
            )
        return cls("auto", parser=parser, parallel=request.parallel_tool_calls)

    def reader(self) -> ToolReader:
        if self.mode == "named":
            return NamedReader(self.function)
        if self.mode == "required":
            return RequiredReader()
        return HermesReader(self.parallel) if self.parser == "hermes" else Llama3JsonReader(self.parallel)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """OpenAI's "tool_calls" when the model called tools (vLLM's rule: a named call stays "stop")."""
        if called and (self.mode == "auto" or (self.mode == "required" and reason == "stop")):
            return "tool_calls"
        return reason

    def message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole reply's assistant message (content and tool_calls) and its finish_reason."""
        reader = self.reader()
        events = reader.feed(text) + reader.finish()
        content = "".join(e for e in events if isinstance(e, str))
        calls: dict[int, dict[str, Any]] = {}
        for e in events:
            if isinstance(e, CallDelta):
                call = calls.setdefault(
                    e.index, {"id": e.id, "type": "function", "function": {"name": e.name}}
                )
                call["function"]["arguments"] = call["function"].get("arguments", "") + e.arguments
        message = {
            "role": "assistant",
            "content": content if content.strip() or not calls else None,
            "refusal": None,
            "tool_calls": [calls[i] for i in sorted(calls)],
        }
        return message, self.finish_reason(reason, bool(calls))
