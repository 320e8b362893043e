"""The front end's half of a request: text, stop strings, logprobs, and `n > 1` fan-in.

The engine core deals in token ids. Here each generated sequence gets an incremental
detokenizer; stop strings are looked for in the text (so they are found across token
boundaries) and end the sequence, which the caller then aborts in the core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from duoserve.engine.core import CoreOutput
from duoserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from duoserve.sampling_params import SamplingParams
from duoserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SequenceState:
    """One generated sequence (one of a request's n)."""

    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: dict[str, SequenceState]  # by the core's request id of each sequence
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.sequences.values())

    def output(self, finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[seq.completion() for seq in self.sequences.values()],
            finished=finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
        )


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The core's request ids of a request's n sequences."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._owner: dict[str, RequestState] = {}  # sequence id -> its request

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: list[SamplingParams]
    ) -> list[str]:
        """Track a request whose sequences run with `params` (one per sequence); returns their core ids."""
        ids = sequence_ids(request_id, len(params))
        state = RequestState(
            request_id=request_id,
            prompt=prompt,
            prompt_token_ids=prompt_token_ids,
            sequences={
                seq_id: SequenceState(
                    index=i,
                    params=p,
                    detokenizer=self.tokenizer.detokenizer(prompt_token_ids, p.skip_special_tokens),
                    logprobs=[] if p.logprobs is not None else None,
                    cumulative_logprob=0.0 if p.logprobs is not None else None,
                )
                for i, (seq_id, p) in enumerate(zip(ids, params, strict=True))
            },
            metrics=RequestMetrics(arrival_time=time.monotonic()),
        )
        self.requests[request_id] = state
        for seq_id in ids:
            self._owner[seq_id] = state
        return ids

    def remove(self, request_id: str) -> list[str]:
        """Forget a request; returns the core ids of its unfinished sequences (to abort)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for seq_id in state.sequences:
            self._owner.pop(seq_id, None)
        return [seq_id for seq_id, seq in state.sequences.items() if seq.finish_reason is None]

    def process(
        self, outputs: list[CoreOutput], final_only: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's core outputs. Returns the updated requests (`final_only`: the finished ones
        alone, as vLLM's FINAL_ONLY output kind: an offline caller reads nothing else, and a request's
        output copies its tokens, O(length) each step) and the sequences that a stop string ended (still
        running in the core: the caller aborts them)."""
        touched: dict[str, RequestState] = {}
        to_abort: list[str] = []
        now = time.monotonic()
        for out in outputs:
            state = self._owner.get(out.request_id)
            if state is None:
                continue  # aborted meanwhile
            seq = state.sequences[out.request_id]
            if out.prompt_logprobs is not None:
                scored = zip(state.prompt_token_ids[1:], out.prompt_logprobs, strict=True)
                state.prompt_logprobs = [None, *(self._logprobs(e, r, token) for token, (e, r) in scored)]
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.new_token_ids and state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            if self._append(seq, out) and not out.finished:
                to_abort.append(out.request_id)
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            finished = state.finished
            if finished:
                state.metrics.finished_time = now
                self.remove(state.request_id)
            if finished or not final_only:
                results.append(state.output(finished))
        return results, to_abort

    def _append(self, seq: SequenceState, out: CoreOutput) -> bool:
        """Add new tokens to a sequence; True when a stop string ended it here."""
        seq.token_ids.extend(out.new_token_ids)
        for token, (entry, rank) in zip(out.new_token_ids, out.new_logprobs, strict=False):
            seq.logprobs.append(self._logprobs(entry, rank, token))
            seq.cumulative_logprob += entry[token]
        previous = len(seq.text)
        # As vLLM: the text leaves out the eos / stop token that ended the sequence, unless asked for.
        stopped_by_token = out.finished and out.finish_reason == "stop"
        text_ids = out.new_token_ids
        if stopped_by_token and not seq.params.include_stop_str_in_output:
            text_ids = text_ids[:-1]
        seq.text += seq.detokenizer.step(text_ids)
        if out.finished:
            seq.text += seq.detokenizer.flush()
        stopped = self._check_stop_strings(seq, previous)
        if out.finished and not stopped:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return stopped

    @staticmethod
    def _check_stop_strings(seq: SequenceState, previous: int) -> bool:
        """Cut the text at the first stop string that the new text completes."""
        stops = seq.params.stop
        # As vLLM and the stop token ids: no stop until more than min_tokens tokens are out.
        if not stops or len(seq.token_ids) <= seq.params.min_tokens:
            return False
        # A stop string ending in the new text may start up to len(stop) - 1 characters earlier (its
        # own length: with the longest one's, a short stop string lying wholly in text that was not
        # checked, the first min_tokens tokens', would be found).
        found = [(seq.text.find(s, max(0, previous - len(s) + 1)), s) for s in stops]
        found = [(pos, s) for pos, s in found if pos >= 0]
        if not found:
            return False
        pos, stop = min(found, key=lambda f: f[0])  # the earliest; on a tie, the first listed
        seq.text = seq.text[: pos + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:pos]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _logprobs(self, entry: dict[int, float], rank: int, chosen: int) -> dict[int, Logprob]:
        """Logprob objects: the top entries ranked 1, 2, ... in order; the chosen token its own rank."""
        result = {}
        for position, (token_id, value) in enumerate(entry.items(), start=1):
            result[token_id] = Logprob(value, position, self.tokenizer.decode([token_id], False))
        result[chosen].rank = rank
        return result
