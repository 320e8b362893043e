"""Verification of draft tokens against the target's logits: greedy acceptance, rejection sampling.

A request verifying k drafts d_0..d_{k-1} has target logits at 1 + k positions: position j
predicts the token after d_{j-1} (position 0: after the request's last token). Each position is
processed as the sampler would with the drafts before it as output (penalties, min_tokens), so
the verified distribution is exactly the one plain decoding would sample from.

- Greedy: accept the longest prefix of drafts equal to the target's argmax, then the argmax at
  the first mismatch (or after the last draft): output identical to decoding without drafts.
- Sampling (Leviathan et al., 2023): accept d_j with probability min(1, p_j(d_j) / q_j(d_j));
  on the first rejection emit a draw from norm(max(0, p_j - q_j)) and stop; with all k accepted,
  emit a draw from p_k. The output is distributed exactly as the target's. Proposers here are
  deterministic (q_j is one-hot on d_j: accept with probability p_j(d_j), resample from p_j
  without d_j); `draft_probs` takes a sampling draft's q.

Each verification draws exactly k + 1 uniforms from the request's generator (or the shared one),
whatever is accepted: a seeded request is reproducible run to run, given the same drafts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duoserve.engine.sampler import SamplingRow, apply_penalties, argmax
from duoserve.sampling_params import SamplingParams


@dataclass
class DraftVerification:
    """One request's part of a verification: its rows of logits (1 + k) and its k drafts."""

    rows: list[SamplingRow]  # per position, output_token_ids include the drafts before it
    draft_token_ids: list[int]
    draft_probs: torch.Tensor | None = None  # [k, V] q of a sampling draft; None: one-hot on the drafts


def position_rows(row: SamplingRow, draft_token_ids: list[int]) -> list[SamplingRow]:
    """The sampling row of each of the 1 + k positions: the drafts before it count as output."""
    return [
        SamplingRow(
            params=row.params,
            prompt_token_ids=row.prompt_token_ids,
            output_token_ids=row.output_token_ids + draft_token_ids[:j],
            generator=row.generator,
            stop_token_ids=row.stop_token_ids,
        )
        for j in range(len(draft_token_ids) + 1)
    ]


def verify(
    logits: torch.Tensor, items: list[DraftVerification], shared_generator: torch.Generator
) -> list[list[int]]:
    """The tokens each request emits (accepted drafts, then one from the target), from logits
    [sum(1 + k), V] laid out request by request."""
    rows = [row for item in items for row in item.rows]
    if logits.shape[0] != len(rows):
        raise ValueError(f"logits must have one row per position ({len(rows)}), got {logits.shape[0]}")
    processed = apply_penalties(logits.float(), rows)
    best = argmax(processed).tolist()
    results, offset = [], 0
    for item in items:
        num_rows = len(item.rows)
        params = item.rows[0].params
        if params.greedy:
            results.append(accept_greedy(item.draft_token_ids, best[offset : offset + num_rows]))
        else:
            generator = item.rows[0].generator or shared_generator
            u = torch.rand(num_rows, generator=generator)
            probs = target_probs(processed[offset : offset + num_rows], params)
            results.append(rejection_sample(probs, item.draft_token_ids, item.draft_probs, u))
        offset += num_rows
    return results


def accept_greedy(draft_token_ids: list[int], target_token_ids: list[int]) -> list[int]:
    """Drafts up to the first one the target disagrees with, then the target's token there."""
    for j, draft in enumerate(draft_token_ids):
        if draft != target_token_ids[j]:
            return [*draft_token_ids[:j], target_token_ids[j]]
    return [*draft_token_ids, target_token_ids[len(draft_token_ids)]]


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler draws from, [n, V]: temperature, top-k, top-p, then min-p.

    Same rules as duoserve.engine.sampler: top-k keeps exactly k tokens, top-p is taken over the
    renormalised top-k and keeps a token while the mass before it is under top_p, min-p drops
    tokens under min_p times the best one's probability.
    """
    x = logits / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab or params.top_p < 1.0:
        k = params.top_k if 0 < params.top_k < vocab else vocab
        values, ids = x.topk(k, dim=-1)  # sorted descending
        if params.top_p < 1.0:
            probs = torch.softmax(values, dim=-1)
            before = probs.cumsum(dim=-1) - probs
            values = values.masked_fill(before >= params.top_p, -math.inf)
        x = torch.full_like(x, -math.inf).scatter_(1, ids, values)
    if params.min_p > 0:
        x = x.masked_fill(x - x.amax(dim=-1, keepdim=True) < math.log(params.min_p), -math.inf)
    return torch.softmax(x, dim=-1)


def rejection_sample(
    probs: torch.Tensor, draft_token_ids: list[int], draft_probs: torch.Tensor | None, u: torch.Tensor
) -> list[int]:
    """Leviathan et al.'s acceptance test over target probs [k + 1, V], with k + 1 uniforms u:
    u[j] decides draft j, u[k] draws the corrected or bonus token."""
    k = len(draft_token_ids)
    for j, draft in enumerate(draft_token_ids):
        p = float(probs[j, draft])
        q = 1.0 if draft_probs is None else float(draft_probs[j, draft])
        if float(u[j]) * q < p:  # accepted with probability min(1, p / q)
            continue
        if draft_probs is None:
            residual = probs[j].clone()
            residual[draft] = 0.0
        else:
            residual = (probs[j] - draft_probs[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing to correct towards
            residual = probs[j]
        return [*draft_token_ids[:j], draw(residual, float(u[k]))]
    return [*draft_token_ids, draw(probs[k], float(u[k]))]


def draw(weights: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from unnormalised non-negative weights [V] with a uniform u in [0, 1)."""
    cdf = weights.double().cumsum(dim=0)
    total = cdf[-1]
    # Strictly below the total, so the token found has nonzero weight even when u * total rounds up.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cdf, target[None], right=True))
