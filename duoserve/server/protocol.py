"""The OpenAI wire format: request models, validation errors that name the field, and the mapping of a
request's parameters onto SamplingParams.

Validation is strict (a string is not a number, 2.0 is not an integer), unknown fields are ignored
with a warning as vLLM does, and parameters the engine cannot honour are refused with a 400 rather
than silently dropped.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from duoserve.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

# OpenAI's own cap on n; it also bounds how many sequences one HTTP request can fan out to.
MAX_N = 128


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    _TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "internal_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        error_type = self._TYPES.get(self.status, "invalid_request_error")
        info = ErrorInfo(message=self.message, type=error_type, param=self.param, code=self.status)
        return ErrorResponse(error=info).model_dump()


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error body (what /openapi.json documents for each 4xx/5xx)."""

    error: ErrorInfo


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


# What the plain validators below accept, spelled as types only so that /openapi.json shows it: the
# validators themselves give the errors their messages ("must be a string or a list of strings").
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptInput = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | _TokenIds
    | Annotated[list[_TokenIds], Field(min_length=1)]
)
StopInput = str | list[str] | None


class TextContentPart(BaseModel):
    """A chat content part; only text parts are accepted (described here, checked in ChatMessage)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


ContentInput = str | list[TextContentPart] | None


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Parameters both endpoints share: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json, regex, choice, grammar or json_object

    @field_validator("stop", mode="plain", json_schema_input_type=StopInput)
    @classmethod
    def _stop(cls, value: Any) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("must be a string or a list of strings")

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options can only be set when stream is true", "stream_options")
        if self.model_extra:
            logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        structured_outputs: dict[str, Any] | None = None,
        source: str = "structured_outputs",
    ) -> SamplingParams:
        """SamplingParams of this request; unset OpenAI parameters take OpenAI's defaults.

        `structured_outputs`: the constraint, when the request has one; `source` names the request field it
        came from, for errors (chat requests also make one from response_format or tool_choice).
        """
        values: dict[str, Any] = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": self.logit_bias,
            "structured_outputs": self.structured_outputs
            if structured_outputs is None
            else structured_outputs,
        }
        try:
            return SamplingParams(
                **{k: v for k, v in values.items() if v is not None},
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                max_tokens=max_tokens,
                logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
            )
        except ValueError as err:
            # SamplingParams names the parameter first ("top_p must be in (0, 1], got 2.0",
            # "structured_outputs.json is invalid: ...").
            message = str(err)
            param = message.split(" ", 1)[0].rstrip(":").split(".", 1)[0]
            if param == "structured_outputs" and source != param:
                param, message = source, f"{source}: {message}"
            known = param in values or param in _OTHER_PARAMS or param == source
            raise APIError(400, message, param if known else None) from err


_OTHER_PARAMS = {"max_tokens", "min_tokens", "logprobs", "n"}
# What Tokenizer.apply_chat_template passes to the template itself.
_TEMPLATE_ARGUMENTS = {"messages", "tools", "add_generation_prompt"}


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="plain", json_schema_input_type=PromptInput)
    @classmethod
    def _prompt(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return value
            if all(_is_token_id(t) for t in value):
                return value
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
                return value
        raise ValueError(
            "must be a string, a non-empty list of strings, a list of token ids (non-negative integers) "
            "or a list of non-empty lists of token ids"
        )

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (it must be unset or equal to n)", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs)


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AssistantToolCall(_Strict):
    """A call an earlier assistant turn made, as the client sends the conversation back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[str] | None = None  # content parts are reduced to their texts
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @field_validator("content", mode="plain", json_schema_input_type=ContentInput)
    @classmethod
    def _content(cls, value: Any) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            texts = [
                part.get("text") for part in value if isinstance(part, dict) and part.get("type") == "text"
            ]
            if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
                return texts
            raise ValueError("only text content parts ({'type': 'text', 'text': str}) are supported")
        raise ValueError("must be a string or a list of content parts")

    def template_message(self) -> dict[str, Any]:
        """The {"role", "content", ...} dict a chat template expects (text parts joined; a call's
        arguments as an object, which is what templates that print them with `tojson` expect, as vLLM
        passes them)."""
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "\n".join(self.content)
        message: dict[str, Any] = {"role": role, "content": text}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: text, any JSON object, or JSON that follows a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"json_object": True}
        if self.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema", "response_format")
        # strict or not, the grammar makes the output follow the schema (as vLLM does).
        schema = self.json_schema.schema_ if self.json_schema.schema_ is not None else {"type": "object"}
        return {"json": schema}


