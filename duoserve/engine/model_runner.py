"""Turns a scheduled step into model inputs (flat token ids, positions and attention metadata) and runs the
model on them: eagerly, or on CUDA by replaying a captured graph for pure decode steps."""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.config import EngineConfig
from duoserve.engine.scheduler import ScheduledRequest
from duoserve.kv.cache import KVCache
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.models.llama import LlamaModel


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
class PendingTokens:
    """The tokens a step in flight samples, still on the device (async scheduling): the next step feeds
    them as its inputs without the host ever waiting for them."""

    token_ids: torch.Tensor  # [n] on the device
    rows: dict[str, int]  # request id -> its entry in token_ids
    host: HostCopy  # the same ids on their way to the host, read when the step is applied


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
    prefills: list[tuple[int, int, int]] = []  # (first row, tokens, context end) of each longer chunk
    prefill_tables: list[list[int]] = []
    for i in order[:num_decodes]:  # one token each: appended, not extended (a third of the loop's time)
        chunk = chunks[i]
        query_starts[i] = len(token_ids)
        token_ids.append(chunk.token_ids[0])
        positions.append(chunk.start)
        slots.append(chunk.block_ids[chunk.start // bs] * bs + chunk.start % bs)
        lora_slots.append(chunk.lora_slot)
    for i in order[num_decodes:]:
        chunk = chunks[i]
        end = chunk.start + len(chunk.token_ids)
        query_starts[i] = len(token_ids)
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start, end))
        slots.extend(chunk.block_ids[p // bs] * bs + p % bs for p in range(chunk.start, end))
        lora_slots.extend([chunk.lora_slot] * len(chunk.token_ids))
        prefills.append((query_starts[i], len(chunk.token_ids), end))
        prefill_tables.append(chunk.block_ids)
    decodes = [chunks[i] for i in order[:num_decodes]]
    width, flat_tables = _padded_tables([c.block_ids for c in decodes])
    ids, pos, slot_mapping, tables, lens, *chunk_tables = to_device_longs(
        [token_ids, positions, slots, flat_tables, [c.start + 1 for c in decodes], *prefill_tables], device
    )
    # Freed entries of a sliding window (NULL_BLOCK) become block 0, which attention never reads there (no
    # query sees those positions), like the padding past a context.
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        num_decode_tokens=num_decodes,
        decode_block_tables=tables.view(num_decodes, width).clamp_(min=0),
        decode_context_lens=lens,
        prefills=[
            PrefillChunk(*chunk, table.clamp_(min=0))
            for chunk, table in zip(prefills, chunk_tables, strict=True)
        ],
        block_size=bs,
    )
    return BatchLayout(
        input_ids=ids,
        positions=pos,
        meta=meta,
        query_starts=query_starts,
        lora_slots=lora_slots if any(c.lora_slot >= 0 for c in chunks) else None,
    )


def prepare_batch(
    scheduled: list[ScheduledRequest],
    kv: KVCacheManager,
    device: torch.device,
    lora_slots: dict[int, int] | None = None,
    pending: PendingTokens | None = None,
) -> StepBatch:
    """The step's model inputs, and which rows sample and score prompt tokens.

    `lora_slots`: the LoRA slot of each adapter of the step, by id(adapter) (LoRAManager.assign); each
    token of a request with an adapter gets its slot, the others -1.
    `pending`: the tokens of the step in flight (async scheduling); a request whose next token is one of
    them feeds it from there, copied on the device.

    A request verifying k draft tokens is a chunk of 1 + k tokens (its last token, then the drafts)
    that samples at all 1 + k rows.
    """
    chunks = []
    fed_pending: list[tuple[int, int, str]] = []  # (chunk, offset in it, request id)
    for i, s in enumerate(scheduled):
        request, start = s.request, s.request.num_computed_tokens
        end = start + s.num_new_tokens - len(s.draft_token_ids)
        known = request.all_token_ids[start:end]
        if len(known) < end - start:  # its newest token is still on the device: a placeholder here
            fed_pending.append((i, len(known), request.request_id))
        token_ids = known + [0] * (end - start - len(known)) + s.draft_token_ids
        slot = -1 if request.lora is None else lora_slots[id(request.lora)]
        chunks.append(SeqChunk(token_ids, start, kv.block_ids(request.request_id), slot))
    layout = layout_batch(chunks, kv.block_size, device)
    if fed_pending:
        _feed_pending(layout, fed_pending, pending)
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
        sample_rows=to_device(sample_rows, torch.long, device),
        prompt_logprobs=prompt_logprobs,
        lora_slots=layout.lora_slots,
    )


