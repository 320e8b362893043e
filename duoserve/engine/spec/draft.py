"""A draft model proposer: a smaller model with the target's tokenizer, and its own paged KV cache.

For each request the draft keeps KV for a prefix of the request's tokens. Each step it first
catches up (rolls back to the longest prefix still equal to the request's tokens, i.e. drops
rejected drafts, then computes the tokens the target accepted or emitted since, in one chunk),
then decodes k tokens greedily, all requests batched in each of its k forward passes. Greedy
drafts are a one-hot q, which the rejection test handles exactly for sampled requests too.

Without --draft-model the draft is the target's own weights; --draft-num-layers keeps only the
first N layers of the draft (a self-speculative draft: cheaper, and no second model to ship).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from duoserve.attention.selector import make_attention_backend
from duoserve.config import EngineConfig
from duoserve.engine.model_runner import SeqChunk, layout_batch
from duoserve.engine.request import Request
from duoserve.engine.sampler import argmax
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.kv_cache_manager import KVCacheManager
from duoserve.kv.quant import is_quantized
from duoserve.models.llama import LlamaModel
from duoserve.models.loader import LoadedModel, load_model


@dataclass
class _DraftSeq:
    token_ids: list[int] = field(default_factory=list)  # the tokens whose KV the draft cache holds
    num_committed: int = 0  # of them, how many were the request's own (not drafts) when proposed


class DraftProposer:
    def __init__(
        self, model: LlamaModel, kv_cache: KVCache, kv: KVCacheManager, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kv = kv
        self.device = device
        self._seqs: dict[str, _DraftSeq] = {}

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        target: LoadedModel,
        num_blocks: int,
        max_model_len: int,
        device: torch.device,
    ) -> DraftProposer:
        """The draft for `config` (its own KV pool has as many blocks as the target's)."""
        dtype = config.resolved_dtype()
        loaded = target if config.draft_model is None else load_model(config.draft_model, dtype)
        if loaded.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({loaded.config.vocab_size}) is not the target's "
                f"({target.config.vocab_size})"
            )
        model_config = loaded.config
        if config.draft_num_layers is not None:
            num_layers = min(config.draft_num_layers, model_config.num_hidden_layers)
            model_config = model_config.first_layers(num_layers)
        model = LlamaModel(
            model_config,
            loaded.weights,
            make_attention_backend(config.attention_backend, device),
            device,
            dtype,
            max_positions=max_model_len,
            quantized=loaded.quantized if config.quantization == "auto" else None,
            quantized_max_rows=config.resolved_quantized_max_rows(),
            quantized_activations=config.resolved_quantized_activations(),
        )
        # A quantized target cache leaves the draft's in the model's dtype: the draft's KV only steers its
        # proposals (which the target verifies), and is small.
        kv_dtype = config.resolved_kv_dtype()
        kv_dtype = dtype if is_quantized(kv_dtype) else kv_dtype
        spec = KVCacheSpec.for_model(model_config, config.block_size, kv_dtype)
        kv = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=False)
        return cls(model, KVCache(spec, num_blocks, device), kv, device)

    def propose(self, requests: Sequence[Request], num_drafts: Sequence[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        chunks: dict[int, SeqChunk] = {}
        for i, (request, k) in enumerate(zip(requests, num_drafts, strict=True)):
            chunk = self._catch_up(request, k)
            if chunk is not None:
                chunks[i] = chunk
        while chunks:
            tokens = self._forward(list(chunks.values()))
            following = {}
            for (i, chunk), token in zip(chunks.items(), tokens, strict=True):
                seq = self._seqs[requests[i].request_id]
                seq.token_ids.extend(chunk.token_ids)
                drafts[i].append(token)
                if len(drafts[i]) < num_drafts[i]:
                    following[i] = SeqChunk([token], chunk.start + len(chunk.token_ids), chunk.block_ids)
            chunks = following
        return drafts

    def retain(self, request_ids: Collection[str]) -> None:
        for request_id in [r for r in self._seqs if r not in request_ids]:
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        del self._seqs[request_id]
        self.kv.free(request_id)

    def _catch_up(self, request: Request, k: int) -> SeqChunk | None:
        """Roll the draft's KV back to what still matches the request, and allocate for the tokens
        it must compute: the request's new ones, then k - 1 drafts (the last draft is never fed).
        None (no drafts this step) when the draft's pool has no room."""
        tokens = request.all_token_ids
        seq = self._seqs.setdefault(request.request_id, _DraftSeq())
        valid = _common_prefix(seq.token_ids, tokens, seq.num_committed)
        valid = min(valid, len(tokens) - 1)  # the last token is fed again: its logits give draft 0
        if request.request_id in self.kv.tables:
            self.kv.trim(request.request_id, valid)
        del seq.token_ids[valid:]
        seq.num_committed = len(tokens)
        new = tokens[valid:]
        if not self.kv.allocate_slots(request.request_id, tokens, valid, len(new) + k - 1, register=False):
            self._drop(request.request_id)
            return None
        return SeqChunk(new, valid, self.kv.block_ids(request.request_id))

    def _forward(self, chunks: list[SeqChunk]) -> list[int]:
        """One draft forward pass; the greedy next token of each chunk."""
        layout = layout_batch(chunks, self.kv.block_size, self.device)
        hidden = self.model.forward(layout.input_ids, layout.positions, self.kv_cache, layout.meta)
        last = [start + len(c.token_ids) - 1 for start, c in zip(layout.query_starts, chunks, strict=True)]
        rows = torch.tensor(last, dtype=torch.long, device=self.device)
        return argmax(self.model.compute_logits(hidden.index_select(0, rows))).tolist()


def _common_prefix(a: list[int], b: list[int], known: int) -> int:
    """Length of the common prefix of a and b, of which the first `known` positions are known equal."""
    n = min(len(a), len(b), known)
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n
