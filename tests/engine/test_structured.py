"""Structured outputs and logit_bias in the engine, through LLM.generate on a tiny random byte-level model:
every output follows its constraint, over many seeds, with n > 1, with speculative decoding (whose
drafts the grammar refuses are rejected) and across a prefill/decode split."""

from __future__ import annotations

import json
import math
import re
import time
from types import SimpleNamespace

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch
import zmq

from duoserve.config import EngineConfig
from duoserve.disagg.kv_transfer import KVReceiver, KVSender, KVTransferParams
from duoserve.disagg.pd_connector import pd_connectors
from duoserve.engine import structured
from duoserve.engine.core import EngineCore
from duoserve.engine.structured import (
    CapBuffer,
    GrammarState,
    apply_bitmask,
    overlap_masks,
    unpack_forbidden,
)
from duoserve.grammar import build_grammar
from duoserve.kv.layout import KVLayout
from duoserve.llm import LLM
from duoserve.models.loader import load_model
from duoserve.sampling_params import SamplingParams
from tests.byte_model import EOS, byte_prompt

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")

# The torch attention backend: no C++ kernel to build (the grammar path is under test, not attention).
ARGS = dict(num_kv_blocks=256, block_size=8, dtype="float32", device="cpu", attention_backend="torch")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": -50, "maximum": 50},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
# [0-9], not \d: llguidance's \d is Unicode 16's (U+16D77, a Kirat Rai digit, is one), which Python 3.11's
# re does not know, so a sampled digit there would fail the check, not the constraint.
REGEX = r"[a-c]{2,5}-[0-9][0-9]"
# Compact JSON: a random model would otherwise pad with whitespace until max_tokens.
JSON = {"json": SCHEMA, "disable_any_whitespace": True}


@pytest.fixture(scope="module")
def llm(byte_model_dir) -> LLM:
    return LLM(model=byte_model_dir, **ARGS)


def texts(llm: LLM, prompts, params: SamplingParams) -> list[tuple[str, str]]:
    """(text, finish_reason) of every sequence."""
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [(c.text, c.finish_reason) for o in outputs for c in o.outputs]


def test_json_schema_outputs_validate_over_many_seeds(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=120, structured_outputs=JSON)
    results = texts(llm, [byte_prompt(seed) for seed in range(8)], params)
    assert len(results) == 32
    finished = [text for text, reason in results if reason == "stop"]
    assert len(finished) >= 24, results  # cut by max_tokens only rarely
    for text in finished:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(finished)) > 10  # sampled, not one forced string


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
        ({"choice": ["alpha", "beta", 'ga"mma']}, lambda t: t in ("alpha", "beta", 'ga"mma')),
        (
            {"grammar": 'start: "(" item ("," item)* ")"\nitem: /[0-9]/'},
            lambda t: re.fullmatch(r"\(\d(,\d)*\)", t),
        ),
        ({"grammar": 'root ::= "<" [xy]+ ">"'}, lambda t: re.fullmatch(r"<[xy]+>", t)),
        ({"json_object": True, "disable_any_whitespace": True}, lambda t: isinstance(json.loads(t), dict)),
    ],
    ids=["regex", "choice", "lark", "gbnf", "json_object"],
)
def test_regex_choice_grammar_and_json_object(llm, constraint, check):
    params = SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=60, structured_outputs=constraint)
    results = texts(llm, [byte_prompt(1), byte_prompt(2)], params)
    finished = [text for text, reason in results if reason == "stop"]
    # Any JSON object has unbounded strings, which a random model often runs to max_tokens.
    assert len(finished) >= (3 if "json_object" in constraint else 10), results
    for text in finished:
        assert check(text), text


def test_max_tokens_cuts_the_structure_with_length(llm):
    params = SamplingParams(temperature=0, max_tokens=3, structured_outputs=JSON)
    ((text, reason),) = texts(llm, [byte_prompt(5)], params)
    assert reason == "length" and text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_a_constrained_row_does_not_depend_on_its_batch(llm):
    """Greedy under a choice constraint gives one of the choices, the same alone or beside an
    unconstrained request (which the mask leaves alone: it runs to max_tokens)."""
    params = SamplingParams(
        temperature=0, max_tokens=20, structured_outputs={"choice": ["abc", "abd", "xyz"]}
    )
    alone = texts(llm, [byte_prompt(9)], params)
    mixed = llm.generate(
        [byte_prompt(9), byte_prompt(10)],
        [params, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)],
        use_tqdm=False,
    )
    assert alone[0][0] in ("abc", "abd", "xyz") and alone[0][1] == "stop"
    assert (mixed[0].outputs[0].text, mixed[0].outputs[0].finish_reason) == alone[0]
    assert len(mixed[1].outputs[0].token_ids) == 20


