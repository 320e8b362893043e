"""Batched token sampling from logits, with vLLM v1 semantics.

Per step and row: min_tokens stop masking -> logit_bias -> repetition penalty -> presence/frequency
penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample. Logprobs are of the raw
logits (after a structured-output mask, which the engine applies before this).

Sampling is inverse-CDF with one uniform draw per row per step, taken from the row's own generator
when it has one: a seeded request then gets the same tokens whatever else shares its batch. (The
exponential race vLLM uses on GPUs needs V random draws per row, which on a CPU costs more than
all the rest of the step.) Rows with top-k or top-p sample among their few best candidates, found
by a partial top-k, so only the other rows pay full-vocabulary passes.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from duoserve.engine.model_runner import to_device
from duoserve.sampling_params import SamplingParams

# Top-p without top-k looks for the nucleus among this many best tokens, then the next count, and
# sorts the whole vocabulary last.
_TOP_P_CANDIDATES = (64, 1024, 8192)

# Logits per block in argmax: big enough for few blocks, small enough for a cheap last argmax.
_ARGMAX_BLOCK = 256

# The largest logit a penalty may leave: divided by a temperature just above the greedy threshold (1e-5),
# it stays finite in float32 (max 3.4e38).
_MAX_LOGIT = 1e30

# Bound the float32 log-softmax buffer of compute_logprobs (prompt logprobs can span many rows).
_LOGPROB_CHUNK_ELEMENTS = 1 << 24


@dataclass
class InFlight:
    """Tokens some rows' requests have sampled but the host does not hold yet (async scheduling: the step
    before is still on the device): `tokens[j]` (a device tensor) is the newest output token of row
    `rows[j]`, past its `output_token_ids`. The penalties count them there, without waiting for them."""

    rows: list[int]
    tokens: torch.Tensor


@dataclass
class SamplingRow:
    """What the engine passes for one row of logits."""

    params: SamplingParams
    prompt_token_ids: list[int]  # repetition_penalty covers prompt + output (as vLLM and HF do)
    output_token_ids: list[int]  # presence/frequency penalties and min_tokens count output only
    # Per-request CPU generator made from params.seed; None draws from the sampler's shared one.
    generator: torch.Generator | None
    # eos ids (unless ignore_eos) + params.stop_token_ids: masked while output < params.min_tokens.
    stop_token_ids: Collection[int]


@dataclass
class SampleResult:
    token_ids: list[int]  # one per row
    # Per row: None unless params.logprobs is set; else the top-`logprobs` ids in descending order,
    # then the sampled id when it is not among them. Values are log_softmax of the raw logits.
    logprobs: list[dict[int, float] | None]
    ranks: list[int | None]  # rank of the sampled token in the raw distribution (1 = best)


@dataclass
class TokenLogprobs:
    """Log-probabilities of chosen tokens, and the top alternatives, for N positions."""

    logprobs: torch.Tensor  # [N] float32
    ranks: torch.Tensor  # [N] int64: 1 + number of other tokens at least as likely (vLLM's rank)
    top_ids: torch.Tensor  # [N, num_top] int64, descending by logprob
    top_logprobs: torch.Tensor  # [N, num_top] float32

    def as_dicts(self, token_ids: torch.Tensor, num_top: list[int]) -> list[dict[int, float]]:
        """One {id: logprob} dict per position: its first num_top[i] entries, then the chosen id."""
        chosen, lps = token_ids.tolist(), self.logprobs.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        dicts = []
        for i, n in enumerate(num_top):
            entry = dict(zip(top_ids[i][:n], top_lps[i][:n], strict=True))
            entry.setdefault(chosen[i], lps[i])
            dicts.append(entry)
        return dicts


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> TokenLogprobs:
    """log_softmax of raw logits [N, V]: the logprob and rank of token_ids [N], and the top num_top."""
    parts = []
    rows_per_chunk = max(1, _LOGPROB_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    for start in range(0, logits.shape[0], rows_per_chunk):
        lp = torch.log_softmax(logits[start : start + rows_per_chunk].float(), dim=-1)
        chosen = lp.gather(1, token_ids[start : start + rows_per_chunk, None])
        ranks = (lp >= chosen).sum(-1)
        top_lps, top_ids = lp.topk(num_top, dim=-1)
        parts.append((chosen.squeeze(1), ranks, top_ids, top_lps))
    if not parts:
        return TokenLogprobs(
            torch.empty(0),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, num_top, dtype=torch.long),
            torch.empty(0, num_top),
        )
    return TokenLogprobs(*(torch.cat(tensors) for tensors in zip(*parts, strict=True)))


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        # Shared by every row without its own generator; always on the CPU (uniforms are tiny).
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], in_flight: InFlight | None = None
    ) -> SampleResult:
        """Pick one token per row of logits [B, V] (any float dtype; computed in float32)."""
        token_ids = self.sample(logits, rows, in_flight)
        logprobs, ranks = _sampled_logprobs(logits, token_ids, rows)
        return SampleResult(token_ids.tolist(), logprobs, ranks)

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], in_flight: InFlight | None = None
    ) -> torch.Tensor:
        """The token ids [B] alone, left on the logits' device, which no row waits for: async scheduling
        feeds them to the next step from there. Penalties count the tokens still in flight on the device
        (`in_flight`) without waiting for them; min_tokens does wait (its rows never overlap steps)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        logits = logits.float()  # a no-op for float32: never written in place below
        if all(_is_plain_greedy(row) for row in rows):
            return argmax(logits)
        return self._sample(apply_penalties(logits, rows, in_flight), rows)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows):
            return argmax(logits)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if greedy:
            idx = _index(greedy, logits.device)
            token_ids[idx] = argmax(logits.index_select(0, idx))
        self._sample_random(
            logits, rows, [i for i, row in enumerate(rows) if not row.params.greedy], token_ids
        )
        return token_ids

    def _sample_random(
        self, logits: torch.Tensor, rows: list[SamplingRow], row_ids: list[int], token_ids: torch.Tensor
    ) -> None:
        """Temperature, top-k, top-p, min-p, then one draw for each of row_ids, into token_ids."""
        params = [row.params for row in rows]
        device = logits.device
        temperature = to_device([p.temperature for p in params], torch.float32, device)[:, None]
        # None: no row has min-p, nothing to mask (known here, not by asking the device).
        min_p = None
        if any(p.min_p for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32, device)
        u = to_device(self._uniforms(rows, row_ids), torch.float32, device)
        for group, values, ids in _truncated_candidates(logits, temperature, params, row_ids):
            idx = _index(group, device)
            chosen = _sample_sorted(values, None if min_p is None else min_p[idx], u[idx])
            token_ids[idx] = ids.gather(1, chosen[:, None]).squeeze(1)
        whole = [i for i in row_ids if not _truncates(params[i], logits.shape[1])]
        if whole:
            idx = _index(whole, device)
            row_min_p = None if min_p is None else min_p[idx]
            token_ids[idx] = _sample_whole(_scaled_rows(logits, whole, temperature), row_min_p, u[idx])

    def _uniforms(self, rows: list[SamplingRow], row_ids: list[int]) -> torch.Tensor:
        """A U[0, 1) for each of row_ids: seeded rows from their own generator, the rest in one draw."""
        unseeded = [i for i in row_ids if rows[i].generator is None]
        u = torch.zeros(len(rows))
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), generator=self.generator)
        for i in row_ids:
            generator = rows[i].generator
            if generator is not None:
                u[i] = torch.rand((), generator=generator)
        return u


