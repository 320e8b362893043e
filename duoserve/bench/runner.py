"""Driving the load: arrivals, a concurrency cap, conversations turn by turn, and the overall timeout.

Both load shapes are one mechanism, as in vLLM: conversations arrive on a schedule (all at once for an
infinite --request-rate) and each waits for one of --concurrency slots. Fixed concurrency is an infinite
rate with a cap; a rate without a cap is open-loop. By default a conversation holds its slot across its
turns, so with multi-turn each slot is one user who reads the answer and asks the next question.

With --max-active-conversations M (vLLM's benchmarks/multi_turn), up to M conversations are active at
once, each holding an active place across its turns, while each turn takes a --concurrency slot only
while its request runs. The slots are a FIFO semaphore, so a conversation's next turn queues behind the
turns already waiting and the active conversations take turns round-robin: many users whose histories
together outgrow a server's KV pool while the requests in flight fit it. That is the load a KV offload
tier is for; with slots held across turns, histories outgrow the pool only if the in-flight requests do,
and a returning turn then mostly waits for room (duoserve, issue 14, 2 vCPUs: returning-turn TTFT p50
2.1-2.6 s with or without the tier, requests queued ~1.1-1.25 s on average in both).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from duoserve.bench.arrivals import arrival_offsets
from duoserve.bench.client import BenchClient, Clock
from duoserve.bench.datasets import Conversation
from duoserve.bench.payload import RequestOptions, build_body
from duoserve.bench.records import RequestRecord


@dataclass
class LoadConfig:
    concurrency: int | None = None  # requests (conversations) in flight at most; None: no cap
    max_active_conversations: int | None = None  # None: a conversation holds its slot across its turns
    request_rate: float = math.inf  # conversations per second
    burstiness: float = 1.0
    seed: int = 0
    timeout: float = 3600.0  # whole run; what is still running then is cancelled and recorded as failed
    progress: bool = True


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration: float  # seconds from the first arrival slot to the last response (or the timeout)
    not_started: int  # requests never sent: cut off by the timeout, or later turns after a failed turn


@dataclass
class _Run:
    client: BenchClient
    opts: RequestOptions
    clock: Clock
    progress: tqdm
    records: list[RequestRecord] = field(default_factory=list)
    ids: itertools.count = field(default_factory=itertools.count)


async def _run_conversation(
    conv: Conversation, run: _Run, turn_slot: contextlib.AbstractAsyncContextManager
) -> None:
    """The turns in order, each inside `turn_slot` (a request slot, or nothing when the conversation
    holds one already)."""
    answers: list[str] = []
    context_tokens = conv.system_len  # what this turn's request carries: all earlier turns and replies
    for k, turn in enumerate(conv.turns):
        context_tokens += turn.prompt_len
        body = build_body(run.opts, conv, k, answers)
        async with turn_slot:  # a turn still waiting for a slot at the timeout was never sent
            record = RequestRecord(next(run.ids), conv.conv_id, k, context_tokens, turn.output_len)
            run.records.append(record)  # before sending, so a cancelled request is still reported
            await run.client.stream(body, record, run.clock)
        run.progress.update(1)
        if not record.success:
            return  # later turns would quote an answer that does not exist
        answers.append(record.generated_text)
        context_tokens += record.output_tokens


@dataclass
class _Gates:
    """What a conversation holds across its turns (`conversation`) and what each turn holds (`turn`)."""

    conversation: contextlib.AbstractAsyncContextManager
    turn: contextlib.AbstractAsyncContextManager


async def _arrive(conv: Conversation, offset: float, run: _Run, gates: _Gates) -> None:
    await asyncio.sleep(max(0.0, offset - run.clock()))
    async with gates.conversation:
        await _run_conversation(conv, run, gates.turn)


def _semaphore(limit: int | None, option: str) -> contextlib.AbstractAsyncContextManager:
    if limit is None:
        return contextlib.nullcontext()
    if limit < 1:
        raise ValueError(f"{option} must be >= 1")
    return asyncio.Semaphore(limit)  # FIFO: waiters are woken in the order they came


def _gates(load: LoadConfig) -> _Gates:
    slots = _semaphore(load.concurrency, "--concurrency")
    if load.max_active_conversations is None:
        return _Gates(slots, contextlib.nullcontext())
    return _Gates(_semaphore(load.max_active_conversations, "--max-active-conversations"), slots)


async def run_load(
    convs: list[Conversation], client: BenchClient, opts: RequestOptions, load: LoadConfig
) -> RunOutcome:
    offsets = arrival_offsets(len(convs), load.request_rate, load.burstiness, load.seed)
    gates = _gates(load)
    total = sum(len(c.turns) for c in convs)
    start = time.perf_counter()
    with tqdm(total=total, unit="req", disable=not load.progress, dynamic_ncols=True) as bar:
        run = _Run(client, opts, lambda: time.perf_counter() - start, bar)
        tasks = [asyncio.create_task(_arrive(c, o, run, gates)) for c, o in zip(convs, offsets, strict=True)]
        done, pending = await asyncio.wait(tasks, timeout=load.timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    duration = run.clock()
    for task in done:  # a bug in our own code must not pass as a benchmark result
        exc = task.exception()
        if exc is not None:
            raise exc
    return RunOutcome(run.records, duration, total - len(run.records))
