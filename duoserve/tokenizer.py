"""Tokenization: `tokenizers`-backed encode/decode, jinja2 chat templates, incremental detokenization.

Two sources are supported: a Hugging Face model directory (`tokenizer.json` and friends) and the
tokenizer metadata embedded in a GGUF file, which `from_gguf` rebuilds into a `tokenizers.Tokenizer`
that tokenizes like the model's original tokenizer.json and llama.cpp (see _DIGIT_PRES for the one
place where transformers' GGUF conversion differs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from gguf import GGUFReader, GGUFValueType
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

__all__ = ["IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# llama.cpp token types (gguf.TokenType); only these change how we build the tokenizer.
_TYPE_NORMAL, _TYPE_CONTROL, _TYPE_USER_DEFINED = 1, 3, 4

# Control tokens llama.cpp treats as end-of-generation by their text. Many GGUFs only record the
# base-model eos (e.g. Llama 3's <|end_of_text|>) while the chat model ends its turns with <|eot_id|>.
_EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>"}
)

# Pre-tokenizer split regexes, as llama.cpp defines them per `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = frozenset({"llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"})
_QWEN2_PRES = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})
# These split every digit on its own, then apply the GPT-2 regex. transformers' GGUF loader does not know
# them and uses the bare GPT-2 regex, which differs for " ½"-like text; we follow llama.cpp and the models'
# own tokenizer.json (Digits + ByteLevel).
_DIGIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_BYTE_CHARS = frozenset(_BYTE_TO_CHAR.values())


class Tokenizer:
    """A model's tokenizer: encode/decode, special token ids and its chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str | None],
        chat_template: str | dict[str, str] | None,
        extra_eos_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        """`add_bos_token`/`add_eos_token` of None keep whatever post-processor `backend` has."""
        self._backend = backend
        self._special_tokens = {name: tok for name, tok in special_tokens.items() if tok is not None}
        self._chat_templates = chat_template if isinstance(chat_template, dict) else None
        self.chat_template: str | None = (
            chat_template.get("default") if isinstance(chat_template, dict) else chat_template
        )
        self.bos_token_id = self._token_id(special_tokens.get("bos_token"))
        self.eos_token_id = self._token_id(special_tokens.get("eos_token"))
        eos_ids = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys([*eos_ids, *extra_eos_ids]))
        self._prefix_ids: list[int] = []
        self._suffix_ids: list[int] = []
        if add_bos_token is not None or add_eos_token is not None:
            # An explicit flag overrides tokenizer.json's post-processor (transformers 4 semantics; 5 ignores
            # the flags when a tokenizer.json exists). GGUF files always state them.
            backend.post_processor = None
            self._prefix_ids = [self.bos_token_id] if add_bos_token and self.bos_token_id is not None else []
            self._suffix_ids = [self.eos_token_id] if add_eos_token and self.eos_token_id is not None else []
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def backend(self) -> _Backend:
        """The `tokenizers.Tokenizer` underneath (what grammar engines build their token tables from)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_hf_dir(cls, path: str) -> Tokenizer:
        """Load `tokenizer.json` plus the optional config files of a Hugging Face model directory."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"{path!r} has no tokenizer.json")
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        # special_tokens_map.json is the legacy home of the special tokens; tokenizer_config wins.
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        special = {name: _token_content(config.get(name, special_map.get(name))) for name in _SPECIAL_NAMES}
        return cls(
            _Backend.from_file(tokenizer_file),
            special_tokens=special,
            chat_template=_hf_chat_template(path, config),
            extra_eos_ids=_as_id_list(
                _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
            ),
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
        )

    @classmethod
    def from_gguf(cls, reader: GGUFReader) -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        meta = {
            key: _field_value(field) for key, field in reader.fields.items() if key.startswith("tokenizer.")
        }
        kind = meta.get("tokenizer.ggml.model")
        if kind not in _GGUF_BUILDERS:
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r} (supported: {', '.join(sorted(_GGUF_BUILDERS))})"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [_TYPE_NORMAL] * len(tokens)
        backend = _GGUF_BUILDERS[kind](meta, tokens, types)
        _add_gguf_special_tokens(backend, tokens, types)

        def token_at(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        return cls(
            backend,
            special_tokens={name: token_at(f"{name}_id") for name in ("bos_token", "eos_token")}
            | {"unk_token": token_at("unknown_token_id"), "pad_token": token_at("padding_token_id")},
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_ids=_gguf_eog_ids(meta, tokens, types),
            # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise.
            add_bos_token=meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
            add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
        )

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their special tokens."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            return [*self._prefix_ids, *ids, *self._suffix_ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._backend.id_to_token(i) for i in ids]

    def detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    # ---------------------------------------------------------------- chat template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs,
    ) -> str:
        """Render `messages` with the model's chat template the way transformers does (tokenize=False)."""
        _validate_messages(messages)
        template = self._compile(self._select_template(tools))
        variables = {**self._special_tokens, **kwargs}
        try:
            return template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as err:
            # Templates reject unsupported conversations via raise_exception(); surface that as bad input.
            raise ValueError(f"chat template error: {err}") from err

    def _select_template(self, tools: list[dict] | None) -> str:
        if self._chat_templates and tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        return self.chat_template

    def _compile(self, source: str) -> jinja2.Template:
        if source not in self._compiled:
            try:
                self._compiled[source] = _JINJA_ENV.from_string(source)
            except jinja2.TemplateSyntaxError as err:
                raise ValueError(f"the model's chat template does not parse: {err}") from err
        return self._compiled[source]


