"""Turns a scheduled step into model inputs: flat token ids, positions and attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.engine.scheduler import ScheduledRequest
from duoserve.kv.kv_cache_manager import KVCacheManager


@dataclass
class PromptLogprobRows:
    scheduled: ScheduledRequest
    rows: torch.Tensor  # rows of the step's tokens whose logits score the next prompt token
    targets: torch.Tensor  # those next prompt tokens


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sampling: list[ScheduledRequest]  # requests that sample a token this step, in row order
    sample_rows: torch.Tensor  # the last row of each of them
    prompt_logprobs: list[PromptLogprobRows]


def prepare_batch(scheduled: list[ScheduledRequest], kv: KVCacheManager, device: torch.device) -> StepBatch:
    """Lay the step's tokens out decodes first (one token each), then prefill chunks."""
    decodes = [s for s in scheduled if s.num_new_tokens == 1]
    prefills = [s for s in scheduled if s.num_new_tokens > 1]
    bs = kv.block_size
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sampling: list[ScheduledRequest] = []
    sample_rows: list[int] = []
    chunks: list[PrefillChunk] = []
    prompt_logprobs: list[PromptLogprobRows] = []
    for s in decodes + prefills:
        request, start = s.request, s.request.num_computed_tokens
        end = start + s.num_new_tokens
        block_ids = kv.block_ids(request.request_id)
        query_start = len(token_ids)
        token_ids.extend(request.all_token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
        if s.num_new_tokens > 1:
            table = torch.tensor(block_ids, dtype=torch.long, device=device)
            chunks.append(PrefillChunk(query_start, s.num_new_tokens, end, table))
        if s.samples:
            sampling.append(s)
            sample_rows.append(len(token_ids) - 1)
        if request.wants_prompt_logprobs:
            rows = _prompt_logprob_rows(s, query_start, device)
            if rows is not None:
                prompt_logprobs.append(rows)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=len(decodes),
        decode_block_tables=_padded_tables([kv.block_ids(s.request.request_id) for s in decodes], device),
        decode_context_lens=torch.tensor(
            [s.request.num_computed_tokens + 1 for s in decodes], dtype=torch.long, device=device
        ),
        prefills=chunks,
        block_size=bs,
    )
    return StepBatch(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        sampling=sampling,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        prompt_logprobs=prompt_logprobs,
    )


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)


def _prompt_logprob_rows(
    s: ScheduledRequest, query_start: int, device: torch.device
) -> PromptLogprobRows | None:
    """Rows of this chunk that score a prompt token not scored yet (none again after a preemption)."""
    request = s.request
    start = max(request.num_computed_tokens, len(request.prompt_logprobs))
    end = min(request.num_computed_tokens + s.num_new_tokens, request.num_prompt_tokens - 1)
    if start >= end:
        return None
    offset = query_start - request.num_computed_tokens
    return PromptLogprobRows(
        scheduled=s,
        rows=torch.arange(start + offset, end + offset, device=device),
        targets=torch.tensor(request.prompt_token_ids[start + 1 : end + 1], dtype=torch.long, device=device),
    )