def _feed_pending(
    layout: BatchLayout, fed: list[tuple[int, int, str]], pending: PendingTokens | None
) -> None:
    """Copy each placeholder's token from the step in flight into the inputs, on the device."""
    if pending is None or any(request_id not in pending.rows for _, _, request_id in fed):
        raise RuntimeError("a scheduled token is in flight but not from the step before: steps out of order")
    rows, sources = to_device_longs(
        [
            [layout.query_starts[i] + offset for i, offset, _ in fed],
            [pending.rows[request_id] for _, _, request_id in fed],
        ],
        layout.input_ids.device,
    )
    layout.input_ids.index_copy_(0, rows, pending.token_ids.index_select(0, sources))


def _padded_tables(tables: list[list[int]]) -> tuple[int, list[int]]:
    """(the longest's length, the tables zero-padded to it, flat): sent flat, then viewed [len(tables),
    width] (a nested list cost torch.tensor twice the time per element: 128 rows of 4, 45 us against 23)."""
    width = max((len(t) for t in tables), default=0)
    flat: list[int] = []
    for t in tables:
        flat += t
        flat += [0] * (width - len(t))
    return width, flat


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
        targets=to_device(request.prompt_token_ids[start + 1 : end + 1], torch.long, device),
    )


# ------------------------------------------------------------------ host <-> device