class IncrementalDetokenizer:
    """Streams the text of generated tokens, never splitting a UTF-8 character.

    Uses the prefix/read-offset window of vLLM/TGI: `_ids` holds the tokens from the prefix offset
    on, and `_read` marks where the not-yet-emitted ones start. Decoding the window with and without
    that tail and diffing gives the new text with the spacing the whole sequence would have, while
    each step only decodes a few tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        # The window starts at the first output token rather than inside the prompt: the output's text
        # must equal tokenizer.decode(output_ids), and a SentencePiece decoder strips the leading space of
        # the first token only when it is first. A text prompt always ends on a character boundary, so
        # dropping it loses no bytes; prompt_ids is accepted for parity with vLLM-style callers.
        del prompt_ids
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0
        self.text = ""

    def step(self, new_token_ids: list[int]) -> str:
        """Add generated tokens; return the text they finalise (possibly empty)."""
        self._ids.extend(new_token_ids)
        prefix, full = self._decode_window()
        # A trailing U+FFFD is a multi-byte character whose remaining bytes are still to come.
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        return self._emit(full[len(prefix) :])

    def flush(self) -> str:
        """Emit whatever is held back, e.g. at the end of generation."""
        prefix, full = self._decode_window()
        return self._emit(full[len(prefix) :]) if len(full) > len(prefix) else ""

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        skip = self._skip_special_tokens
        return decode(self._ids[: self._read], skip), decode(self._ids, skip)

    def _emit(self, delta: str) -> str:
        # The emitted tail becomes the next step's prefix context.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self.text += delta
        return delta


def load_tokenizer(path: str, gguf_reader: GGUFReader | None = None) -> Tokenizer:
    """A tokenizer from a Hugging Face model directory or a `.gguf` file (whose reader, when the
    caller already opened it for the weights, is reused rather than parsed again)."""
    if os.path.isdir(path):
        return Tokenizer.from_hf_dir(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return Tokenizer.from_gguf(gguf_reader or GGUFReader(path))
    raise ValueError(f"{path!r} is neither a model directory with tokenizer.json nor a .gguf file")


# -------------------------------------------------------------------- HF directory helpers


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: str | dict | None) -> str | None:
    """Special tokens are saved either as plain strings or as serialised AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _hf_chat_template(path: str, config: dict[str, Any]) -> str | dict[str, str] | None:
    """Newer transformers saves the template as chat_template.jinja; older ones inline it in the config."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, e.g. "default" and "tool_use"
        return {entry["name"]: entry["template"] for entry in template}
    return template


# -------------------------------------------------------------------- GGUF helpers


def _field_value(field: Any) -> Any:
    """Decode a GGUFReader field from its raw parts (works across gguf-py versions)."""
    parts = [field.parts[i] for i in field.data]
    if field.types[-1] == GGUFValueType.STRING:
        values = [bytes(part).decode("utf-8") for part in parts]
    else:
        values = [value for part in parts for value in part.tolist()]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def _byte_level_backend(meta: dict[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """GPT-2 style byte-level BPE ('gpt2' in llama.cpp terms)."""
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        # Control/user-defined tokens are stored as raw text and matched whole; ordinary tokens must be
        # in the byte alphabet, so respell the odd file that stores one as raw text.
        if token_type not in (_TYPE_CONTROL, _TYPE_USER_DEFINED) and not set(token) <= _BYTE_CHARS:
            token = "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    backend = _Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT if pre in _QWEN2_PRES else None
    if split is None:
        # 'default', 'gpt2' and any pre-tokenizer we do not know: fall back to the GPT-2 regex built into
        # ByteLevel, which is what llama.cpp does for its default type too.
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """SentencePiece BPE with byte fallback ('llama' in llama.cpp terms: Llama 2, Mistral, ...)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, types, meta["tokenizer.ggml.scores"], vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = _Backend(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece GGUFs ship no merges: a token's score ranks the merge that builds it.

    Every split of a normal token into two vocabulary pieces is a merge; ties are broken like
    transformers' generate_merges so both produce the same ranking.
    """
    candidates: list[tuple[str, str, float]] = []
    for token, token_type, score in zip(tokens, types, scores, strict=True):
        if token_type != _TYPE_NORMAL:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [(a, b) for a, b in pairs if a in vocab and b in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((a, b, score) for a, b in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(a, b) for a, b, _ in candidates]


def _add_gguf_special_tokens(backend: _Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so both are
    matched whole in the input text instead of being cut into pieces (as llama.cpp does)."""
    added = [
        AddedToken(token, special=token_type == _TYPE_CONTROL, normalized=False)
        for token, token_type in zip(tokens, types, strict=True)
        if token_type in (_TYPE_CONTROL, _TYPE_USER_DEFINED)
    ]
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])


def _gguf_eog_ids(meta: dict[str, Any], tokens: list[str], types: list[int]) -> list[int]:
    explicit = [
        meta[key] for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if key in meta
    ]
    by_text = [
        i
        for i, (tok, tt) in enumerate(zip(tokens, types, strict=True))
        if tt == _TYPE_CONTROL and tok in _EOG_TEXTS
    ]
    return explicit + by_text


_GGUF_BUILDERS: dict[str, Callable[[dict[str, Any], list[str], list[int]], _Backend]] = {
    "gpt2": _byte_level_backend,
    "llama": _sentencepiece_backend,
}


# -------------------------------------------------------------------- chat template helpers


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        content = message.get("content")
        # An assistant turn that only calls tools may carry no content.
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Jinja's built-in tojson HTML-escapes its output, which would corrupt prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render it as-is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _make_jinja_env() -> ImmutableSandboxedEnvironment:
    # Same environment as transformers' chat templating, so templates render identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_JINJA_ENV = _make_jinja_env()
