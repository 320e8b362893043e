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
    # The last row of each of them; with draft tokens, the 1 + k rows whose logits verify the drafts.
    sample_rows: torch.Tensor
    prompt_logprobs: list[PromptLogprobRows]
    lora_slots: list[int] | None = None  # per token, its adapter's LoRA slot (-1: none); None: no adapter


@dataclass
class SeqChunk:
    """New tokens of one sequence for a forward pass, and where its KV lives."""

    token_ids: list[int]
    start: int  # position of the first one (every earlier position has KV)
    block_ids: list[int]  # the sequence's block table, covering start + len(token_ids) positions
    lora_slot: int = -1  # the LoRA slot of the sequence's adapter (-1: the base model)


@dataclass
class BatchLayout:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    query_starts: list[int]  # first row of each chunk, in the order the chunks were given
    lora_slots: list[int] | None = None  # per token (-1: none); None when no chunk has an adapter


def layout_batch(chunks: list[SeqChunk], block_size: int, device: torch.device) -> BatchLayout:
    """Flatten chunks into model inputs: one-token chunks (decodes) first, then the longer ones."""
    order = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    num_decodes = len(order)
    order += [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
    bs = block_size
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    lora_slots: list[int] = []
    query_starts = [0] * len(chunks)
    prefills: list[PrefillChunk] = []
    for i in order:
        chunk = chunks[i]
        end = chunk.start + len(chunk.token_ids)
        query_starts[i] = len(token_ids)
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start, end))
        slots.extend(chunk.block_ids[p // bs] * bs + p % bs for p in range(chunk.start, end))
        lora_slots.extend([chunk.lora_slot] * len(chunk.token_ids))
        if len(chunk.token_ids) > 1:
            table = _table_tensor(chunk.block_ids, device)
            prefills.append(PrefillChunk(query_starts[i], len(chunk.token_ids), end, table))
    decodes = [chunks[i] for i in order[:num_decodes]]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode_tokens=num_decodes,
        decode_block_tables=_padded_tables([c.block_ids for c in decodes], device),
        decode_context_lens=torch.tensor([c.start + 1 for c in decodes], dtype=torch.long, device=device),
        prefills=prefills,
        block_size=bs,
    )
    return BatchLayout(
        input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        meta=meta,
        query_starts=query_starts,
        lora_slots=lora_slots if any(c.lora_slot >= 0 for c in chunks) else None,
    )


def prepare_batch(
    scheduled: list[ScheduledRequest],
    kv: KVCacheManager,
    device: torch.device,
    lora_slots: dict[int, int] | None = None,
) -> StepBatch:
    """The step's model inputs, and which rows sample and score prompt tokens.

    `lora_slots`: the LoRA slot of each adapter of the step, by id(adapter) (LoRAManager.assign); each
    token of a request with an adapter gets its slot, the others -1.

    A request verifying k draft tokens is a chunk of 1 + k tokens (its last token, then the drafts)
    that samples at all 1 + k rows.
    """
    chunks = []
    for s in scheduled:
        request, start = s.request, s.request.num_computed_tokens
        end = start + s.num_new_tokens - len(s.draft_token_ids)
        token_ids = request.all_token_ids[start:end] + s.draft_token_ids
        slot = -1 if request.lora is None else lora_slots[id(request.lora)]
        chunks.append(SeqChunk(token_ids, start, kv.block_ids(request.request_id), slot))
    layout = layout_batch(chunks, kv.block_size, device)
    sampling: list[ScheduledRequest] = []
    sample_rows: list[int] = []
    prompt_logprobs: list[PromptLogprobRows] = []
    # In row order (decodes first), as the rows' draws from the shared generator have always been.
    for s, query_start in sorted(zip(scheduled, layout.query_starts, strict=True), key=lambda x: x[1]):
        if s.samples:
            sampling.append(s)
            last = query_start + s.num_new_tokens - 1
            sample_rows.extend(range(last - len(s.draft_token_ids), last + 1))
        if s.request.wants_prompt_logprobs:
            rows = _prompt_logprob_rows(s, query_start, device)
            if rows is not None:
                prompt_logprobs.append(rows)
    return StepBatch(
        input_ids=layout.input_ids,
        positions=layout.positions,
        meta=layout.meta,
        sampling=sampling,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        prompt_logprobs=prompt_logprobs,
        lora_slots=layout.lora_slots,
    )


def _table_tensor(block_ids: list[int], device: torch.device) -> torch.Tensor:
    """A block table as a tensor; entries freed out of a sliding window (NULL_BLOCK) become block 0, which
    attention never reads there (no query sees those positions), like the padding past a context."""
    return torch.tensor(block_ids, dtype=torch.long, device=device).clamp_(min=0)


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
    return padded.clamp_(min=0)  # NULL_BLOCK entries, as in _table_tensor


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
