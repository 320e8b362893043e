"""Grammar-constrained decoding on the engine's batch: llguidance token masks applied before sampling.

Only requests with `params.structured_outputs` have a matcher, and a step in which none samples costs
nothing here. The masks of a step are computed on a worker thread started before the forward pass, and
applied to the sampled rows' logits once both are done: llguidance drops the GIL while it computes a
mask (and torch drops it in its kernels), so the two overlap. When a request may stop (its grammar
accepts), every one of its stop tokens is allowed, not only the tokenizer's eos, so the model ends the
structure with whichever end-of-turn token it prefers; until then none is, so a request that stops for
a stop token always completes its structure (max_tokens can still cut it: finish_reason `length`).

A matcher follows its request's output rather than being told of each token: before computing a mask it
consumes the tokens appended since the last one (sampled here, accepted drafts, or the first token a
prefill worker sent with the KV), so it does not depend on where the engine appends them.

Speculative decoding: a request verifying k drafts gets the mask after each draft, for its 1 + k rows.
The matcher consumes the drafts the grammar accepts to compute those masks, then rolls them back; rows
past a refused draft are unreachable (the refused draft itself is masked out, so rejected) and keep the
last mask. Verification then only ever accepts drafts the grammar allows.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
import llguidance.torch
import numpy as np
import torch

from duoserve.grammar import build_grammar

if TYPE_CHECKING:
    from duoserve.engine.request import Request
    from duoserve.engine.scheduler import ScheduledRequest
    from duoserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Compiled grammars kept to copy matchers from (n sequences, repeated schemas and tools compile once).
_MAX_CACHED_GRAMMARS = 64


@dataclass
class GrammarState:
    """A constrained request's matcher (Request.grammar; written only by the mask thread)."""

    matcher: llguidance.LLMatcher | None  # None: the grammar could not be built; the request may only end
    num_consumed: int = 0  # output tokens the matcher has consumed
    reported: bool = False  # its error was logged


@dataclass
class _Job:
    request: Request
    row: int  # its first row among the step's sampled logits
    new_tokens: list[int]  # output tokens since the matcher's last step
    drafts: list[int]


class GrammarMasks:
    """The masks of one step, being computed; `apply` waits for them."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [rows, V] with -inf where the grammars forbid a token (a new tensor: the model's
        logits are inference tensors, not to be written outside inference mode)."""
        rows, forbidden = self._future.result()
        forbidden = forbidden.to(logits.device, non_blocking=True)
        if len(rows) == logits.shape[0]:
            return logits.masked_fill(forbidden, -math.inf)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        masked = logits.clone()
        masked[index] = logits[index].masked_fill_(forbidden, -math.inf)
        return masked


