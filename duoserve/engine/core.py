"""The engine core: scheduler + KV cache + model + sampler, one `step()` at a time.

It deals in token ids only; text (tokenizing, detokenizing, stop strings) is the front end's
job, so the core can run in its own process and be fed ids from anywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from duoserve.attention.selector import make_attention_backend
from duoserve.config import EngineConfig
from duoserve.disagg.kv_transfer import (
    KVBlocks,
    KVLayout,
    KVMessage,
    KVSendTransport,
    KVTicket,
    KVTransferError,
    KVTransferParams,
    TransferStats,
    decode_blocks,
)
from duoserve.engine.model_runner import StepBatch, make_decode_graphs, prepare_batch, run_model
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.sampler import Sampler, SamplingRow, compute_logprobs
from duoserve.engine.scheduler import ScheduledRequest, Scheduler
from duoserve.hardware import cgroup_memory_available, host_defaults
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.kv_cache_manager import NULL_BLOCK, KVCacheManager
from duoserve.models.config import ModelConfig
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel
from duoserve.platform import keep_freed_memory, release_freed_memory
from duoserve.sampling_params import SamplingParams
from duoserve.spec.ngram import NgramProposer
from duoserve.spec.proposer import Proposer
from duoserve.spec.speculator import Speculator
from duoserve.spec.verify import DraftVerification, position_rows, verify

logger = logging.getLogger(__name__)


@dataclass
class CoreOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    # Per new token: ({token id: logprob} of the top ones and the sampled one, the sampled one's rank).
    new_logprobs: list[tuple[dict[int, float], int]]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    prompt_logprobs: list[tuple[dict[int, float], int]] | None = None  # once, when the prompt is scored
    num_cached_tokens: int = 0
    # With the request's first sampled token only: seconds from its arrival to its first step, and
    # from then to this token (vLLM's queue and prefill phases). Carried here, not looked up later,
    # because a request may be gone from the core by the time anyone asks.
    queue_time: float | None = None
    prefill_time: float | None = None


@dataclass
class StepStats:
    num_scheduled_tokens: int = 0
    num_preempted: int = 0
    forward_seconds: float = 0.0
    total_seconds: float = 0.0


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.device = config.resolved_device()
        if self.device.type == "cpu":
            self._use_host_threads(config.num_threads)
            keep_freed_memory()
            logger.info("%s%s", host_defaults().describe(), _overrides(config))
        model_config: ModelConfig = loaded.config
        spec = KVCacheSpec.for_model(model_config, config.block_size, config.resolved_kv_dtype())
        num_blocks = self._num_blocks(spec)
        # A request must always fit the cache on its own, or it could never be scheduled.
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings, num_blocks * config.block_size
        )
        quantized_max_rows = config.resolved_quantized_max_rows()
        self.model = LlamaModel(
            model_config,
            loaded.weights,
            make_attention_backend(config.attention_backend, self.device),
            self.device,
            config.resolved_dtype(),
            max_positions=self.max_model_len,
            quantized=loaded.quantized if config.quantization == "auto" and quantized_max_rows else None,
            quantized_max_rows=quantized_max_rows,
        )
        self.model_config = model_config
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        # CUDA graphs of decode steps where the device and the model allow them (None: all steps eager).
        self.decode_graphs = make_decode_graphs(self.model, self.kv_cache, config, self.max_model_len)
        self.kv_layout = KVLayout.of(spec)
        self.kv = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching, model_config.kv_sliding_window()
        )
        # Disaggregation: the sender a prefill worker pushes KV with (set by the engine process), the
        # decode side's requests waiting for their prompt's KV, and transfer counters.
        self.kv_sender: KVSendTransport | None = None
        self.awaiting_kv: dict[str, Request] = {}
        self.transfer_stats = TransferStats()
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler(config.seed)
        self.speculator = (
            None
            if config.speculative is None
            else Speculator(config, self._proposer(loaded, num_blocks), self.max_model_len)
        )
        self.last_step = StepStats()
        if self.device.type == "cpu":
            release_freed_memory()  # the transients of building the layers
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
            num_blocks,
            config.block_size,
            num_blocks * spec.bytes_per_block / 2**20,
            self.max_model_len,
        )

    @staticmethod
    def _use_host_threads(num_threads: int | None) -> None:
        """The configured thread count, else at most the cores this process may use: torch's default
        counts the machine's cores, not a container's CPU quota (never raised: a caller that chose
        fewer threads, e.g. tests of tiny models, keeps them)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        elif torch.get_num_threads() > host_defaults().num_threads:
            torch.set_num_threads(host_defaults().num_threads)

    def _proposer(self, loaded: LoadedModel, num_blocks: int) -> Proposer:
        if self.config.speculative == "ngram":
            return NgramProposer(self.config.ngram_min, self.config.ngram_max)
        from duoserve.spec.draft import DraftProposer

        return DraftProposer.build(self.config, loaded, num_blocks, self.max_model_len, self.device)

    def _num_blocks(self, spec: KVCacheSpec) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        memory = self.config.kv_cache_memory
        if memory is None:
            memory = int(_free_memory(self.device) * self.config.kv_cache_memory_fraction)
        num_blocks = spec.num_blocks_for(memory)
        if num_blocks < 1:
            raise ValueError(f"a KV cache of {memory} bytes holds no block of {spec.bytes_per_block} bytes")
        return num_blocks

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        kv_transfer: KVTransferParams | None = None,
    ) -> None:
        """Validate and queue a request; ValueError names what is wrong with it.

        With `kv_transfer`, the request is one half of a disaggregated one: 'send' (prefill worker:
        compute the prompt, sample the first token, push the KV to the ticket's blocks) or 'receive'
        (decode worker: hold blocks for the prompt, wait for its KV and first token, then decode).
        """
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt} tokens; this engine's context holds at most "
                f"{self.max_model_len} tokens (prompt + at least one generated token)"
            )
        room = self.max_model_len - num_prompt
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {num_prompt} tokens and the "
                f"context holds {self.max_model_len}, so at most {room} tokens can be generated"
            )
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            max_tokens=params.max_tokens if params.max_tokens is not None else room,
            stop_token_ids=frozenset(stop_ids),
        )
        if kv_transfer is None:
            self.scheduler.add(request)
        elif kv_transfer.role == "send":
            self._check_ticket(kv_transfer.ticket, num_prompt)
            request.kv_destination = kv_transfer.ticket
            request.kv_next_block = kv_transfer.ticket.num_cached_tokens // self.config.block_size
            request.max_tokens = 1  # the decode worker generates the rest
            self.scheduler.add(request)
        else:
            self.scheduler.add_awaiting_kv(request)
            self.awaiting_kv[request_id] = request

    def _check_ticket(self, ticket: KVTicket, num_prompt: int) -> None:
        bs = self.config.block_size
        if ticket.layout != self.kv_layout:
            raise ValueError(
                f"kv_transfer: the decode worker's KV layout {ticket.layout} is not ours ({self.kv_layout})"
            )
        if len(ticket.block_ids) != -(-num_prompt // bs):
            raise ValueError(
                f"kv_transfer: {len(ticket.block_ids)} blocks cannot hold a {num_prompt}-token prompt"
            )
        if ticket.num_cached_tokens % bs or not 0 <= ticket.num_cached_tokens < num_prompt:
            raise ValueError(
                f"kv_transfer: num_cached_tokens={ticket.num_cached_tokens} is not whole blocks of the prompt"
            )

    def abort(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self._finish(request, RequestStatus.FINISHED_ABORTED)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """The one way a request leaves the core, however it ends: every table that knows it forgets it."""
        self.scheduler.finish(request, status)
        self.awaiting_kv.pop(request.request_id, None)
        if self.speculator is not None:
            self.speculator.retain(self.scheduler.requests)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_schedulable(self) -> bool:
        return self.scheduler.has_schedulable()

    # ------------------------------------------------------------------ receiving KV (decode worker)

    def issue_tickets(self, address: str) -> list[KVTicket]:
        """Allocate the prompt's blocks for requests awaiting KV that have none yet; their tickets.

        The blocks stay out of the prefix cache until their KV has arrived. A request that does not
        fit now waits for blocks to come free (its wait counts towards the transfer timeout).
        """
        tickets = []
        now = time.monotonic()
        for request in self.awaiting_kv.values():
            if request.kv_ticket is not None:
                continue
            num_cached = self.kv.allocate_for_import(request.request_id, request.prompt_token_ids)
            if num_cached is None:
                break
            request.num_cached_tokens = num_cached
            request.first_scheduled_time = now
            request.kv_ticket = KVTicket(
                request.request_id,
                address,
                list(self.kv.block_ids(request.request_id)),
                num_cached,
                self.kv_layout,
            )
            tickets.append(request.kv_ticket)
        return tickets

    def expects_kv(self, request_id: str) -> bool:
        """Whether KV for this request may arrive now: it waits for it and has its blocks (a ticket)."""
        request = self.awaiting_kv.get(request_id)
        return request is not None and request.kv_ticket is not None

    def receive_kv(self, message: KVMessage, payload: memoryview | None) -> CoreOutput | None:
        """Write arrived blocks into the request's cache; on KVDone, start decoding it.

        Returns an output only when the request ends here (a bad transfer aborts it). Messages for a
        request this worker does not wait for (aborted, timed out) are dropped.
        """
        request = self.awaiting_kv.get(message.request_id)
        if request is None or request.kv_ticket is None:
            return None
        ticket = request.kv_ticket
        expected = len(ticket.block_ids) - ticket.num_cached_tokens // self.kv.block_size
        try:
            if isinstance(message, KVBlocks):
                start = time.perf_counter()
                blocks = decode_blocks(message, payload, self.kv_layout)
                allowed = ticket.block_ids[ticket.num_cached_tokens // self.kv.block_size :]
                if not set(message.block_ids) <= set(allowed):
                    raise KVTransferError(f"blocks {message.block_ids} are not the ticket's")
                self.kv_cache.import_blocks(message.block_ids, blocks)
                request.kv_blocks_received += len(message.block_ids)
                self.transfer_stats.bytes += message.nbytes
                self.transfer_stats.busy_seconds += time.perf_counter() - start
                return None
            if message.num_blocks != expected or request.kv_blocks_received != expected:
                raise KVTransferError(
                    f"{request.kv_blocks_received} of {expected} blocks arrived "
                    f"(the sender says {message.num_blocks})"
                )
            if not 0 <= message.first_token < self.model_config.vocab_size:
                raise KVTransferError(f"first token {message.first_token} is out of the vocabulary")
        except KVTransferError as err:
            logger.warning("KV transfer of request %s failed: %s", request.request_id, err)
            return self._abort_awaiting(request)
        return self._start_decoding(request, message.first_token)

    def _start_decoding(self, request: Request, first_token: int) -> CoreOutput | None:
        del self.awaiting_kv[request.request_id]
        now = time.monotonic()
        self.transfer_stats.seconds += now - request.first_scheduled_time
        self.transfer_stats.requests += 1
        request.num_computed_tokens = request.num_prompt_tokens
        request.append_token(first_token)  # sampled by the prefill worker: not computed again here
        request.first_token_time = now
        request.check_stop(self.max_model_len)
        if request.status.finished:
            self._finish(request, request.status)
            return self._output(request, [], [], None)
        self.scheduler.resume_with_kv(request)
        return None

    def expire_kv_waits(self, timeout: float) -> list[CoreOutput]:
        """Abort requests whose KV has not all arrived `timeout` seconds after they came."""
        now = time.monotonic()
        expired = [r for r in self.awaiting_kv.values() if now - r.arrival_time > timeout]
        for request in expired:
            logger.warning(
                "request %s: no KV from the prefill worker after %.0fs; aborted", request.request_id, timeout
            )
        return [self._abort_awaiting(r) for r in expired]

    def _abort_awaiting(self, request: Request) -> CoreOutput:
        self.abort(request.request_id)
        return self._output(request, [], [], None)

    # ------------------------------------------------------------------ sending KV (prefill worker)

    def _send_kv(self, request: Request, first_token: int | None) -> None:
        """Push the prompt blocks this step completed (all of them, with the first token, at the end).

        A failed send aborts the request; the decode worker times out its own half.
        """
        ticket = request.kv_destination
        bs = self.kv.block_size
        num_computed = min(request.num_computed_tokens, request.num_prompt_tokens)
        end = -(-num_computed // bs) if first_token is not None else num_computed // bs
        start = request.kv_next_block
        try:
            if end > start:
                source = self.kv.block_ids(request.request_id)[start:end]
                if NULL_BLOCK in source:  # the scheduler keeps a sending request's blocks: a bug if not
                    raise KVTransferError(f"blocks {start}..{end - 1} were freed before they were sent")
                self.kv_sender.send_blocks(
                    ticket, ticket.block_ids[start:end], self.kv_cache.export_blocks(source)
                )
                request.kv_next_block = end
            if first_token is not None:
                num_sent = len(ticket.block_ids) - ticket.num_cached_tokens // bs
                self.kv_sender.send_done(ticket, first_token, num_sent)
        except KVTransferError as err:
            logger.warning("request %s: %s; aborted", request.request_id, err)
            request.status = RequestStatus.FINISHED_ABORTED

    # ------------------------------------------------------------------ the step

    def step(self) -> list[CoreOutput]:
        start = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        batch = prepare_batch(plan.scheduled, self.kv, self.device)
        # Only the speculator's rate back-off needs it: whether every request decodes (no prefill).
        pure_decode = self.speculator is not None and all(s.request.is_decoding for s in plan.scheduled)
        forward_start = time.perf_counter()
        hidden = run_model(self.model, self.decode_graphs, batch, self.kv_cache)
        sampled = self._sample(batch, hidden)
        prompt_done = self._score_prompts(batch, hidden)
        forward_seconds = time.perf_counter() - forward_start
        outputs = self._update(plan.scheduled, sampled, prompt_done)
        if self.speculator is not None:
            emitted = sum(len(out.new_token_ids) for out in outputs) if pure_decode else None
            self.speculator.observe_step(forward_seconds, emitted)
        self.last_step = StepStats(
            num_scheduled_tokens=plan.num_tokens,
            num_preempted=len(plan.preempted),
            forward_seconds=forward_seconds,
            total_seconds=time.perf_counter() - start,
        )
        return outputs

    def _sample(self, batch: StepBatch, hidden: torch.Tensor) -> dict[str, tuple[list[int], list]]:
        """Per sampling request: its new tokens (with drafts: the accepted ones, then the target's)
        and their logprobs (requests with drafts never ask for logprobs)."""
        if not batch.sampling:
            return {}
        logits = self.model.compute_logits(hidden.index_select(0, batch.sample_rows))
        plain, plain_rows, drafted, drafted_rows = [], [], [], []
        offset = 0
        for s in batch.sampling:
            num_rows = 1 + len(s.draft_token_ids)
            if s.draft_token_ids:
                drafted.append(s)
                drafted_rows.extend(range(offset, offset + num_rows))
            else:
                plain.append(s)
                plain_rows.append(offset)
            offset += num_rows
        sampled = self._sample_plain(plain, _rows_of(logits, plain_rows))
        if drafted:
            items = [
                DraftVerification(
                    position_rows(_sampling_row(s.request), s.draft_token_ids), s.draft_token_ids
                )
                for s in drafted
            ]
            emitted = verify(_rows_of(logits, drafted_rows), items, self.sampler.generator)
            sampled.update(
                (s.request.request_id, (tokens, [])) for s, tokens in zip(drafted, emitted, strict=True)
            )
        return sampled

    def _sample_plain(
        self, scheduled: list[ScheduledRequest], logits: torch.Tensor
    ) -> dict[str, tuple[list[int], list]]:
        if not scheduled:
            return {}
        result = self.sampler(logits, [_sampling_row(s.request) for s in scheduled])
        return {
            s.request.request_id: ([token], [] if logprobs is None else [(logprobs, rank)])
            for s, token, logprobs, rank in zip(
                scheduled, result.token_ids, result.logprobs, result.ranks, strict=True
            )
        }

    def _score_prompts(self, batch: StepBatch, hidden: torch.Tensor) -> set[str]:
        """Prompt logprobs of this step's chunks; returns the requests whose prompt is now fully scored."""
        done = set()
        for item in batch.prompt_logprobs:
            request = item.scheduled.request
            num_top = request.params.prompt_logprobs
            logits = self.model.compute_logits(hidden.index_select(0, item.rows))
            scored = compute_logprobs(logits, item.targets, max(num_top, 1))
            entries = scored.as_dicts(item.targets, [num_top] * len(item.targets))
            request.prompt_logprobs.extend(zip(entries, scored.ranks.tolist(), strict=True))
            if len(request.prompt_logprobs) == request.num_prompt_tokens - 1:
                done.add(request.request_id)
        return done

    def _update(
        self,
        scheduled: list[ScheduledRequest],
        sampled: dict[str, tuple[list[int], list]],
        prompt_done: set[str],
    ) -> list[CoreOutput]:
        outputs = []
        now = time.monotonic()
        for s in scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            new_prompt_logprobs = request.prompt_logprobs if request.request_id in prompt_done else None
            if request.kv_destination is not None and request.request_id not in sampled:
                self._send_kv(request, None)
                if request.status.finished:  # the send failed
                    self._finish(request, request.status)
                    outputs.append(self._output(request, [], [], None))
                    continue
            if request.request_id not in sampled:
                if new_prompt_logprobs is not None:
                    outputs.append(self._output(request, [], [], new_prompt_logprobs))
                continue
            tokens, logprobs = sampled[request.request_id]
            tokens = (
                self._accept_drafts(s, tokens) if s.draft_token_ids else self._append_tokens(request, tokens)
            )
            request.logprobs.extend(logprobs)
            first_token = request.first_token_time is None
            if first_token:
                request.first_token_time = now
                if request.wants_prompt_logprobs and new_prompt_logprobs is None:
                    new_prompt_logprobs = request.prompt_logprobs  # 1-token prompts score nothing
            if request.kv_destination is not None:
                self._send_kv(request, tokens[-1])
            if request.status.finished:
                self._finish(request, request.status)
            output = self._output(request, tokens, logprobs, new_prompt_logprobs)
            if first_token:
                scheduled = request.first_scheduled_time or request.arrival_time
                output.queue_time = scheduled - request.arrival_time
                output.prefill_time = now - scheduled
            outputs.append(output)
        return outputs

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
        self.speculator.record(request, len(s.draft_token_ids), len(emitted) - 1)
        appended = self._append_tokens(request, emitted)
        request.num_computed_tokens = request.num_tokens - 1
        if not request.status.finished:
            self.kv.trim(request.request_id, request.num_computed_tokens)
        return appended

    @staticmethod
    def _output(request: Request, tokens: list[int], logprobs: list, prompt_logprobs) -> CoreOutput:
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

    def stats(self) -> dict[str, float]:
        return self._engine_stats() | (self._spec_stats() if self.speculator is not None else {})

    def _spec_stats(self) -> dict[str, float]:
        spec = self.speculator.stats
        per_pos = {
            f"spec_decode_num_accepted_tokens_per_pos:{j}": n for j, n in enumerate(spec.accepted_per_pos)
        }
        return {
            "spec_decode_num_drafts": spec.num_drafts,
            "spec_decode_num_draft_tokens": spec.num_draft_tokens,
            "spec_decode_num_accepted_tokens": spec.num_accepted_tokens,
            **per_pos,
        }

    def _engine_stats(self) -> dict[str, float]:
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_perc": self.kv.usage(),
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_transfer_bytes": self.transfer_stats.bytes
            + (self.kv_sender.stats.bytes if self.kv_sender else 0),
            "kv_transfer_seconds": self.transfer_stats.seconds,
            "kv_transfer_requests": self.transfer_stats.requests,
            "kv_transfer_busy_seconds": self.transfer_stats.busy_seconds
            + (self.kv_sender.stats.busy_seconds if self.kv_sender else 0.0),
        }


def _sampling_row(request: Request) -> SamplingRow:
    return SamplingRow(
        params=request.params,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=request.output_token_ids,
        generator=request.generator,
        stop_token_ids=request.stop_token_ids,  # a frozenset: shared, not copied per step
    )


def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows], without a copy when that is every row."""
    if len(rows) == logits.shape[0]:
        return logits
    return logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device))


def _overrides(config: EngineConfig) -> str:
    """The config's choices that replace the host's defaults, for the startup log line."""
    chosen = {
        "dtype": config.dtype if config.dtype != "auto" else None,
        "num_threads": config.num_threads,
        "quantized_max_rows": config.quantized_max_rows,
    }
    text = ", ".join(f"{name} {value}" for name, value in chosen.items() if value is not None)
    return f"; set by the config: {text}" if text else ""


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
                container = cgroup_memory_available()  # a pod's limit, which /proc/meminfo ignores
                return host if container is None else min(host, container)
    raise RuntimeError("cannot read available memory from /proc/meminfo")