def test_constrained_rows_apart_in_the_batch_are_each_masked(llm):
    """Two constrained requests around an unconstrained one (the masks go to two runs of rows): each
    output is the same as alone, and the unconstrained one runs free to max_tokens."""
    choice = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"choice": ["abc", "xyz"]})
    regex = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"regex": REGEX})
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [byte_prompt(12), byte_prompt(13), byte_prompt(14)]
    each = [choice, free, regex]
    alone = [texts(llm, [prompt], params)[0] for prompt, params in zip(prompts, each, strict=True)]
    mixed = llm.generate(prompts, each, use_tqdm=False)
    assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in mixed] == alone
    assert alone[0][0] in ("abc", "xyz") and re.fullmatch(REGEX, alone[2][0])


def test_masks_reuse_one_buffer_and_count_their_steps(llm):
    structured = llm.engine.core.structured
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=6, structured_outputs=JSON)
    texts(llm, [byte_prompt(1)], params)
    buffer, steps = structured._bitmask, structured.stats.steps
    texts(llm, [byte_prompt(2)], params)
    assert structured._bitmask is buffer
    assert structured.stats.steps > steps and structured.stats.fill_wall_s > 0


@pytest.mark.parametrize("vocab", [150, 160])
@pytest.mark.parametrize(
    ("path", "dtype"), [("op", torch.float32), ("op", torch.bfloat16), ("caps", torch.float32)]
)
def test_masks_apply_the_same_on_the_host_and_for_an_accelerator(vocab, path, dtype, monkeypatch):
    """The host's caps (`apply_bitmask`: runs of rows, in chunks of the cap buffer's rows) and the torch
    unpacking (for logits on an accelerator) against bit arithmetic: -inf where token t's bit (t % 32 of
    word t // 32) is 0, the logit untouched elsewhere, +inf logits included; rows outside the runs
    untouched. A vocabulary that is not a multiple of 32 leaves the last word's high bits unused. On
    the host: the C++ op (float32 and bfloat16 logits) and the numpy/torch caps it falls back to."""
    if path == "op" and not structured._bitmask_op():
        pytest.skip("the CPU kernels did not build")
    monkeypatch.setattr(structured, "_bitmask_op", lambda: path == "op")
    words = -(-vocab // 32)
    bitmask = np.random.default_rng(0).integers(-(2**31), 2**31, (7, words), dtype=np.int32)
    bitmask[1, 0], bitmask[2, -1] = -1, 0  # a word allowing all its tokens, one forbidding all
    forbidden = [[not (int(word) >> bit) & 1 for word in row for bit in range(32)][:vocab] for row in bitmask]
    assert unpack_forbidden(torch.from_numpy(bitmask))[:, :vocab].tolist() == forbidden
    logits = torch.randn(9, vocab).to(dtype)
    logits[1, :5] = math.inf
    runs = [(0, 0, 2), (3, 2, 5)]  # logits rows 0-1 and 3-7 take mask rows 0-1 and 2-6
    caps = CapBuffer(words)
    caps.max_rows = 2  # chunks of 2 rows: runs of 2 and 5 rows
    expected = logits.clone()
    for logits_row, mask_row, num_rows in runs:
        for i in range(num_rows):
            expected[logits_row + i][torch.tensor(forbidden[mask_row + i])] = -math.inf
    apply_bitmask(logits, bitmask, runs, caps)
    assert torch.equal(logits, expected)


def test_the_host_decides_where_masks_are_computed():
    """After the forward, on the engine thread, wherever the forward's threads take every usable core
    (1- and 2-core hosts run 1 or 2 threads); beside it only where a core is left."""
    table = {(1, 1): False, (2, 1): True, (2, 2): False, (1, 2): False, (16, 16): False, (16, 15): True}
    assert {host: overlap_masks(*host) for host in table} == table


def test_serial_and_overlapped_masks_give_the_same_outputs(llm):
    """The same constrained outputs whether the masks are computed beside the forward (mask thread,
    llguidance's executor) or after it on the engine thread (one matcher after another, no pool): greedy
    and seeded sampling, several constraints and n > 1, beside an unconstrained request."""
    structured = llm.engine.core.structured
    prompts = [byte_prompt(seed) for seed in (20, 21, 22)]
    each = [
        SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=50, structured_outputs=JSON),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": REGEX}),
    ]

    def run(overlap: bool) -> tuple[list[tuple[str, str]], int]:
        """(text, finish_reason) of each sequence, and how many steps filled masks after the forward."""
        structured.overlap = overlap
        serial = structured.stats.serial_steps
        try:
            outputs = llm.generate(prompts, each, use_tqdm=False)
        finally:
            structured.overlap = None
        texts = [(c.text, c.finish_reason) for o in outputs for c in o.outputs]
        return texts, structured.stats.serial_steps - serial

    overlapped, overlapped_serial_steps = run(True)
    serial, serial_steps = run(False)
    assert serial == overlapped
    assert overlapped_serial_steps == 0 and serial_steps > 0
    assert re.fullmatch(REGEX, serial[3][0]) and len(serial[2][0]) > 0