@functools.cache
def _cuda_argmax():
    """models/triton_ops (its argmax_rows) where Triton is installed; None where not (the torch attention
    backend on CUDA needs no Triton): then the block trick below runs on CUDA too."""
    try:
        from duoserve.models import triton_ops
    except ImportError:
        return None
    return triton_ops


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for [n, V], first index on ties, ~10x faster on CPU.

    torch's argmax walks the row serially while amax is vectorised, so take the max of each block
    of _ARGMAX_BLOCK logits, then argmax only over the block maxima and inside the winning block.
    On CUDA one Triton launch does it (models/triton_ops.argmax_rows: 27 us of torch's argmax at batch 1
    on an H200, a row walked by one program).
    """
    ops = _cuda_argmax() if x.is_cuda else None
    if ops is not None and ops.argmax_applies(x):
        return ops.argmax_rows(x)
    n, vocab = x.shape
    num_blocks = vocab // _ARGMAX_BLOCK
    if num_blocks < 2:
        return x.argmax(dim=-1)
    head = x[:, : num_blocks * _ARGMAX_BLOCK].reshape(n, num_blocks, _ARGMAX_BLOCK)
    best_block = head.amax(dim=-1).argmax(dim=-1)
    rows = torch.arange(n, device=x.device)
    best = best_block * _ARGMAX_BLOCK + head[rows, best_block].argmax(dim=-1)
    if num_blocks * _ARGMAX_BLOCK < vocab:
        tail_max, tail_arg = x[:, num_blocks * _ARGMAX_BLOCK :].max(dim=-1)
        # Strictly greater: on a tie the earlier (head) index wins, as in argmax.
        best = torch.where(tail_max > x[rows, best], tail_arg + num_blocks * _ARGMAX_BLOCK, best)
    return best


def reads_output(row: SamplingRow) -> bool:
    """Whether sampling the row reads its output tokens: a penalty, or min_tokens still masking its stop
    tokens."""
    return penalised(row.params) or _masks_stop_tokens(row)


def waits_for_output(row: SamplingRow) -> bool:
    """Whether sampling the row needs its newest token on the host: min_tokens still masking its stop
    tokens (async scheduling cannot leave such a row's step in flight). Penalties take a token still on
    the device from `InFlight`."""
    return _masks_stop_tokens(row)


def penalised(p: SamplingParams) -> bool:
    """Whether the request asks for any of the three penalties."""
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _is_plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return p.greedy and p.logprobs is None and not p.logit_bias and not reads_output(row)


def _masks_stop_tokens(row: SamplingRow) -> bool:
    return bool(row.stop_token_ids) and len(row.output_token_ids) < row.params.min_tokens


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return to_device(rows, torch.long, device)


def apply_penalties(
    logits: torch.Tensor, rows: list[SamplingRow], in_flight: InFlight | None = None
) -> torch.Tensor:
    """min_tokens masking, logit_bias and the three penalties; returns `logits` itself when no row needs
    them. `in_flight`: output tokens still on the device, counted as if they ended output_token_ids, with
    no host synchronisation (what an overlapped step may not do)."""
    masked = [i for i, row in enumerate(rows) if _masks_stop_tokens(row)]
    biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
    repetition = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    additive = [
        i for i, row in enumerate(rows) if row.params.presence_penalty or row.params.frequency_penalty
    ]
    if not (masked or biased or repetition or additive):
        return logits
    # Contiguous, whatever the input's strides: the penalties index its flat view.
    out = logits.clone(memory_format=torch.contiguous_format)
    if masked:
        _mask_stop_tokens(out, rows, masked)
    if biased:
        _apply_logit_bias(out, rows, biased)
    if repetition:
        _apply_repetition_penalty(out, rows, repetition, in_flight)
    if additive and in_flight is None:
        _apply_additive_penalties(out, rows, additive)
    elif additive:
        _apply_additive_penalties_dense(out, rows, additive, in_flight)
    _keep_samplable(out, logits)
    return out


def _keep_samplable(processed: torch.Tensor, raw: torch.Tensor) -> None:
    """Keep penalised logits drawable, whatever the request's values.

    A repetition_penalty that rounds to 0 or overflows in float32 (1e-320, 1e-40) makes seen tokens +inf
    or NaN, and min_tokens with every token a stop id masks a whole row to -inf; either way the CDF is
    NaN and the draw an index past the vocabulary, which would kill the engine. +inf becomes a logit
    that still survives division by the smallest temperature (so such tokens share the mass equally, the
    limit of a vanishing penalty), NaN is masked, and a row left with nothing to draw keeps its raw logits.
    """
    processed.nan_to_num_(nan=-math.inf, posinf=_MAX_LOGIT, neginf=-math.inf).clamp_(max=_MAX_LOGIT)
    empty = torch.isneginf(processed).all(dim=-1)
    if processed.is_cuda:  # no host synchronisation (a boolean test or mask index would wait for the GPU)
        torch.where(empty[:, None], raw, processed, out=processed)
    elif empty.any():
        processed[empty] = raw[empty]


def _mask_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    vocab = logits.shape[1]
    # User-given stop ids beyond the vocabulary can never be sampled: nothing to mask.
    pairs = [(i, t) for i in row_ids for t in rows[i].stop_token_ids if t < vocab]
    if pairs:
        logits[tuple(torch.tensor(pairs, device=logits.device).T)] = -math.inf


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """OpenAI's logit_bias: each listed token's logit += its bias (ids are checked against the vocabulary
    when the request is added)."""
    token_lists = [list(rows[i].params.logit_bias) for i in row_ids]
    keys = _flat_keys(logits, row_ids, token_lists)
    bias = [b for i in row_ids for b in rows[i].params.logit_bias.values()]
    logits.view(-1)[keys] += to_device(bias, torch.float32, logits.device)


def _flat_keys(logits: torch.Tensor, row_ids: list[int], token_lists: list[list[int]]) -> torch.Tensor:
    """Indices into logits.view(-1) of every (row, token) pair, duplicates kept, in row order."""
    vocab = logits.shape[1]
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab:
        # Out of range would silently alias into a neighbouring row of the flat view.
        raise ValueError(f"token ids must be in [0, {vocab}) for penalties")
    lengths = torch.tensor([len(t) for t in token_lists])
    offsets = torch.repeat_interleave(torch.tensor(row_ids) * vocab, lengths)
    return to_device(offsets + tokens, torch.long, logits.device)


def _per_key(values: list[float], token_lists: list[list[int]], keys: torch.Tensor) -> torch.Tensor:
    lengths = torch.tensor([len(t) for t in token_lists])
    return to_device(torch.repeat_interleave(torch.tensor(values), lengths), torch.float32, keys.device)


def _apply_repetition_penalty(
    logits: torch.Tensor, rows: list[SamplingRow], row_ids: list[int], in_flight: InFlight | None
) -> None:
    """HF rule over the distinct tokens of prompt + output: logit > 0 ? logit / p : logit * p."""
    token_lists = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in row_ids]
    keys = _flat_keys(logits, row_ids, token_lists)
    penalty = _per_key([rows[i].params.repetition_penalty for i in row_ids], token_lists, keys)
    if in_flight is not None:  # each in-flight token one key more, built on the device
        extra, tokens = _in_flight_of(in_flight, row_ids)
        if extra:
            vocab = logits.shape[1]
            keys = torch.cat([keys, _index(extra, logits.device) * vocab + tokens])
            extra_penalty = [rows[i].params.repetition_penalty for i in extra]
            penalty = torch.cat([penalty, to_device(extra_penalty, torch.float32, logits.device)])
    flat = logits.view(-1)
    # Gather then scatter: a repeated token reads the same original logit and writes the same
    # result, so it is penalised once, with no need to deduplicate a long prompt.
    values = flat[keys]
    flat[keys] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_additive_penalties(logits: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """logit -= frequency * count + presence * (count > 0), over output tokens (vLLM)."""
    token_lists = [rows[i].output_token_ids for i in row_ids]
    keys, counts = torch.unique(_flat_keys(logits, row_ids, token_lists), return_counts=True)
    if not keys.numel():
        return
    vocab = logits.shape[1]
    frequency = torch.zeros(logits.shape[0], device=logits.device)
    presence = torch.zeros(logits.shape[0], device=logits.device)
    idx = _index(row_ids, logits.device)
    frequency[idx] = torch.tensor([rows[i].params.frequency_penalty for i in row_ids], device=logits.device)
    presence[idx] = torch.tensor([rows[i].params.presence_penalty for i in row_ids], device=logits.device)
    row_of_key = keys // vocab
    logits.view(-1)[keys] -= frequency[row_of_key] * counts + presence[row_of_key]


def _apply_additive_penalties_dense(
    logits: torch.Tensor, rows: list[SamplingRow], row_ids: list[int], in_flight: InFlight
) -> None:
    """_apply_additive_penalties' arithmetic, the counts gathered in a dense [rows, V] tensor instead of
    by torch.unique, whose output size the host must wait for (on CUDA, for the step in flight): the
    in-flight tokens count on the device. Every count c > 0 gives logit - (frequency * c + presence),
    the same float32 operations as the sparse way, so the same logits."""
    vocab = logits.shape[1]
    token_lists = [rows[i].output_token_ids for i in row_ids]
    local = list(range(len(row_ids)))
    keys = _flat_keys(logits, local, token_lists)  # into a [len(row_ids), V] block
    extra, tokens = _in_flight_of(in_flight, row_ids)
    if extra:
        position = {i: j for j, i in enumerate(row_ids)}
        keys = torch.cat([keys, _index([position[i] for i in extra], logits.device) * vocab + tokens])
    counts = torch.zeros(len(row_ids) * vocab, dtype=torch.long, device=logits.device)
    counts.index_add_(0, keys, torch.ones_like(keys))
    counts = counts.view(len(row_ids), vocab)
    frequency = to_device([rows[i].params.frequency_penalty for i in row_ids], torch.float32, logits.device)
    presence = to_device([rows[i].params.presence_penalty for i in row_ids], torch.float32, logits.device)
    idx = _index(row_ids, logits.device)
    block = logits.index_select(0, idx)
    penalised = block - (frequency[:, None] * counts + presence[:, None])
    logits.index_copy_(0, idx, torch.where(counts > 0, penalised, block))


def _in_flight_of(in_flight: InFlight, row_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Those of row_ids with a token in flight, and their tokens (device)."""
    wanted = set(row_ids)
    picks = [j for j, row in enumerate(in_flight.rows) if row in wanted]
    if not picks:
        return [], in_flight.tokens[:0]
    tokens = (
        in_flight.tokens
        if len(picks) == len(in_flight.rows)
        else in_flight.tokens[_index(picks, in_flight.tokens.device)]
    )
    return [in_flight.rows[j] for j in picks], tokens


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows], without a copy when that is every row."""
    return x if len(rows) == x.shape[0] else x.index_select(0, _index(rows, x.device))


def _scaled_rows(logits: torch.Tensor, rows: list[int], temperature: torch.Tensor) -> torch.Tensor:
    """A new tensor of logits[rows] / temperature[rows], in one allocation."""
    if len(rows) == logits.shape[0]:
        return logits / temperature
    idx = _index(rows, logits.device)
    return logits.index_select(0, idx).div_(temperature[idx])


def _truncates(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1.0


def _truncated_candidates(
    logits: torch.Tensor, temperature: torch.Tensor, params: list[SamplingParams], row_ids: list[int]
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """For those of row_ids with top-k or top-p: (rows, scaled logits [m, k], token ids [m, k]) groups.

    Logits come sorted descending, -inf past the nucleus. Sampling among a few candidates spares
    these rows a pass over the whole vocabulary. Top-k keeps exactly k tokens (vLLM also keeps
    ties with the k-th logit; that differs only on exact ties). Rows are grouped by their own k,
    not the batch's largest, so which tokens a row keeps, and in what order, never depends on its
    neighbours.
    """
    vocab = logits.shape[1]
    by_top_k: dict[int, list[int]] = {}
    for i in row_ids:
        if 0 < params[i].top_k < vocab:
            by_top_k.setdefault(params[i].top_k, []).append(i)
    top_p = to_device([p.top_p for p in params], torch.float32, logits.device)
    for k, group in by_top_k.items():
        idx = _index(group, logits.device)
        values, ids = _rows(logits, group).topk(k, dim=-1)
        values /= temperature[idx]
        if any(params[i].top_p < 1.0 for i in group):
            # The nucleus is taken from the renormalised k best, all at hand.
            _cut_nucleus(values, torch.logsumexp(values, dim=-1, keepdim=True), top_p[idx])
        yield group, values, ids
    nucleus_only = [i for i in row_ids if params[i].top_p < 1.0 and not 0 < params[i].top_k < vocab]
    if nucleus_only:
        x = _scaled_rows(logits, nucleus_only, temperature)
        for group, values, ids in _nucleus_candidates(x, top_p[_index(nucleus_only, logits.device)]):
            yield [nucleus_only[i] for i in group], values, ids


def _nucleus_candidates(
    x: torch.Tensor, top_p: torch.Tensor
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Top-p over the whole vocabulary of x [n, V]: widen the candidates until they hold the nucleus.

    A partial top-k is far cheaper than sorting the vocabulary, and real nuclei are mostly small.
    Each row settles at the first candidate count that holds its nucleus, a property of that row.
    """
    vocab = x.shape[1]
    log_total = torch.logsumexp(x, dim=-1, keepdim=True)
    if x.device.type != "cpu":
        # An accelerator sorts the vocabulary faster than the host can ask which rows settled (each ask
        # waits for the device, and async scheduling would wait with it).
        values, ids = x.sort(dim=-1, descending=True)
        _cut_nucleus(values, log_total, top_p)
        yield list(range(x.shape[0])), values, ids
        return
    pending = torch.arange(x.shape[0], device=x.device)
    for k in (*(k for k in _TOP_P_CANDIDATES if k < vocab), vocab):
        rows = _rows(x, pending.tolist())
        values, ids = rows.topk(k, dim=-1) if k < vocab else rows.sort(dim=-1, descending=True)
        settled = _cut_nucleus(values, log_total[pending], top_p[pending]) | (k == vocab)
        if settled.any():
            yield pending[settled].tolist(), values[settled], ids[settled]
        pending = pending[~settled]
        if not pending.numel():
            return


