"""The engine core: scheduler + KV cache + model + sampler, one `step()` at a time.

It deals in token ids only; text (tokenizing, detokenizing, stop strings) is the front end's
job, so the core can run in its own process and be fed ids from anywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.config import EngineConfig
from duoserve.engine.model_runner import StepBatch, prepare_batch
from duoserve.engine.request import Request, RequestStatus
from duoserve.engine.sampler import Sampler, SamplingRow, compute_logprobs
from duoserve.engine.scheduler import ScheduledRequest, Scheduler
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.models.config import ModelConfig
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel
from duoserve.platform import keep_freed_memory
from duoserve.sampling_params import SamplingParams

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
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if self.device.type == "cpu":
            keep_freed_memory()
        model_config: ModelConfig = loaded.config
        spec = KVCacheSpec.for_model(model_config, config.block_size, config.resolved_kv_dtype())
        num_blocks = self._num_blocks(spec)
        # A request must always fit the cache on its own, or it could never be scheduled.
        self.max_model_len = min(
            config.max_model_len or model_config.max_position_embeddings, num_blocks * config.block_size
        )
        self.model = LlamaModel(
            model_config,
            loaded.weights,
            TorchAttentionBackend(),
            self.device,
            config.resolved_dtype(),
            max_positions=self.max_model_len,
        )
        self.model_config = model_config
        self.kv_cache = KVCache(spec, num_blocks, self.device)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler(config.seed)
        self.last_step = StepStats()
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d",
            num_blocks,
            config.block_size,
            num_blocks * spec.bytes_per_block / 2**20,
            self.max_model_len,
        )

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
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, eos_token_ids: list[int]
    ) -> None:
        """Validate and queue a request; ValueError names what is wrong with it."""
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
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step

    def step(self) -> list[CoreOutput]:
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        batch = prepare_batch(plan.scheduled, self.kv, self.device)
        forward_start = time.perf_counter()
        hidden = self.model.forward(batch.input_ids, batch.positions, self.kv_cache, batch.meta)
        sampled = self._sample(batch, hidden)
        prompt_done = self._score_prompts(batch, hidden)
        forward_seconds = time.perf_counter() - forward_start
        outputs = self._update(plan.scheduled, sampled, prompt_done)
        self.last_step = StepStats(
            num_scheduled_tokens=plan.num_tokens,
            num_preempted=len(plan.preempted),
            forward_seconds=forward_seconds,
            total_seconds=time.perf_counter() - start,
        )
        return outputs

    def _sample(self, batch: StepBatch, hidden: torch.Tensor) -> dict[str, tuple[int, tuple | None]]:
        if not batch.sampling:
            return {}
        logits = self.model.compute_logits(hidden.index_select(0, batch.sample_rows))
        rows = [
            SamplingRow(
                params=s.request.params,
                prompt_token_ids=s.request.prompt_token_ids,
                output_token_ids=s.request.output_token_ids,
                generator=s.request.generator,
                stop_token_ids=s.request.stop_token_ids,  # a frozenset: shared, not copied per step
            )
            for s in batch.sampling
        ]
        result = self.sampler(logits, rows)
        return {
            s.request.request_id: (token, None if logprobs is None else (logprobs, rank))
            for s, token, logprobs, rank in zip(
                batch.sampling, result.token_ids, result.logprobs, result.ranks, strict=True
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
        sampled: dict[str, tuple[int, tuple | None]],
        prompt_done: set[str],
    ) -> list[CoreOutput]:
        outputs = []
        now = time.monotonic()
        for s in scheduled:
            request = s.request
            request.num_computed_tokens += s.num_new_tokens
            new_prompt_logprobs = request.prompt_logprobs if request.request_id in prompt_done else None
            if request.request_id not in sampled:
                if new_prompt_logprobs is not None:
                    outputs.append(self._output(request, [], [], new_prompt_logprobs))
                continue
            token, logprobs = sampled[request.request_id]
            request.append_token(token)
            if logprobs is not None:
                request.logprobs.append(logprobs)
            if request.first_token_time is None:
                request.first_token_time = now
                if request.wants_prompt_logprobs and new_prompt_logprobs is None:
                    new_prompt_logprobs = request.prompt_logprobs  # 1-token prompts score nothing
            request.check_stop(self.max_model_len)
            if request.status.finished:
                self.scheduler.finish(request, request.status)
            outputs.append(
                self._output(request, [token], [logprobs] if logprobs else [], new_prompt_logprobs)
            )
        return outputs

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
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_perc": self.kv.usage(),
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read available memory from /proc/meminfo")
