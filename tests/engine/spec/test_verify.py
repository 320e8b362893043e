"""Verification of drafts: greedy acceptance, the distribution rejection sampling produces, and the
target distribution it verifies against (the sampler's own)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from duoserve.engine.sampler import Sampler, SamplingRow
from duoserve.engine.spec.verify import (
    DraftVerification,
    accept_greedy,
    position_rows,
    rejection_sample,
    target_probs,
    verify,
)
from duoserve.sampling_params import SamplingParams

VOCAB = 8
NUM_SAMPLES = 20_000


def row(output: list[int] | None = None, generator=None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [1, 2], output or [], generator, frozenset({0}))


def test_greedy_accepts_the_longest_matching_prefix_then_the_target_token():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # corrected at the first mismatch
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert accept_greedy([], [3]) == [3]


def test_greedy_verification_sees_the_drafts_before_each_position_as_output():
    # Token 3 is best everywhere, but a presence penalty makes it lose once it is in the output.
    logits = torch.tensor([[0.0, 0.0, 0.0, 2.0, 1.5, 0, 0, 0]]).repeat(3, 1)
    base = row(temperature=0.0, presence_penalty=1.0)
    item = DraftVerification(position_rows(base, [3, 3]), [3, 3])
    # Position 0: 3 (nothing in the output); position 1: 3 is penalised (2 - 1 < 1.5), so 4 wins.
    assert verify(logits, [item], torch.Generator()) == [[3, 4]]
    # min_tokens masks the stop token 0 at positions whose output is still short.
    logits = torch.tensor([[5.0, 1.0, 0, 0, 0, 0, 0, 0]]).repeat(3, 1)
    base = row(temperature=0.0, min_tokens=2)
    item = DraftVerification(position_rows(base, [1, 1]), [1, 1])
    assert verify(logits, [item], torch.Generator()) == [[1, 1, 0]]


def _frequencies(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()


def _assert_distributed_as(tokens: list[int], probs: torch.Tensor) -> None:
    """Chi-square goodness of fit over the tokens with mass (p < 1e-3: the test is wrong, not noisy)."""
    counts = _frequencies(tokens)
    assert counts[probs == 0].sum() == 0, "a token without mass was emitted"
    support = probs > 0
    expected = probs[support].double() / probs[support].double().sum() * len(tokens)
    result = chisquare(counts[support].numpy(), expected.numpy())
    assert result.pvalue > 1e-3, (counts / len(tokens), probs)


def _emitted(
    probs: torch.Tensor, drafts: list[int] | None, draft_probs: torch.Tensor | None
) -> list[tuple[list[int], list[int]]]:
    """(drafts, emitted tokens) of NUM_SAMPLES verifications; drafts None: drawn from draft_probs."""
    generator = torch.Generator().manual_seed(0)
    u = torch.rand(NUM_SAMPLES, probs.shape[0], generator=generator)
    if drafts is None:
        drawn = torch.stack(
            [torch.multinomial(q, NUM_SAMPLES, True, generator=generator) for q in draft_probs]
        )
        per_sample = drawn.T.tolist()
    else:
        per_sample = [drafts] * NUM_SAMPLES
    return [(d, rejection_sample(probs, d, draft_probs, u[i])) for i, d in enumerate(per_sample)]


@pytest.mark.parametrize("sampling_draft", [False, True])
def test_rejection_sampling_emits_the_target_distribution(sampling_draft):
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, VOCAB, generator=generator), dim=-1)
    probs[0, 5] = 0.0  # a token the target never emits: it must never come out
    probs /= probs.sum(dim=-1, keepdim=True)
    if sampling_draft:  # a draft sampling its own q, proposing what the target often rejects
        draft_probs = torch.softmax(2 * torch.randn(2, VOCAB, generator=generator), dim=-1)
        drafts = None
    else:  # a deterministic draft: q one-hot; drafts the target finds plausible but not certain
        draft_probs = None
        drafts = [int(probs[0].argsort()[-2]), int(probs[1].argsort()[-1])]
    emitted = _emitted(probs, drafts, draft_probs)
    # The first token is distributed as p_0, whatever the draft proposed ...
    _assert_distributed_as([e[0] for _, e in emitted], probs[0])
    # ... and after an accepted first draft, the next one as p_1, and so on.
    second = [e[1] for d, e in emitted if e[0] == d[0]]
    assert len(second) > NUM_SAMPLES // 10
    _assert_distributed_as(second, probs[1])
    third = [e[2] for d, e in emitted if e[:2] == d]
    assert len(third) > NUM_SAMPLES // 20
    _assert_distributed_as(third, probs[2])


def test_the_test_catches_a_wrong_rejection_rule():
    """Resampling from p (instead of p without the rejected draft) skews the distribution: the
    goodness-of-fit check above must see it, or it proves nothing."""
    probs = torch.tensor([0.05, 0.1, 0.4, 0.15, 0.1, 0.1, 0.05, 0.05])
    generator = torch.Generator().manual_seed(2)
    tokens = []
    for _ in range(NUM_SAMPLES):
        u = torch.rand(2, generator=generator)
        if u[0] < probs[2]:
            tokens.append(2)
        else:
            tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    with pytest.raises(AssertionError):
        _assert_distributed_as(tokens, probs)


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=3),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=0.9, top_k=5, top_p=0.8, min_p=0.1),
        dict(temperature=1.0, min_p=0.2),
    ],
)
def test_target_probs_is_what_the_sampler_draws_from(params):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    probs = target_probs(logits, SamplingParams(**params))[0]
    sampler = Sampler(seed=4)
    tokens = sampler(logits.repeat(NUM_SAMPLES, 1), [row(**params)] * NUM_SAMPLES).token_ids
    _assert_distributed_as(tokens, probs)


def test_seeded_verification_is_reproducible_and_draws_k_plus_1_uniforms():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))

    def run() -> tuple[list[list[int]], float]:
        generator = torch.Generator().manual_seed(7)
        item = DraftVerification(position_rows(row(generator=generator, temperature=1.0), [1, 2]), [1, 2])
        tokens = verify(logits, [item], torch.Generator())
        return tokens, float(torch.rand((), generator=generator))

    first, next_draw = run()
    assert run() == (first, next_draw)
    reference = torch.Generator().manual_seed(7)
    torch.rand(3, generator=reference)
    assert next_draw == float(torch.rand((), generator=reference))
