"""A request's state inside the engine core."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from duoserve.kv.block_pool import ROOT_HASH
from duoserve.lora.request import prefix_root_hash
from duoserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from duoserve.engine.structured import GrammarState
    from duoserve.lora.adapter import LoRAAdapter


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Holding its blocks while a KV connector fills them (a P/D transfer, an offload tier's load).
    WAITING_FOR_KV = "waiting_for_kv"
    FINISHED_STOPPED = "stop"  # eos, a stop token or (decided by the front end) a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"

    # Whether it ends the request: an attribute of each member (set below), read several times a step for
    # every request; as a property, the members' lookups took 250 ns a read (Python 3.11).
    finished: bool


for _status in RequestStatus:
    _status.finished = _status.name.startswith("FINISHED_")
del _status


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against the context length
    # Token ids that end the request (eos unless ignore_eos, plus params.stop_token_ids).
    stop_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # KV computed so far, over prompt + output. Less than num_tokens while (re)prefilling.
    num_computed_tokens: int = 0
    # Async scheduling: tokens sampled by steps whose results the host has not applied yet (on the device,
    # not in output_token_ids). At most 2: the step being resolved and the one just launched.
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    generator: torch.Generator | None = None  # made from params.seed
    # Per output token: ({token id: logprob} of the top ones and the sampled one, its rank).
    logprobs: list[tuple[dict[int, float], int]] = field(default_factory=list)
    # Per prompt token after the first, the same (params.prompt_logprobs).
    prompt_logprobs: list[tuple[dict[int, float], int]] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # What a KV connector needs to know of this request (P/D: duoserve.disagg.kv_transfer's
    # KVTransferParams), opaque to the engine: only connectors read it.
    kv_transfer_params: Any = None
    # Speculative decoding: draft tokens proposed for the next step. Tentative: they are not in
    # all_token_ids, and the scheduler takes them (or drops them when they do not fit).
    draft_token_ids: list[int] = field(default_factory=list)
    lora: LoRAAdapter | None = None  # the adapter it runs with (None: the base model)
    # Structured outputs: the matcher that follows the output (written by duoserve.engine.structured).
    grammar: GrammarState | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        # Parent hash of its first KV block: blocks computed with different adapters never match.
        self.block_root = prefix_root_hash(self.lora.request if self.lora else None, ROOT_HASH)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def is_decoding(self) -> bool:
        """Running with every token but the last computed: the next step decodes (or verifies drafts)."""
        last = self.num_tokens + self.num_pending_tokens - 1
        return self.status == RequestStatus.RUNNING and self.num_computed_tokens == last

    def reaches_length(self, max_model_len: int, num_ahead: int = 0) -> bool:
        """Whether its tokens, and `num_ahead` more (those in flight), reach max_tokens or the context."""
        num_out = len(self.output_token_ids) + num_ahead
        return num_out >= self.max_tokens or self.num_tokens + num_ahead >= max_model_len

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> None:
        """Finish the request if its last token ends it (the front end checks stop strings)."""
        num_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if num_out >= self.params.min_tokens and last in self.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            # vLLM's convention: stop_reason names a user stop token, None for eos.
            self.stop_reason = last if last in self.params.stop_token_ids else None
        elif self.reaches_length(max_model_len):
            self.status = RequestStatus.FINISHED_LENGTH