CONSTRAINTS = [
    JSON,
    {"regex": REGEX},
    {"choice": ["alpha", "beta", 'ga"mma']},
    {"grammar": 'start: "(" item ("," item)* ")"\nitem: /[0-9]/'},
    {"json_object": True},
]


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=["json", "regex", "choice", "lark", "json_object"])
def test_a_checked_token_is_allowed_exactly_when_the_mask_allows_it(llm, constraint):
    """What sampling before the mask rests on, against llguidance itself: at every state of random
    paths through real grammars, where `_checks_sampled` says a matcher can check a token, validating
    each token of the vocabulary agrees with the mask bit for bit (stop tokens aside: those are always
    masked). Where it cannot (forced bytes), validation would accept more than the mask."""
    structured = llm.engine.core.structured
    texts(llm, [byte_prompt(1)], SamplingParams(max_tokens=1, structured_outputs=JSON))  # the tables
    grammar = build_grammar(SamplingParams(structured_outputs=constraint).structured_outputs)
    vocab, rng = structured.vocab_size, np.random.default_rng(0)
    checked = forced = 0
    for _ in range(3):
        matcher = llguidance.LLMatcher(structured._tokenizer, grammar, log_level=0)
        job = SimpleNamespace(request=SimpleNamespace(grammar=GrammarState(matcher)))
        for _ in range(40):
            if matcher.is_stopped():
                break
            mask = np.zeros((1, -(-vocab // 32)), dtype=np.int32)
            llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
            allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
            valid = np.array([matcher.validate_tokens([t]) == 1 for t in range(vocab)])
            allowed[EOS] = valid[EOS] = False
            if structured._checks_sampled(job):
                checked += 1
                assert np.array_equal(valid, allowed), np.flatnonzero(valid != allowed)
            else:
                forced += 1
                assert not (allowed & ~valid).any()
            if not allowed.any():
                break
            assert matcher.consume_token(int(rng.choice(np.flatnonzero(allowed))))
    assert checked >= 3  # a choice among words is checked once a path, then its bytes are forced


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_sampling_first_gives_the_masked_rows_tokens(llm, overlap):
    """Greedy outputs are the same whether rows are sampled first or every row is masked first, for every
    kind of constraint, beside an unconstrained request and a top-p row (which is always masked first);
    and sampling first did run, and did refuse some tokens. Serial: the matchers validate the sampled
    tokens, and masks are computed for the refused ones; overlapped: every mask is computed beside the
    forward, and the sampled tokens are checked against their bits."""
    structured = llm.engine.core.structured
    prompts = [byte_prompt(seed) for seed in range(30, 30 + len(CONSTRAINTS) + 2)]
    each = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=c) for c in CONSTRAINTS]
    each.append(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    each.append(SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=40, structured_outputs=JSON))

    def run(sample_first: bool) -> list[tuple[str, str]]:
        structured.sample_first, structured.overlap = sample_first, overlap
        try:
            outputs = llm.generate(prompts, each, use_tqdm=False)
        finally:
            structured.sample_first, structured.overlap = True, None
        return [(c.text, c.finish_reason) for o in outputs for c in o.outputs]

    before = (structured.stats.sampled_first_rows, structured.stats.refused_rows)
    first = run(True)
    sampled_first = structured.stats.sampled_first_rows - before[0]
    refused = structured.stats.refused_rows - before[1]
    assert run(False) == first
    assert 0 < refused < sampled_first
    assert re.fullmatch(REGEX, first[1][0]) and first[2][0] in ("alpha", "beta", 'ga"mma')


def test_no_masks_for_unconstrained_steps(llm):
    core = llm.engine.core
    calls = []
    original = core.structured._masks
    core.structured._masks = lambda jobs, executor: calls.append(len(jobs)) or original(jobs, executor)
    try:
        texts(llm, [byte_prompt(1)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert calls == []
        texts(llm, [byte_prompt(1)], SamplingParams(temperature=0, max_tokens=4, structured_outputs=JSON))
        assert calls and all(n == 1 for n in calls)
    finally:
        core.structured._masks = original


def test_logit_bias(llm):
    prompt = byte_prompt(4)
    free = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    first = free[0].outputs[0].token_ids[0]
    forced = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={65: 100})
    assert llm.generate([prompt], forced, use_tqdm=False)[0].outputs[0].token_ids == [65] * 8
    banned = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={first: -100})
    assert first not in llm.generate([prompt], banned, use_tqdm=False)[0].outputs[0].token_ids
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True, logit_bias={66: 100})
    assert llm.generate([prompt], sampled, use_tqdm=False)[0].outputs[0].token_ids == [66] * 8
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([prompt], SamplingParams(logit_bias={10**6: 1}), use_tqdm=False)


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculative_decoding_keeps_the_constraint(byte_model_dir, llm, speculative):
    """Drafts come from the prompt (ngram) or from the model without the grammar (draft): those the
    grammar refuses are rejected, so greedy outputs equal plain constrained decoding's."""
    spec = LLM(
        model=byte_model_dir,
        **ARGS,
        speculative=speculative,
        num_speculative_tokens=4,
        speculative_rate_backoff=False,
    )
    example = '{"name":"ab","n":1,"ok":true}'
    prompts = [f"{example} {example} {byte_prompt(seed, 4)} " for seed in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=60, structured_outputs=JSON)
    expected = texts(llm, prompts, greedy)
    assert texts(spec, prompts, greedy) == expected
    spec.engine.core.structured.overlap = False  # and filled after the forward, drafts included
    assert texts(spec, prompts, greedy) == expected
    assert spec.engine.core.structured.stats.serial_steps > 0
    spec.engine.core.structured.overlap = None
    stats = spec.engine.core.stats()
    assert stats["spec_decode_num_draft_tokens"] > stats["spec_decode_num_accepted_tokens"]  # some refused
    if speculative == "ngram":  # the example's keys and punctuation are drafted, and forced
        assert stats["spec_decode_num_accepted_tokens"] > 0
    sampled = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=80, structured_outputs=JSON)
    for text, reason in texts(spec, prompts, sampled):
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)


