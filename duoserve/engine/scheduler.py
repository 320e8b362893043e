"""Continuous batching under one token budget per step (vLLM v1's scheduler, simplified).

Each request only says how many of its tokens have KV (`num_computed_tokens`) out of how many it
has (`num_tokens`). Each step hands out `max_num_batched_tokens`: running requests first, in
admission order (a decode needs one token; a partly prefilled prompt takes what is left of the
budget), then waiting requests, whose cached prefix counts as computed. So chunked prefill,
prefix hits, preemption (computed reset to 0) and decoding are one mechanism.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from duoserve.engine.request import Request, RequestStatus
from duoserve.kv.kv_cache_manager import KVCacheManager


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # draft tokens included
    # Speculative draft tokens scheduled after the request's last token, for the target to verify.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request's tokens, so the step samples one more."""
        end = self.request.num_tokens + len(self.draft_token_ids)
        return self.request.num_computed_tokens + self.num_new_tokens == end


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        clock: Callable[[], float] = time.monotonic,
        max_loras: int = 0,
    ) -> None:
        """`clock` stamps first_scheduled_time (the planner's simulator, duoserve/plan, passes its own).
        `max_loras`: most LoRA adapters among the running requests (so in any one step), as vLLM's."""
        self.kv = kv
        self.clock = clock
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_awaiting_kv(self, request: Request) -> None:
        """A request whose prompt KV another worker computes: known (abortable) but not scheduled
        until `resume_with_kv` puts it in the running batch."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request

    def resume_with_kv(self, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_schedulable(self) -> bool:
        """Whether a step would do anything (requests waiting for remote KV alone do not count)."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._free_out_of_window()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = self._take_drafts(request, budget - num_new)
            if not drafts and not self._allocate_or_preempt(request, num_new, out):
                break  # the request preempted itself: everything after it is gone too
            out.scheduled.append(ScheduledRequest(request, num_new + len(drafts), drafts))
            budget -= num_new + len(drafts)
            index += 1
        if not out.preempted:
            self._admit_waiting(budget, out)
        now = self.clock()
        for s in out.scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        return out

    def _free_out_of_window(self) -> None:
        """With a sliding window on every layer, running requests give back the blocks no query of theirs
        sees any more, before this step allocates.

        A prefill worker's request keeps its prompt blocks: they are exported to the decode worker as
        they fill, and the request ends at its first token anyway.
        """
        if self.kv.sliding_window is None:
            return
        for request in self.running:
            if request.kv_destination is None:
                self.kv.free_out_of_window(
                    request.request_id, request.all_token_ids, request.num_computed_tokens
                )

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
        loras = {id(r.lora) for r in self.running if r.lora is not None}
        skipped: list[Request] = []  # waiting on an adapter slot: they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.lora is not None and id(request.lora) not in loras and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            # Requests asking for prompt logprobs compute every prompt position themselves.
            cached = (
                []
                if request.wants_prompt_logprobs
                else self.kv.find_cached_prefix(request.all_token_ids, request.block_root)
            )
            num_cached = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(
                request.request_id, request.all_token_ids, 0, num_new, cached, root_hash=request.block_root
            ):
                break
            if request.lora is not None:
                loras.add(id(request.lora))
            if not request.wants_prompt_logprobs:
                self.kv.record_prefix_lookup(request.num_tokens, num_cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.waiting.popleft()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, requeue first; the tokens so far are kept."""
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (finished or aborted) and free its blocks."""
        request.status = status
        self.requests.pop(request.request_id, None)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
