"""Continuous batching under one token budget per step (vLLM v1's scheduler, simplified).

Each request only says how many of its tokens have KV (`num_computed_tokens`) out of how many it
has (`num_tokens`). Each step hands out `max_num_batched_tokens`: running requests first, in
admission order (a decode needs one token; a partly prefilled prompt takes what is left of the
budget), then waiting requests, whose cached prefix counts as computed. So chunked prefill,
prefix hits, preemption (computed reset to 0) and decoding are one mechanism.

The scheduler is also the one writer of each request's progress (computed tokens, status, output
tokens, logprobs, its end): `update` applies what a step computed and sampled, and
`apply_connector_events` what the KV connector reported. KV that a connector supplies (another
worker's prefill, an offload tier) is asked for at admission; a request whose KV arrives
asynchronously waits in `loading` (WAITING_FOR_KV) with its blocks held, never preempted, while the
others keep stepping.

A load is paid for once (issue 14's thrash: under 4x pool pressure the tier loaded 8,807 blocks for 279
stored, a returning turn preempted as the newest running request once loaded, then loading again):
  - it is admitted only when the pool can hold the request's whole context (the loaded blocks and the
    ones still to compute, all taken at once when it loads asynchronously) beside the next step of every
    request admitted before it (vLLM admits against a watermark likewise); otherwise it waits in the
    queue, taking nothing. A load supplied at once (landed when asked: written in before the forward,
    the rest computed in the same step) passes the same test, then runs as a prefix hit would;
  - its blocks join the prefix cache as soon as its KV lands, so a preemption keeps them findable;
  - it runs in its admission's place, not after the requests admitted while it loaded: preemption takes
    the last admitted (vLLM's FCFS), and those came after it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from duoserve.engine.request import Request, RequestStatus
from duoserve.kv.connector import ConnectorEvents, KVConnector, MultiConnector
from duoserve.kv.kv_cache_manager import KVCacheManager

# Per sampled token: ({token id: logprob} of the top ones and the sampled one, the sampled one's rank).
TokenLogprobs = tuple[dict[int, float], int]


@dataclass
class CoreOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # once, when the prompt is scored
    num_cached_tokens: int = 0
    # With the request's first sampled token only: seconds from its arrival to its first step, and
    # from then to this token (vLLM's queue and prefill phases). Carried here, not looked up later,
    # because a request may be gone from the core by the time anyone asks.
    queue_time: float | None = None
    prefill_time: float | None = None


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # draft tokens included
    # Speculative draft tokens scheduled after the request's last token, for the target to verify.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request's tokens, so the step samples one more."""
        end = self.request.num_tokens + self.request.num_pending_tokens + len(self.draft_token_ids)
        return self.request.num_computed_tokens + self.num_new_tokens == end


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class _Load:
    """A request whose KV a connector is filling, and how much of it the device held before."""

    request: Request
    num_device_tokens: int  # its prefix-cache hit: what it computes from if the load fails


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
        connector: KVConnector | None = None,
        max_loras: int = 0,
    ) -> None:
        """`clock` stamps first_scheduled_time and first_token_time (the planner's simulator,
        duoserve/plan, passes its own); `connector` supplies and takes KV (none: nothing does);
        `max_loras`: most LoRA adapters among the running requests (so in any one step), as vLLM's."""
        self.kv = kv
        self.clock = clock
        self.connector: KVConnector = connector if connector is not None else MultiConnector()
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_loras = max_loras
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loading: dict[str, _Load] = {}  # WAITING_FOR_KV, holding blocks and a seat
        self.requests: dict[str, Request] = {}
        # Ended requests whose blocks the connector still reads (request_finished said so).
        self.held_by_connector: set[str] = set()
        self.num_preemptions = 0
        # Admission order of the running and loading requests: a load that lands runs in its place.
        self._admitted: dict[str, int] = {}
        self._num_admitted = 0

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_schedulable(self) -> bool:
        """Whether a step would do anything (requests waiting for a connector's KV alone do not count)."""
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ before the forward

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._free_out_of_window()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_pending_tokens and request.reaches_length(
                self.max_model_len, request.num_pending_tokens
            ):
                index += 1  # its token in flight ends it (async scheduling): computing more is for nobody
                continue
            num_uncomputed = request.num_tokens + request.num_pending_tokens - request.num_computed_tokens
            num_new = min(num_uncomputed, budget)
            drafts = self._take_drafts(request, budget - num_new)
            if not drafts and not self._allocate_or_preempt(request, num_new, out):
                break  # the request preempted itself: everything after it is gone too
            out.scheduled.append(ScheduledRequest(request, num_new + len(drafts), drafts))
            budget -= num_new + len(drafts)
            index += 1
        if not out.preempted:
            self._admit_waiting(budget, out)
        evicted = self.kv.pool.take_evicted()
        if evicted:
            self.connector.on_blocks_evicted(evicted)
        now = self.clock()
        for s in out.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        return out

    def _free_out_of_window(self) -> None:
        """With a sliding window on every layer, running requests give back the blocks no query of theirs
        sees any more, before this step allocates.

        A P/D prefill worker's request too: its connector sends every block the step that filled it
        (save_kv), before the next schedule can free it.
        """
        if self.kv.sliding_window is None:
            return
        for request in self.running:
            self.kv.free_out_of_window(request.request_id, request.all_token_ids, request.num_computed_tokens)

    def _take_drafts(self, request: Request, budget: int) -> list[int]:
        """The request's draft tokens that fit the budget, with their blocks allocated; [] if none do.

        Drafts never preempt anyone: without blocks for them, the request just decodes this step.
        """
        drafts, request.draft_token_ids = request.draft_token_ids[:budget], []
        if not drafts or not request.is_decoding:
            return []
        num_new = 1 + len(drafts)
        if not self.kv.allocate_slots(
            request.request_id, request.all_token_ids, request.num_computed_tokens, num_new
        ):
            return []
        return drafts

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for a running request, preempting the newest ones until they fit."""
        while not self.kv.allocate_slots(
            request.request_id, request.all_token_ids, request.num_computed_tokens, num_new
        ):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        """Admit waiting requests in order while they fit the seats, the budget and the pool.

        After the device's prefix hit, the connector may supply more tokens: at once (written before
        the forward, so the rest is computed in this step) or asynchronously (the request then
        takes a seat and its blocks, but no budget, and waits in `loading`). As in vLLM, admission
        stops when the budget is spent, loads included. A request whose LoRA adapter would make more
        than `max_loras` among the admitted ones waits, keeping its place in the queue.
        """
        # The adapters admitted so far: only with LoRA on (max_loras > 0); otherwise no step pays for it.
        loras: set[int] = set()
        if self.max_loras:
            admitted = [*self.running, *(load.request for load in self.loading.values())]
            loras = {id(r.lora) for r in admitted if r.lora is not None}
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted with a token in flight: its prompt + output is known once that lands
            if request.lora is not None and id(request.lora) not in loras and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            cached, num_external, load_async = self._match(request)
            num_cached = len(cached) * self.kv.block_size
            if num_external and not self._load_fits(request, cached):
                break  # a load is only paid for once it can run (one supplied at once too)
            if load_async:
                # Blocks for its whole context, taken now.
                num_new = request.num_tokens - num_cached - num_external
            else:
                num_new = min(request.num_tokens - num_cached - num_external, budget)
                if num_new <= 0:
                    break  # a connector that supplied every token at once: nothing left to compute
            # Blocks a load fills stay out of the prefix cache until their KV is there.
            if not self.kv.allocate_slots(
                request.request_id,
                request.all_token_ids,
                num_external,
                num_new,
                cached,
                not load_async,
                root_hash=request.block_root,
            ):
                break
            if request.lora is not None:
                loras.add(id(request.lora))
            self.waiting.popleft()
            self._admit(request, num_cached, num_external, load_async)
            if not load_async:
                out.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _load_fits(self, request: Request, cached: list[int]) -> bool:
        """Whether the pool holds the loading request's whole context and, beside it, the next step of
        every request admitted already (running or loading): a decode's next token, a prefill's whole
        prompt. Without this, the request that just loaded is the one preempted when they grow."""
        kv = self.kv
        reserve = sum(kv.num_blocks_to_grow(r.request_id, r.num_tokens + 1) for r in self.running)
        reserve += sum(
            kv.num_blocks_to_grow(load.request.request_id, load.request.num_tokens + 1)
            for load in self.loading.values()
        )
        return kv.num_blocks_to_admit(request.num_tokens, cached) + reserve <= kv.pool.num_free_blocks

    def _match(self, request: Request) -> tuple[list[int], int, bool]:
        """The request's prefix-cache hit (blocks), the tokens after it the connector supplies, and
        whether they come asynchronously. Requests asking for prompt logprobs compute every prompt
        position themselves."""
        if request.wants_prompt_logprobs:
            return [], 0, False
        cached = self.kv.find_cached_prefix(request.all_token_ids, request.block_root)
        num_external, load_async = self.connector.get_num_new_matched_tokens(
            request, len(cached) * self.kv.block_size
        )
        return cached, num_external, load_async and num_external > 0

    def _admit(self, request: Request, num_cached: int, num_external: int, load_async: bool) -> None:
        """The request holds its blocks: it runs, or waits in `loading` for the connector's KV."""
        if not request.wants_prompt_logprobs:
            self.kv.record_prefix_lookup(request.num_tokens, num_cached)
        if request.num_preemptions == 0:
            request.num_cached_tokens = num_cached
        request.num_computed_tokens = num_cached + num_external
        block_ids = list(self.kv.block_ids(request.request_id))
        self.connector.update_state_after_alloc(request, block_ids, num_external)
        self._admitted[request.request_id] = self._num_admitted
        self._num_admitted += 1
        if load_async:
            request.status = RequestStatus.WAITING_FOR_KV
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
            self.loading[request.request_id] = _Load(request, num_cached)
        else:
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, requeue first; the tokens so far are kept."""
        self.kv.free(request.request_id)
        self._admitted.pop(request.request_id, None)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------ after the forward

    def advance(self, plan: SchedulerOutput) -> None:
        """Once the step is launched: each scheduled request's computed tokens, and a pending token for
        each that samples (its value comes with `apply_sampled`). With async scheduling this runs before
        an earlier step's `apply_sampled`, so the next schedule sees what the step in flight will do."""
        for s in plan.scheduled:
            request = s.request
            if request.status.finished:
                continue  # a connector ended it this step (a failed send)
            if s.samples:
                request.num_pending_tokens += 1
            request.num_computed_tokens += s.num_new_tokens

    def update(
        self,
        plan: SchedulerOutput,
        sampled: dict[str, tuple[list[int], list[TokenLogprobs]]],
        prompt_logprobs: dict[str, list[TokenLogprobs]],
    ) -> list[CoreOutput]:
        """A synchronous step's whole update: `advance`, then `apply_sampled`."""
        self.advance(plan)
        return self.apply_sampled(plan, sampled, prompt_logprobs)

    def apply_sampled(
        self,
        plan: SchedulerOutput,
        sampled: dict[str, tuple[list[int], list[TokenLogprobs]]],
        prompt_logprobs: dict[str, list[TokenLogprobs]],
    ) -> list[CoreOutput]:
        """Apply what an advanced step sampled: each scheduled request's sampled tokens (`sampled`: with
        drafts, the accepted ones then the target's), their logprobs, this step's prompt logprobs, and
        its end when a token ends it. Returns what each request produced. A request that ended meanwhile
        (a token of the step before, an abort) gets nothing: what this step computed for it is dropped."""
        now = self.clock()
        outputs = []
        for s in plan.scheduled:
            if s.request.status.finished:
                continue  # a connector ended it this step (a failed send)
            request_id = s.request.request_id
            output = self._update_request(s, sampled.get(request_id), prompt_logprobs.get(request_id), now)
            if output is not None:
                outputs.append(output)
        return outputs

    def _update_request(
        self,
        s: ScheduledRequest,
        sampled: tuple[list[int], list[TokenLogprobs]] | None,
        scored: list[TokenLogprobs] | None,
        now: float,
    ) -> CoreOutput | None:
        request = s.request
        new_prompt_logprobs = self._add_prompt_logprobs(request, scored)
        if sampled is None:
            return None if new_prompt_logprobs is None else core_output(request, [], [], new_prompt_logprobs)
        request.num_pending_tokens -= 1
        tokens, logprobs = sampled
        tokens = self._accept_drafts(s, tokens) if s.draft_token_ids else self._append_tokens(request, tokens)
        request.logprobs.extend(logprobs)
        first_token = request.first_token_time is None
        if first_token:
            request.first_token_time = now
            if request.wants_prompt_logprobs and new_prompt_logprobs is None:
                new_prompt_logprobs = request.prompt_logprobs  # 1-token prompts score nothing
        if request.status.finished:
            # Blocks filled before its last token stay findable, as when every step is synchronous (with
            # one in flight, the allocation that would have registered them has not happened).
            end = min(request.num_computed_tokens, request.num_tokens - 1)
            self.kv.cache_blocks(request.request_id, request.all_token_ids, end)
            self.finish(request, request.status)
        output = core_output(request, tokens, logprobs, new_prompt_logprobs)
        if first_token:
            scheduled = request.first_scheduled_time or request.arrival_time
            output.queue_time = scheduled - request.arrival_time
            output.prefill_time = now - scheduled
        return output

    @staticmethod
    def _add_prompt_logprobs(request: Request, scored: list[TokenLogprobs] | None) -> list | None:
        """Append this step's prompt logprobs; all of them once the whole prompt is scored, else None."""
        if scored is None:
            return None
        request.prompt_logprobs.extend(scored)
        return (
            request.prompt_logprobs if len(request.prompt_logprobs) == request.num_prompt_tokens - 1 else None
        )

    def _append_tokens(self, request: Request, tokens: list[int]) -> list[int]:
        """Append tokens one by one until one ends the request; returns those appended."""
        for count, token in enumerate(tokens, start=1):
            request.append_token(token)
            request.check_stop(self.max_model_len)
            if request.status.finished:
                return tokens[:count]
        return tokens

    def _accept_drafts(self, s: ScheduledRequest, emitted: list[int]) -> list[int]:
        """Append what verification emitted; keep KV only for tokens that are now the request's.

        The step computed KV for the last token and every draft; that of the accepted drafts is
        valid, the rest is rolled back (the blocks past it freed). The last emitted token, the
        target's own, has no KV yet: computed = tokens - 1, as after any decode.
        """
        request = s.request
        appended = self._append_tokens(request, emitted)
        request.num_computed_tokens = request.num_tokens - 1
        if not request.status.finished:
            self.kv.trim(request.request_id, request.num_computed_tokens)
        return appended

    # ------------------------------------------------------------------ what the connector reported

    def apply_connector_events(self, events: ConnectorEvents) -> list[CoreOutput]:
        """Aborts first, so that a request whose send failed this step ends before `update` hands out
        its token; then loads done or failed, and blocks the connector let go. Returns the outputs of
        the requests that ended here."""
        outputs = []
        for request_id in sorted(events.aborted):
            request = self.requests.get(request_id)
            if request is not None:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                outputs.append(core_output(request, [], [], None))
        for request_id, tokens in events.finished_loading.items():
            output = self._finish_loading(request_id, tokens)
            if output is not None:
                outputs.append(output)
        for request_id in sorted(events.load_failed):
            self._fail_loading(request_id)
        for request_id in events.finished_sending & self.held_by_connector:
            self.held_by_connector.discard(request_id)
            self.kv.free(request_id)
        return outputs

    def _finish_loading(self, request_id: str, tokens: list[int]) -> CoreOutput | None:
        """Its KV is in place: append the tokens that came with it (not emitted again: whoever sampled
        them did), then run it; an output only when those tokens end it."""
        load = self.loading.pop(request_id, None)
        if load is None:
            return None  # it ended meanwhile
        request = load.request
        request.status = RequestStatus.RUNNING
        # Findable at once: preempted before it runs, it finds its KV on the device, not in a tier again.
        self.kv.cache_blocks(request_id, request.all_token_ids, request.num_computed_tokens)
        if tokens:
            self._append_tokens(request, tokens)
            request.first_token_time = self.clock()
        if request.status.finished:
            self.finish(request, request.status)
            return core_output(request, [], [], None)
        self._run_in_admission_order(request)
        return None

    def _run_in_admission_order(self, request: Request) -> None:
        """Join the running requests before those admitted after it (preemption takes the last ones)."""
        order = self._admitted.get(request.request_id, self._num_admitted)
        index = len(self.running)
        while index > 0 and self._admitted.get(self.running[index - 1].request_id, -1) > order:
            index -= 1
        self.running.insert(index, request)

    def _fail_loading(self, request_id: str) -> None:
        """The load failed: compute from what the device held (its blocks are kept for that)."""
        load = self.loading.pop(request_id, None)
        if load is not None:
            load.request.num_computed_tokens = load.num_device_tokens
            load.request.status = RequestStatus.RUNNING
            self._run_in_admission_order(load.request)

    # ------------------------------------------------------------------ the end

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (finished or aborted): the connector hears of it, and its blocks are freed
        unless the connector still reads them."""
        request.status = status
        self.requests.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.loading.pop(request.request_id, None)
        self._admitted.pop(request.request_id, None)
        if self.connector.request_finished(request):
            self.held_by_connector.add(request.request_id)
        else:
            self.kv.free(request.request_id)


def core_output(
    request: Request, tokens: list[int], logprobs: list[TokenLogprobs], prompt_logprobs: list | None
) -> CoreOutput:
    finished = request.status.finished
    return CoreOutput(
        request_id=request.request_id,
        new_token_ids=tokens,
        new_logprobs=logprobs,
        finished=finished,
        finish_reason=request.status.value if finished else None,
        stop_reason=request.stop_reason,
        prompt_logprobs=prompt_logprobs,
        num_cached_tokens=request.num_cached_tokens,
    )
