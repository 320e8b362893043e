"""The engine core: scheduler + KV cache + model + sampler, one `step()` at a time.

It deals in token ids only; text (tokenizing, detokenizing, stop strings) is the front end's
job, so the core can run in its own process and be fed ids from anywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from duoserve.attention.selector import make_attention_backend
from duoserve.config import EngineConfig
from duoserve.engine.model_runner import (
    HostCopy,
    PendingTokens,
    StepBatch,
    make_decode_graphs,
    prepare_batch,
    run_model,
    to_device,
)
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.sampler import (
    InFlight,
    Sampler,
    SamplingRow,
    compute_logprobs,
    penalised,
    waits_for_output,
)
from duoserve.engine.scheduler import CoreOutput, ScheduledRequest, Scheduler, SchedulerOutput, TokenLogprobs
from duoserve.engine.spec.ngram import NgramProposer
from duoserve.engine.spec.proposer import Proposer
from duoserve.engine.spec.speculator import Speculator
from duoserve.engine.spec.verify import DraftVerification, position_rows, verify
from duoserve.engine.step_observer import MakeStepObserver
from duoserve.engine.structured import GrammarMasks, StructuredOutputs
from duoserve.hardware import cgroup_memory_available, host_defaults
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.connector import KVConnector, MultiConnector
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.kv.offload.connector import OffloadConnector
from duoserve.kv.quant import kv_dtype_name
from duoserve.lora.manager import LoRAManager, lora_manager_for
from duoserve.lora.request import LoRARequest
from duoserve.models.config import ModelConfig
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel
from duoserve.platform import keep_freed_memory, release_freed_memory
from duoserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    num_scheduled_tokens: int = 0
    num_preempted: int = 0
    forward_seconds: float = 0.0
    total_seconds: float = 0.0
    overlapped: bool = False  # left in flight, its results applied by the next step (async scheduling)


# Per sampling request: its new tokens and their logprobs (as `Scheduler.apply_sampled` takes them).
Sampled = dict[str, tuple[list[int], list[TokenLogprobs]]]


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device: its results, or where they will be.

    A synchronous step's sampled tokens are read at once (`sampled`); an overlapped one's stay on the
    device (`pending`), fed from there to the next step, and come to the host when it is applied.
    """

    plan: SchedulerOutput
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    sampled: Sampled | None = None  # None until an overlapped step's tokens are read (`results`)
    pending: PendingTokens | None = None

    def results(self) -> Sampled:
        if self.sampled is None:
            token_ids = self.pending.host.tolist()
            rows = self.pending.rows
            self.sampled = {request_id: ([token_ids[row]], []) for request_id, row in rows.items()}
        return self.sampled