# An arguments object that is not described: any JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    # Unset: "auto" when there are tools, else "none" (OpenAI's default).
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # vLLM's extras
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        reserved = set(self.chat_template_kwargs or {}) & _TEMPLATE_ARGUMENTS
        if reserved:
            raise APIError(
                400, f"chat_template_kwargs must not set {sorted(reserved)}", "chat_template_kwargs"
            )
        if self.functions:
            raise APIError(400, "functions are not supported: use tools", "functions")
        if self.function_call not in (None, "none"):
            raise APIError(400, "function_call is not supported: use tool_choice", "function_call")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {tool.function.name for tool in self.tools}:
                raise APIError(
                    400, f"tool_choice names the function {name!r}, which tools does not list", "tool_choice"
                )
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template receives them (OpenAI's format, as transformers passes it)."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True, by_alias=True) for tool in self.tools]

    def to_sampling_params(self) -> SamplingParams:
        # max_completion_tokens replaces the deprecated max_tokens; unset, the reply may fill the context.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        structured, source = self._constraint()
        return self.sampling_params(max_tokens, logprobs, structured, source)

    def _constraint(self) -> tuple[dict[str, Any] | None, str]:
        """The output's constraint and the field it comes from: structured_outputs, response_format, or a
        tool_choice that forces calls (their arguments then always parse and follow the parameters)."""
        sources = {
            "structured_outputs": self.structured_outputs,
            "response_format": self.response_format.structured_outputs() if self.response_format else None,
            "tool_choice": self._tool_constraint(),
        }
        given = [(name, value) for name, value in sources.items() if value is not None]
        if len(given) > 1:
            names = " and ".join(name for name, _ in given)
            raise APIError(400, f"{names} each constrain the output: give only one", given[1][0])
        if not given:
            return None, "structured_outputs"
        name, value = given[0]
        return value, name

    def _tool_constraint(self) -> dict[str, Any] | None:
        choice = self.effective_tool_choice
        if isinstance(choice, NamedToolChoice):
            (tool,) = [t for t in self.tools if t.function.name == choice.function.name]
            return {"json": tool.function.parameters or _ANY_OBJECT}
        if choice != "required":
            return None
        # vLLM's shape for required calls: a JSON array of {"name", "parameters"} objects.
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": tool.function.parameters or _ANY_OBJECT,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for tool in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel_tool_calls:
            schema["maxItems"] = 1
        return {"json": schema}


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]

    def check_supported(self) -> None:
        pass


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_body(raw: bytes, model: type[_Strict]) -> Any:
    """Decode, parse and validate a request body; APIError 400 naming the problem otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {err.start})") from err
    try:
        data = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise APIError(400, "the request body is nested too deeply") from err
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _LONE_SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        # JSON allows "\ud800", Unicode does not: the tokenizer and msgpack would fail on it (a 500).
        raise APIError(400, "the request body has a string with a lone UTF-16 surrogate (\\ud800-\\udfff)")
    try:
        request = model.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from err
    request.check_supported()
    return request


# A \uXXXX escape of a surrogate: only then can a decoded string hold a lone one (a cheap pre-check).
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(data: Any) -> bool:
    """Whether a string or key anywhere in the decoded body is not valid Unicode (no recursion: the body
    may be nested as deeply as json.loads allows)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _not_json(constant: str) -> Any:
    # Python's json reads NaN, Infinity and -Infinity; RFC 8259 (and every other client) does not.
    raise APIError(400, f"the request body is not valid JSON: {constant} is not a JSON number")


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors(include_url=False)[0]
    param = _param_name(first["loc"])
    message = first["msg"]
    if first["type"] == "value_error":  # our validators' messages read "must be ..."
        message = message.removeprefix("Value error, ")
    message = f"{param}: {message}" if param else message
    if len(err.errors()) > 1:
        message += f" (and {len(err.errors()) - 1} more problem(s))"
    return APIError(400, message, param or None)


def _param_name(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