class StructuredOutputs:
    """The engine's grammars and masks. The tokenizer's tables are built when the first constrained request
    is added (about a second for a 49k vocabulary, once), so an engine that serves none pays nothing."""

    def __init__(self, tokenizer_source: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._source = tokenizer_source
        self.vocab_size = vocab_size
        self._model_eos_ids = eos_token_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None  # why the tokenizer cannot drive a grammar
        self._eos_ids: list[int] = []  # what the tokenizer and the model call eos: llguidance's end tokens
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None

    def check(self, params: SamplingParams) -> None:
        """Before a constrained request is admitted: the tokenizer's tables are built (once, on the first
        such request), or ValueError when this model's tokenizer cannot drive a grammar."""
        if params.structured_outputs is None or self._tokenizer is not None:
            return
        if self._tokenizer_error is None:
            try:
                self._tokenizer = self._build_tokenizer()
                return
            except Exception as err:  # whatever llguidance says of this tokenizer
                self._tokenizer_error = f"{type(err).__name__}: {err}"
        raise ValueError(
            f"structured_outputs: this model's tokenizer cannot drive a grammar ({self._tokenizer_error})"
        )

    def start(self, sampling: list[ScheduledRequest]) -> GrammarMasks | None:
        """Start computing the masks of this step's sampled rows (None: no request is constrained).

        Rows are laid out as the engine samples them: per request in `sampling` order, 1 + its drafts.
        """
        jobs, row = [], 0
        for s in sampling:
            request = s.request
            if request.params.structured_outputs is not None:
                consumed = request.grammar.num_consumed if request.grammar is not None else 0
                jobs.append(_Job(request, row, request.output_token_ids[consumed:], list(s.draft_token_ids)))
            row += 1 + len(s.draft_token_ids)
        if not jobs:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="duoserve-grammar")
        return GrammarMasks(self._executor.submit(self._masks, jobs))

    # ---------------------------------------------------------------- on the mask thread

    def _masks(self, jobs: list[_Job]) -> tuple[list[int], torch.Tensor]:
        rows = [job.row + j for job in jobs for j in range(1 + len(job.drafts))]
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        index = 0
        for job in jobs:
            try:
                self._fill(job, bitmask, index)
            except Exception:  # one request's grammar must never take the engine down
                logger.exception(
                    "request %s: its grammar failed; it may only end now", job.request.request_id
                )
                job.request.grammar = GrammarState(None, reported=True)
                self._only_stop(bitmask, index, job)
            index += 1 + len(job.drafts)
        return rows, self._forbidden(bitmask)

    def _fill(self, job: _Job, bitmask: torch.Tensor, index: int) -> None:
        request = job.request
        state = request.grammar
        if state is None:
            state = request.grammar = GrammarState(self._matcher(request))
        matcher = state.matcher
        if matcher is None:
            self._only_stop(bitmask, index, job)
            return
        if job.new_tokens and not matcher.is_stopped():
            matcher.consume_tokens(job.new_tokens)
        state.num_consumed += len(job.new_tokens)
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, index)
        valid = matcher.validate_tokens(job.drafts) if job.drafts and not matcher.is_stopped() else 0
        for j in range(valid):
            matcher.consume_token(job.drafts[j])
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, index + 1 + j)
        if valid:
            matcher.rollback(valid)
        if valid < len(job.drafts):  # rows after a refused draft are never reached
            bitmask[index + 1 + valid : index + 1 + len(job.drafts)] = bitmask[index + valid]
        if matcher.is_error() and not state.reported:
            state.reported = True
            logger.warning("request %s: grammar error: %s", request.request_id, matcher.get_error())
        self._allow_stop_tokens(bitmask, index, 1 + len(job.drafts), request)

    def _matcher(self, request: Request) -> llguidance.LLMatcher:
        grammar = build_grammar(request.params.structured_outputs)
        template = self._compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            self._compiled[grammar] = template
            if len(self._compiled) > _MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return template.deep_copy()

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        from duoserve.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self._source)
        eos_ids = [*tokenizer.eos_token_ids, *self._model_eos_ids]
        self._eos_ids = [t for t in dict.fromkeys(eos_ids) if t < self.vocab_size] or [0]  # it needs one
        # From the tokenizer's JSON, as llguidance.hf does (which would import transformers).
        return llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_ids
        )

    def _only_stop(self, bitmask: torch.Tensor, index: int, job: _Job) -> None:
        bitmask[index : index + 1 + len(job.drafts)] = 0
        self._allow_stop_tokens(bitmask, index, 1 + len(job.drafts), job.request, force=True)

    def _allow_stop_tokens(
        self, bitmask: torch.Tensor, index: int, num_rows: int, request: Request, force: bool = False
    ) -> None:
        """Where an eos token is allowed, allow each of the request's stop tokens too; where
        nothing is allowed (or `force`), allow only those: a row is never left with no token to sample."""
        stops = [t for t in request.stop_token_ids if t < self.vocab_size] or self._eos_ids[:1] or [0]
        words = bitmask.numpy().view(np.uint32)
        for row in range(index, index + num_rows):
            eos_allowed = any(words[row, t >> 5] >> np.uint32(t & 31) & 1 for t in self._eos_ids)
            if force or eos_allowed or not words[row].any():
                for token in stops:
                    words[row, token >> 5] |= np.uint32(1 << (token & 31))

    def _forbidden(self, bitmask: torch.Tensor) -> torch.Tensor:
        """[rows, ceil(V / 32)] int32 bitmask (bit t % 32 of word t // 32: token t allowed) -> [rows, V] bool,
        True where forbidden. numpy, not torch: torch would start its own thread pool from this thread."""
        as_bytes = bitmask.numpy().view(np.uint8)  # little-endian words: byte t // 8, bit t % 8
        allowed = np.unpackbits(as_bytes, axis=1, count=self.vocab_size, bitorder="little")
        return torch.from_numpy((allowed ^ 1).view(np.bool_))