__all__ = ["CoreOutput", "EngineCore", "StepStats"]  # CoreOutput: made by the scheduler, re-exported


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel,
        make_connector: Callable[[EngineCore], KVConnector] | None = None,
        make_step_observer: MakeStepObserver | None = None,
    ) -> None:
        """`make_connector` builds the KV connector (P/D transfer, offload) from the core, whose KV
        cache, pool and limits size it; the engine itself knows no transport. `make_step_observer`
        builds what sees each step (--step-trace: duoserve/engine/step_observer.py), from the whole core."""
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
            quantized_activations=config.resolved_quantized_activations(),
        )
        self.model_config = model_config
        self.lora: LoRAManager | None = None
        if config.enable_lora:
            self.lora = lora_manager_for(self.model, model_config, config.max_loras, config.max_lora_rank)
            for lora_request in config.lora_requests():
                self.lora.load(lora_request)
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        # CUDA graphs of decode steps where the device and the model allow them (None: all steps eager).
        self.decode_graphs = make_decode_graphs(self.model, self.kv_cache, config, self.max_model_len)
        self.kv = KVCacheManager(
            num_blocks, config.block_size, config.enable_prefix_caching, model_config.kv_sliding_window()
        )
        # Always a MultiConnector (of none, one or several): one object whose optional hooks all exist.
        # P/D transfer first: a decode worker's prompt comes whole from its prefill worker.
        connectors = [make_connector(self)] if make_connector else []
        offload = OffloadConnector.from_config(config, spec, self.kv_cache, loaded.source)
        self.connector = MultiConnector([*connectors, *([offload] if offload else [])])
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            self.max_model_len,
            connector=self.connector,
            max_loras=config.max_loras,
        )
        self.sampler = Sampler(config.seed)
        self.structured = StructuredOutputs(
            loaded.source,
            model_config.vocab_size,
            model_config.eos_token_ids,
            logits_on_host=self.device.type == "cpu",
            # An accelerator's forward leaves the CPU free for masks; a CPU's is decided by its cores.
            overlap=None if self.device.type == "cpu" else True,
        )
        self.speculator = (
            None
            if config.speculative is None
            else Speculator(config, self._proposer(loaded, num_blocks), self.max_model_len)
        )
        self.async_scheduling = self._async_scheduling()
        self._in_flight: LaunchedStep | None = None  # the overlapped step whose results are not applied yet
        self.last_step = StepStats()
        self.step_observer = make_step_observer(self) if make_step_observer else None
        if config.step_trace and self.step_observer is None:
            logger.warning("--step-trace %s: this engine's caller writes no step trace", config.step_trace)
        if self.device.type == "cpu":
            release_freed_memory()  # the transients of building the layers
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB, %s), max_model_len %d",
            num_blocks,
            config.block_size,
            num_blocks * spec.bytes_per_block / 2**20,
            kv_dtype_name(spec.dtype),
            self.max_model_len,
        )

    def _async_scheduling(self) -> bool:
        """Whether steps may overlap: as configured, except beside a speculator (its drafts are proposed
        from the last token) or a KV connector (it moves a step's KV once that step is done)."""
        if not self.config.resolved_async_scheduling():
            return False
        present = {"speculative decoding": self.speculator, "KV connectors": self.connector.connectors}
        blockers = [name for name, there in present.items() if there]
        if blockers and self.config.async_scheduling:
            logger.warning("--async-scheduling: steps run synchronously beside %s", " and ".join(blockers))
        return not blockers

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
        from duoserve.engine.spec.draft import DraftProposer

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
        kv_transfer_params: object | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validate and queue a request; ValueError names what is wrong with it. `lora_request`: the
        adapter it runs with (loaded on first use).

        `kv_transfer_params` are for the KV connector alone (P/D: which half of a disaggregated
        request this is), which may refuse them or limit the tokens generated here.
        """
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(
                f"logit_bias: token id {max(params.logit_bias)} is not in the vocabulary [0, {vocab})"
            )
        self.structured.check(params)  # the first constrained request builds the tokenizer's tables
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
            kv_transfer_params=kv_transfer_params,
            lora=self._adapter(lora_request),
        )
        limit = self.connector.check_request(request)
        if limit is not None:
            request.max_tokens = min(request.max_tokens, limit)
        self.scheduler.add(request)

    def _adapter(self, lora_request: LoRARequest | None):
        if lora_request is None:
            return None
        return self._loras().resolve(lora_request)

    def _loras(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA adapters are not enabled: start the engine with --enable-lora")
        return self.lora

    def load_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter at run time (ValueError: not enabled, name taken, or it does not fit)."""
        self._loras().load(lora_request)

    def unload_lora(self, name: str) -> bool:
        """Unload an adapter (requests using it finish with it); False if none has that name."""
        return self._loras().unload(name)

    def abort(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            self._forget_finished()

    def _forget_finished(self) -> None:
        """Requests ended: the speculator's per-request state goes with them (the scheduler's is gone)."""
        if self.speculator is not None:
            self.speculator.retain(self.scheduler.requests)

    def close(self) -> None:
        """At a graceful shutdown: connectors that keep KV save it (the offload tier writes the prefixes
        the pool still caches to disk, so a restart finds them too)."""
        self.connector.close(self.kv.pool)
        if self.step_observer is not None:
            self.step_observer.close(self.last_step.total_seconds)

    def has_unfinished(self) -> bool:
        """Requests not ended yet (one whose last token is in flight too: a step applies it)."""
        return self.scheduler.has_unfinished()

    def has_schedulable(self) -> bool:
        return self.scheduler.has_schedulable()

    # ------------------------------------------------------------------ the step

    def step(self) -> list[CoreOutput]:
        """Schedule; the connector loads; forward and sample; the connector saves; the scheduler applies
        what the connector reported (aborts first, so a failed send never hands out its token) and
        what the step computed. Called with nothing to schedule too: connector events still apply.

        With async scheduling (vLLM v1's), a step whose requests all allow it is left in flight: the host
        returns to schedule the next one while the device runs it, the next step feeds its tokens from
        the device, and its results are applied (and returned) by the next call. Only the scheduler's
        counts run ahead (`Scheduler.advance`); a token that ends a request is seen a step late, and the
        step computed for it meanwhile is dropped."""
        start = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        if self.step_observer is not None:  # opt-in: the plan, before the step changes any request
            self.step_observer.record(plan, start, self.last_step.total_seconds)
        self.connector.start_load_kv(self.kv_cache)
        # Only the speculator's rate back-off needs it: whether every request decodes (no prefill).
        pure_decode = self.speculator is not None and all(s.request.is_decoding for s in plan.scheduled)
        overlap = self.async_scheduling and bool(plan.scheduled) and all(map(_overlappable, plan.scheduled))
        batch = self._prepare(plan)
        forward_start = time.perf_counter()
        launched = self._launch(plan, batch, overlap)
        forward_seconds = time.perf_counter() - forward_start
        self.connector.save_kv(self.kv_cache, plan.scheduled)
        outputs = self.scheduler.apply_connector_events(self.connector.get_finished())
        self.scheduler.advance(plan)
        outputs += self._collect(launched, overlap)
        if self.speculator is not None and plan.scheduled:  # never overlapped: these are its outputs
            self._observe_speculation(plan, launched.results(), outputs, forward_seconds, pure_decode)
        if any(out.finished for out in outputs):
            self._forget_finished()
        self.last_step = StepStats(
            num_scheduled_tokens=plan.num_tokens,
            num_preempted=len(plan.preempted),
            forward_seconds=forward_seconds,
            total_seconds=time.perf_counter() - start,
            overlapped=overlap,
        )
        return outputs

    def _collect(self, launched: LaunchedStep, overlap: bool) -> list[CoreOutput]:
        """What the step left in flight before produced (if one was), then this one's, unless it stays in
        flight (`overlap`) until the next call."""
        previous, self._in_flight = self._in_flight, launched if overlap else None
        outputs = self._apply(previous) if previous is not None else []
        return outputs if overlap else outputs + self._apply(launched)

    def _apply(self, launched: LaunchedStep) -> list[CoreOutput]:
        return self.scheduler.apply_sampled(launched.plan, launched.results(), launched.prompt_logprobs)

    def _prepare(self, plan: SchedulerOutput) -> StepBatch | None:
        """The step's tensors (None: nothing is scheduled), every token with its request's LoRA slot."""
        if not plan.scheduled:
            return None
        lora_slots = None
        if self.lora is not None:
            lora_slots = self.lora.assign([s.request.lora for s in plan.scheduled if s.request.lora])
        pending = self._in_flight.pending if self._in_flight is not None else None
        return prepare_batch(plan.scheduled, self.kv, self.device, lora_slots, pending)

    def _launch(self, plan: SchedulerOutput, batch: StepBatch | None, overlap: bool) -> LaunchedStep:
        """The model on the step's batch, and its sampling: read at once, or (`overlap`) left on the
        device."""
        if batch is None:
            return LaunchedStep(plan, sampled={})
        # Computed while the forward runs, or after it (in masks.apply) on a host with no spare core. An
        # overlapped step has no grammar, drafts, logprobs or min_tokens masking: only token ids, kept on
        # the device (penalties count the step before's tokens there: `_in_flight_tokens`).
        masks = None if overlap else self.structured.start(batch.sampling)
        hidden = run_model(self.model, self.decode_graphs, batch, self.kv_cache)
        if not overlap:
            return LaunchedStep(plan, self._score_prompts(batch, hidden), self._sample(batch, hidden, masks))
        if not batch.sampling:  # prompt chunks alone: nothing to sample
            return LaunchedStep(plan, sampled={})
        logits = self.model.compute_logits(hidden.index_select(0, batch.sample_rows))
        token_ids = self.sampler.sample(
            logits, [_sampling_row(s.request) for s in batch.sampling], self._in_flight_tokens(batch.sampling)
        )
        rows = {s.request.request_id: row for row, s in enumerate(batch.sampling)}
        return LaunchedStep(plan, pending=PendingTokens(token_ids, rows, HostCopy(token_ids)))

    def _observe_speculation(
        self,
        plan: SchedulerOutput,
        sampled: dict[str, tuple[list[int], list]],
        outputs: list[CoreOutput],
        forward_seconds: float,
        pure_decode: bool,
    ) -> None:
        """Each verification's acceptance, and the step's time (with its tokens, for a pure decode step)."""
        for s in plan.scheduled:
            if s.draft_token_ids and s.request.request_id in sampled:
                emitted = sampled[s.request.request_id][0]
                self.speculator.record(s.request, len(s.draft_token_ids), len(emitted) - 1)
        emitted = sum(len(out.new_token_ids) for out in outputs) if pure_decode else None
        self.speculator.observe_step(forward_seconds, emitted)

    def _sample(
        self, batch: StepBatch, hidden: torch.Tensor, masks: GrammarMasks | None
    ) -> dict[str, tuple[list[int], list]]:
        """Per sampling request: its new tokens (with drafts: the accepted ones, then the target's)
        and their logprobs (requests with drafts never ask for logprobs)."""
        if not batch.sampling:
            return {}
        logits = self.model.compute_logits(hidden.index_select(0, batch.sample_rows))
        if masks is not None:  # structured outputs: what the grammars forbid is -inf before any sampling
            logits = masks.apply(logits)
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
        if masks is not None:
            self._resample_refused(masks, logits, plain, plain_rows, sampled)
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

    def _resample_refused(
        self,
        masks: GrammarMasks,
        logits: torch.Tensor,
        plain: list[ScheduledRequest],
        rows: list[int],
        sampled: dict[str, tuple[list[int], list]],
    ) -> None:
        """Rows sampled before their grammar's mask (structured.py) whose token the grammar refuses:
        masked now and sampled again, into `sampled`."""
        tokens = {row: sampled[s.request.request_id][0][0] for s, row in zip(plain, rows, strict=True)}
        refused = set(masks.check(logits, tokens))
        if refused:
            again = [(s, row) for s, row in zip(plain, rows, strict=True) if row in refused]
            resampled = [row for _, row in again]
            sampled.update(self._sample_plain([s for s, _ in again], _rows_of(logits, resampled)))

    def _sample_plain(
        self, scheduled: list[ScheduledRequest], logits: torch.Tensor
    ) -> dict[str, tuple[list[int], list]]:
        if not scheduled:
            return {}
        result = self.sampler(
            logits, [_sampling_row(s.request) for s in scheduled], self._in_flight_tokens(scheduled)
        )
        return {
            s.request.request_id: ([token], [] if logprobs is None else [(logprobs, rank)])
            for s, token, logprobs, rank in zip(
                scheduled, result.token_ids, result.logprobs, result.ranks, strict=True
            )
        }

    def _in_flight_tokens(self, scheduled: list[ScheduledRequest]) -> InFlight | None:
        """The penalised rows' newest tokens where the step before is still in flight (async scheduling):
        on the device, past their requests' output_token_ids, for the penalties to count."""
        pending = self._in_flight.pending if self._in_flight is not None else None
        if pending is None:
            return None
        rows = [
            i
            for i, s in enumerate(scheduled)
            if s.request.request_id in pending.rows and penalised(s.request.params)
        ]
        if not rows:
            return None
        sources = [pending.rows[scheduled[i].request.request_id] for i in rows]
        return InFlight(rows, pending.token_ids.index_select(0, to_device(sources, torch.long, self.device)))

    def _score_prompts(self, batch: StepBatch, hidden: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """Prompt logprobs of this step's chunks, by request (the scheduler appends them)."""
        scored = {}
        for item in batch.prompt_logprobs:
            request = item.scheduled.request
            num_top = request.params.prompt_logprobs
            logits = self.model.compute_logits(hidden.index_select(0, item.rows))
            result = compute_logprobs(logits, item.targets, max(num_top, 1))
            entries = result.as_dicts(item.targets, [num_top] * len(item.targets))
            scored[request.request_id] = list(zip(entries, result.ranks.tolist(), strict=True))
        return scored

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
        } | self.connector.stats()


def _overlappable(s: ScheduledRequest) -> bool:
    """Whether the request's step may stay in flight: nothing in it needs its output on the host (a
    grammar, drafts, the sampler's `waits_for_output`) and it asks for no logprobs."""
    params = s.request.params
    return (
        not s.draft_token_ids
        and params.structured_outputs is None
        and params.logprobs is None
        and params.prompt_logprobs is None
        and not waits_for_output(_sampling_row(s.request))
    )


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
    activations = config.quantized_activations
    chosen = {
        "dtype": config.dtype if config.dtype != "auto" else None,
        "num_threads": config.num_threads,
        "quantized_max_rows": config.quantized_max_rows,
        "quantized_activations": activations if activations != "auto" else None,
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