class PDWorker:
    """A core with a worker's P/D connectors over real sockets (as the engine process builds them)."""

    def __init__(self, path: str, context: zmq.Context) -> None:
        self.sender = KVSender(context, None)
        self.tickets: list = []

        def make_connector(core: EngineCore):
            layout = KVLayout.of(core.kv_cache.spec)
            self.receiver = KVReceiver(context, "127.0.0.1", layout, core.kv.num_blocks, None)
            return pd_connectors(core, self.receiver, self.sender, self.tickets.extend)

        self.core = EngineCore(
            EngineConfig(model=path, **ARGS), load_model(path, torch.float32), make_connector
        )

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()


def test_disaggregated_first_token_is_constrained(byte_model_dir, llm):
    """The prefill core samples the first token under the grammar; the decode core's matcher starts
    from it. Greedy: the same text as one core."""
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=JSON)
    prompt = llm.get_tokenizer().encode(byte_prompt(11))
    ((expected, _),) = texts(llm, [prompt], params)
    context = zmq.Context()
    prefill, decode = (PDWorker(byte_model_dir, context) for _ in range(2))
    try:
        decode.core.add_request("r", prompt, params, [EOS], KVTransferParams("receive"))
        assert decode.core.step() == []  # admitted: its blocks allocated and a ticket handed out
        (ticket,) = decode.tickets
        prefill.core.add_request("r", prompt, params, [EOS], KVTransferParams("send", ticket))
        tokens = []
        while prefill.core.has_unfinished():
            tokens += [t for out in prefill.core.step() for t in out.new_token_ids]
        deadline = time.monotonic() + 30
        while decode.core.scheduler.loading and time.monotonic() < deadline:
            decode.core.step()  # takes in the arriving KV frames
            time.sleep(0.001)
        while decode.core.has_unfinished():
            tokens += [t for out in decode.core.step() for t in out.new_token_ids]
    finally:
        for worker in (prefill, decode):
            worker.close()
        context.term()
    assert llm.get_tokenizer().decode(tokens) == expected
    jsonschema.validate(json.loads(expected), SCHEMA)