def _cut_nucleus(values: torch.Tensor, log_total: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the sorted logits past the nucleus; says which rows' candidates reach top_p.

    A token stays while the probability before it is under top_p, so the best one always stays.
    Rows with top_p = 1 keep everything (a float cumsum can reach 1 before the last token).
    """
    probs = (values - log_total).exp_()
    cumulative = probs.cumsum(dim=-1)
    limit = torch.where(top_p < 1.0, top_p, math.inf)[:, None]
    values.masked_fill_(cumulative - probs >= limit, -math.inf)
    return cumulative[:, -1] >= top_p


def _sample_sorted(values: torch.Tensor, min_p: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Positions drawn from scaled logits sorted descending [m, k], after min-p."""
    return _sample_shifted(values - values[:, :1], min_p, u)


def _sample_whole(x: torch.Tensor, min_p: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Token ids drawn over the whole vocabulary from scaled logits [n, V] (consumed), after min-p."""
    return _sample_shifted(x.sub_(x.amax(dim=-1, keepdim=True)), min_p, u)


def _sample_shifted(x: torch.Tensor, min_p: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Positions drawn from scaled logits whose row maximum is 0 (consumed), after min-p (None: no row
    has it).

    With the best logit at 0, exp cannot overflow, and min-p (probability under min_p times the
    best one's) is a logit under log(min_p); log 0 = -inf masks nothing. Sampling is inverse-CDF:
    where u [n] falls in the unnormalised cumulative distribution.
    """
    if min_p is not None:
        x.masked_fill_(x < min_p.log()[:, None], -math.inf)
    cdf = x.exp_().cumsum_(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the first CDF entry above it is a token with nonzero mass
    # (masked tokens add 0 and never raise the CDF) even when u * total rounds up.
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _sampled_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]
) -> tuple[list[dict[int, float] | None], list[int | None]]:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    logprobs: list[dict[int, float] | None] = [None] * len(rows)
    ranks: list[int | None] = [None] * len(rows)
    if not wanted:
        return logprobs, ranks
    num_top = [rows[i].params.logprobs for i in wanted]
    idx = _index(wanted, logits.device)
    chosen = token_ids.index_select(0, idx)
    result = compute_logprobs(logits.index_select(0, idx), chosen, max(num_top))
    for i, entry, rank in zip(wanted, result.as_dicts(chosen, num_top), result.ranks.tolist(), strict=True):
        logprobs[i], ranks[i] = entry, rank
    return logprobs, ranks