# On CUDA, `torch.tensor(values, device="cuda")` and `tensor.tolist()` each synchronise the stream: the host
# stops until every kernel queued before finishes. With async scheduling the host prepares step n+1 while
# the GPU runs step n, so the inputs of step n+1 must go up, and step n's sampled tokens come down, without
# such a wait: through pinned host memory, non-blocking copies and an event per copy (as vLLM v1 does). On
# the CPU both are plain tensors: nothing runs asynchronously there. (The only CUDA-specific code of the
# engine besides the decode graphs below: the rest of it, the sampler included, goes through these.)


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` (a flat sequence of numbers, or a host tensor) on `device`, queued behind the
    device's work instead of waiting for it.

    The pinned buffer comes from torch's caching host allocator, which reuses it only once the copy
    that reads it has run.
    """
    if not isinstance(values, torch.Tensor):
        values = host_tensor(values, dtype)
    if device.type != "cuda":
        return values.to(device=device, dtype=dtype)
    return values.to(dtype=dtype).pin_memory().to(device, non_blocking=True)


# Typecodes of Python's array module for the dtypes the engine sends (8-byte 'q' and 4-byte 'i' on Linux).
_ARRAY_CODES = {torch.long: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def to_device_longs(seqs: list[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Flat int sequences as long tensors on `device`: views of one tensor, sent through one host buffer
    and (on CUDA) one pinned copy, where a step's layout sent five or more tensors, each with a pinned
    buffer and a copy of its own. (Joined as a list, then one array: array.extend converts each int
    apart, 23 against 12 us for a 128-row decode step's 1000 ints; Zen 5.)"""
    flat: list[int] = []
    for seq in seqs:
        flat += seq
    return list(to_device(flat, torch.long, device).split([len(seq) for seq in seqs]))


def host_tensor(values: Sequence, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of a flat sequence of numbers, made through an array's buffer: a step lays out a
    dozen of them, and torch.tensor(list) parses each element (128 ints: 2.2 against 7.4 us; 512: 6.2
    against 22 us; Zen 5). What an array will not take (floats for an int dtype, nested lists, a dtype
    it has no code for) goes through torch.tensor, with its conversions."""
    code = _ARRAY_CODES.get(dtype)
    if code is not None and len(values):
        try:
            return torch.frombuffer(array.array(code, values), dtype=dtype)
        except (TypeError, OverflowError):
            pass
    return torch.tensor(values, dtype=dtype)


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued right after the kernels that
    compute them, and `tolist` waits for that copy alone, not for the kernels queued after it (the next
    step's, with async scheduling)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


# ------------------------------------------------------------------ running the model

# Padded batch sizes of the captured decode graphs (vLLM's: 1, 2, 4, then every 8), up to this many.
_MAX_GRAPH_BATCH = 512


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The padded decode batch sizes with a graph: a batch of n runs the smallest one >= n."""
    largest = min(max_num_seqs, _MAX_GRAPH_BATCH)
    sizes = [b for b in (1, 2, 4) if b < largest] + list(range(8, largest + 8, 8))
    return [b for b in sizes if b < largest] + [largest]


class DecodeGraphs:
    """CUDA graphs of the model's forward over pure decode steps, one per padded batch size.

    A decode step's launches are the same every step at a given batch size (the attention backend's too:
    `supports_cuda_graphs`), so replaying a captured graph saves the per-op launch cost that dominates
    small batches. Inputs go through persistent buffers that the graphs read: the step's values are
    copied in, and padded rows get context 0 and slot -1 (attention and the KV store skip them). Each size
    is captured on its first use, after one eager warm-up run on the same inputs (Triton compiles, cuBLAS
    picks its kernels); all graphs share one memory pool, as only one runs at a time and each step's output
    is consumed before the next replay.
    """

    def __init__(self, model: LlamaModel, kv_cache: KVCache, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.block_size = kv_cache.spec.block_size
        device = kv_cache.data.device
        n, width = self.sizes[-1], -(-max_model_len // self.block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.long, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def fits(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        num = meta.num_decode_tokens
        return (
            not meta.prefills
            and num == input_ids.shape[0]
            and 0 < num <= self.sizes[-1]
            and meta.decode_block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of a pure decode step (one that `fits`)."""
        num = input_ids.shape[0]
        size = next(b for b in self.sizes if b >= num)
        self.input_ids[:num].copy_(input_ids)
        self.positions[:num].copy_(positions)
        self.slot_mapping[:num].copy_(meta.slot_mapping)
        self.slot_mapping[num:size].fill_(-1)
        self.block_tables[:num, : meta.decode_block_tables.shape[1]].copy_(meta.decode_block_tables)
        self.context_lens[:num].copy_(meta.decode_context_lens)
        self.context_lens[num:size].zero_()
        entry = self.graphs.get(size)
        if entry is None:
            entry = self.graphs[size] = self._capture(size)
        graph, hidden = entry
        graph.replay()
        return hidden[:num]

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size],
            prefills=[],
            block_size=self.block_size,
        )
        args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.forward(*args)  # warm-up: writes the same K/V the replay writes again
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self.model.forward(*args)
        self._pool = graph.pool()
        return graph, hidden


def make_decode_graphs(
    model: LlamaModel, kv_cache: KVCache, config: EngineConfig, max_model_len: int
) -> DecodeGraphs | None:
    """Decode graphs on CUDA, unless disabled or something in the step cannot be captured: an attention
    backend that syncs with the host or shapes launches by values (torch's), or routed experts (their
    per-expert token counts are read on the host), or LoRA (per-token adapter slots: not captured yet)."""
    if kv_cache.data.device.type != "cuda" or config.enforce_eager or config.enable_lora:
        return None
    if not getattr(model.attention, "supports_cuda_graphs", False):
        return None
    if any(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers)):
        return None
    return DecodeGraphs(model, kv_cache, config.max_num_seqs, max_model_len)


def run_model(
    model: LlamaModel, graphs: DecodeGraphs | None, batch: StepBatch, kv_cache: KVCache
) -> torch.Tensor:
    """The step's hidden states: replayed from a decode graph where one fits, else an eager forward."""
    if graphs is not None and graphs.fits(batch.input_ids, batch.meta):
        return graphs.run(batch.input_ids, batch.positions, batch.meta)
    return model.forward(batch.input_ids, batch.positions, kv_cache, batch.meta, batch.lora_slots)
