import math

import pytest
import torch

from duoserve.engine import sampler as sampler_module
from duoserve.engine.sampler import Sampler, SamplingRow, compute_logprobs
from duoserve.sampling_params import SamplingParams

V = 50


def row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    stop_token_ids: list[int] | None = None,
    **params,
) -> SamplingRow:
    return SamplingRow(
        params=SamplingParams(**params),
        prompt_token_ids=prompt or [],
        output_token_ids=output or [],
        generator=generator,
        stop_token_ids=stop_token_ids or [],
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(batch: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=seeded(seed)) * 3


def empirical(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def draw_many(logits_row: torch.Tensor, num: int, seed: int = 0, **params) -> list[int]:
    """Sample `num` times from one distribution, as one batch of identical rows."""
    rows = [row(**params)] * num
    return Sampler(seed=seed)(logits_row.expand(num, -1), rows).token_ids


# --- greedy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = random_logits(8).to(dtype)
    result = Sampler(seed=0)(logits, [row(temperature=0.0) for _ in range(8)])
    assert result.token_ids == logits.float().argmax(-1).tolist()
    assert result.logprobs == [None] * 8


@pytest.mark.parametrize("vocab", [100, 512, 1000, 151_936])
def test_blocked_argmax_matches_torch_argmax(vocab):
    x = random_logits(6, vocab).round()  # rounding makes ties: the first index must win
    x[3, -1] = 100.0  # the max in the tail past the last full block
    x[4, [7, vocab - 1]] = 100.0  # a tie between the head and the tail
    assert torch.equal(sampler_module.argmax(x), x.argmax(-1))


def test_non_contiguous_logits():
    padded = random_logits(6, V + 14)
    logits = padded[:, :V]  # a model runner slicing off padded vocabulary
    transposed = logits.t().contiguous().t()
    rows = [row(temperature=0.0), row(presence_penalty=1.0, output=[1, 2]), row(top_k=3, logprobs=2)] * 2
    expected = Sampler(seed=0)(logits.contiguous(), rows)
    assert Sampler(seed=0)(logits, rows) == expected
    assert Sampler(seed=0)(transposed, rows) == expected


def test_fast_path_equals_general_path():
    logits = random_logits(16)
    fast = Sampler(seed=0)(logits, [row(temperature=0.0) for _ in range(16)])
    # Requesting logprobs, and a min_tokens row with nothing to mask, force the general path.
    rows = [row(temperature=0.0, logprobs=1) for _ in range(15)] + [row(temperature=0.0, min_tokens=4)]
    general = Sampler(seed=0)(logits, rows)
    assert general.token_ids == fast.token_ids


def test_greedy_rows_mixed_with_random_rows_stay_argmax():
    logits = random_logits(10)
    rows = [row(temperature=0.0) if i % 2 else row(temperature=1.0) for i in range(10)]
    tokens = Sampler(seed=0)(logits, rows).token_ids
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = random_logits(32)
    argmax = logits.argmax(-1).tolist()
    for seed in range(5):
        assert Sampler(seed=seed)(logits, [row(top_k=1) for _ in range(32)]).token_ids == argmax
        assert Sampler(seed=seed)(logits, [row(top_p=1e-6) for _ in range(32)]).token_ids == argmax


# --- distributions --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 1.5, 0.2])
    tokens = draw_many(logits, 20_000, temperature=temperature)
    expected = torch.softmax(logits / temperature, -1)
    # 20k draws over 8 outcomes: the expected TV is ~0.008, so 0.03 is far out in the tail.
    assert total_variation(empirical(tokens, 8), expected) < 0.03


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_k_renormalises_over_the_k_best(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.8])
    tokens = draw_many(logits, 20_000, top_k=3, temperature=temperature)
    expected = torch.softmax(logits.masked_fill(logits < 1.0, -math.inf) / temperature, -1)
    assert total_variation(empirical(tokens, 6), expected) < 0.03


def test_top_p_renormalises_over_the_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    # Mass before each token: 0, .5, .75, .9, .96; top_p=0.8 keeps the first three.
    tokens = draw_many(probs.log(), 20_000, top_p=0.8)
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert total_variation(empirical(tokens, 5), expected) < 0.03


def test_top_p_samples_the_nucleus_found_among_candidates():
    # 1000 tokens: the nucleus settles within the first 64 candidates, not by a full sort.
    probs = torch.full((1000,), 0.1 / 995)
    probs[[10, 500, 999, 3, 42]] = torch.tensor([0.4, 0.25, 0.15, 0.06, 0.04])
    tokens = draw_many(probs.log(), 20_000, top_p=0.7)  # mass before: 0, .4, .65, .8: keeps 3
    expected = torch.zeros(1000)
    expected[[10, 500, 999]] = torch.tensor([0.4, 0.25, 0.15]) / 0.8
    assert total_variation(empirical(tokens, 1000), expected) < 0.03


@pytest.mark.parametrize("extra", [{}, {"top_k": 7}, {"top_p": 0.999}])  # whole vocab or candidates
def test_min_p_never_samples_unlikely_tokens(extra):
    probs = torch.tensor([0.4, 0.3, 0.15, 0.05, 0.039, 0.03, 0.021, 0.01])
    # min_p=0.1 drops tokens under 0.1 * 0.4 = 0.04 (the last four).
    tokens = draw_many(probs.log(), 20_000, min_p=0.1, **extra)
    assert max(tokens) == 3
    expected = torch.cat([probs[:4] / probs[:4].sum(), torch.zeros(4)])
    assert total_variation(empirical(tokens, 8), expected) < 0.03


def flat_to_peaked_logits() -> torch.Tensor:
    """7 rows over 20000 tokens whose top_p=0.9 nuclei need each candidate count, sort included."""
    scale = torch.tensor([0.02, 0.3, 0.7, 1.0, 1.5, 3.0, 10.0])[:, None]
    return random_logits(7, vocab=20_000, seed=1) * scale


def nucleus_mask(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens _nucleus_candidates keeps, as a [n, V] mask."""
    kept = torch.zeros_like(x, dtype=torch.bool)
    groups = sampler_module._nucleus_candidates(x, torch.full((x.shape[0],), top_p))
    for group, values, ids in groups:
        for r, row_values, row_ids in zip(group, values, ids, strict=True):
            kept[r, row_ids[row_values.isfinite()]] = True
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_full_sort_reference(top_p):
    x = flat_to_peaked_logits()
    probs = x.double().sort(-1, descending=True).values.softmax(-1)
    expected_kept = ((probs.cumsum(-1) - probs) < top_p).sum(-1)
    kept = nucleus_mask(x, top_p)
    # float32 vs float64 cumulative sums may disagree on the one token at the boundary.
    assert (kept.sum(-1) - expected_kept).abs().max() <= 1
    dropped_best = x.masked_fill(kept, -math.inf).amax(-1)
    assert (x.masked_fill(~kept, math.inf).amin(-1) > dropped_best).all()  # kept = the best tokens


def test_top_p_candidate_counts_are_all_exercised():
    x = flat_to_peaked_logits()
    widths = {
        values.shape[1] for _, values, _ in sampler_module._nucleus_candidates(x, torch.full((7,), 0.9))
    }
    assert widths == {*sampler_module._TOP_P_CANDIDATES, 20_000}


def test_top_k_and_top_p_combine_over_the_renormalised_k_best():
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.07])
    # top_k=3 leaves .3/.65, .2/.65, .15/.65 = .46, .31, .23; top_p=0.7 then keeps the first two.
    tokens = draw_many(probs.log(), 20_000, top_k=3, top_p=0.7)
    expected = torch.tensor([0.6, 0.4, 0, 0, 0, 0, 0])
    assert total_variation(empirical(tokens, 7), expected) < 0.03


# --- reproducibility ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.9, "top_p": 0.95, "top_k": 2000, "min_p": 0.01},
        {"temperature": 1.5, "top_p": 0.95},  # wide nuclei: settled by the full sort
        {"temperature": 0.8, "top_p": 0.5},
        {"temperature": 1.0},
        {"temperature": 1.2, "min_p": 0.05},
        {"top_k": 5},
    ],
)
def test_seeded_row_ignores_the_rest_of_the_batch(params):
    vocab = 3000
    logits_steps = [random_logits(1, vocab, seed=s)[0] for s in range(6)]

    def run(position: int, others: list[dict], seed: int = 1234) -> list[int]:
        sampler, generator, tokens = Sampler(), seeded(seed), []
        for step, logits in enumerate(logits_steps):
            batch = random_logits(len(others) + 1, vocab, seed=100 + step)
            batch[position] = logits
            rows = [row(**kw) for kw in others]
            rows.insert(position, row(generator=generator, **params))
            tokens.append(sampler(batch, rows).token_ids[position])
        return tokens

    alone = run(0, [])
    others = [
        {"temperature": 1.3},
        {"temperature": 0.0},
        {"top_p": 0.3},
        {"top_k": 5, "min_p": 0.2},
        {"top_k": 2000, "seed": 1},
        {"temperature": 2.0, "top_p": 0.99},
        {"temperature": 0.7, "presence_penalty": 1.0},
    ]
    assert run(3, others) == alone
    assert run(7, others) == alone
    assert run(0, [], seed=99) != alone  # it really samples


def test_shared_generator_is_seedable():
    logits = random_logits(16)
    rows = [row() for _ in range(16)]
    assert Sampler(seed=7)(logits, rows).token_ids == Sampler(seed=7)(logits, rows).token_ids


def test_masked_tokens_are_never_sampled_even_at_the_cdf_edges():
    logits = torch.full((1, 10), -math.inf)
    logits[0, 4] = 0.0
    rows = [row()]
    sampler = Sampler(seed=0)
    for u in (0.0, 0.5, 1.0 - 2**-24):
        sampler._uniforms = lambda rows, row_ids, u=u: torch.full((len(rows),), u)
        assert sampler(logits, rows).token_ids == [4]


# --- penalties and min_tokens ---------------------------------------------------------------------


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone()
    for b, r in enumerate(rows):
        p = r.params
        for t in set(r.prompt_token_ids) | set(r.output_token_ids):
            value = out[b, t].item()
            out[b, t] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for t in set(r.output_token_ids):
            count = r.output_token_ids.count(t)
            out[b, t] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_follow_the_formulas():
    logits = random_logits(4)
    rows = [
        row(prompt=[1, 2, 2, 7], output=[2, 3, 3, 3], repetition_penalty=1.3),
        row(prompt=[5, 6], output=[6, 8, 8, 9], frequency_penalty=0.5, presence_penalty=0.25),
        row(prompt=[0], output=[1], temperature=0.0),
        row(
            prompt=[4, 4],
            output=[4, 10, 10],
            repetition_penalty=0.8,
            frequency_penalty=-1.0,
            presence_penalty=2,
        ),
    ]
    processed = sampler_module.apply_penalties(logits, rows)
    torch.testing.assert_close(processed, reference_penalties(logits, rows), rtol=0, atol=1e-6)
    assert not torch.equal(processed, logits)
    torch.testing.assert_close(processed[2], logits[2], rtol=0, atol=0)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, -1.0]])
    assert Sampler()(logits, [row(output=[0], temperature=0.0)]).token_ids == [0]
    assert Sampler()(logits, [row(output=[0], temperature=0.0, repetition_penalty=1.5)]).token_ids == [1]
    # The prompt counts for repetition_penalty but not for presence_penalty.
    assert Sampler()(logits, [row(prompt=[0], temperature=0.0, repetition_penalty=1.5)]).token_ids == [1]
    assert Sampler()(logits, [row(prompt=[0], temperature=0.0, presence_penalty=1.0)]).token_ids == [0]


def test_penalties_reject_out_of_vocab_tokens():
    with pytest.raises(ValueError, match="token ids"):
        Sampler()(random_logits(1), [row(prompt=[V], repetition_penalty=1.2)])


@pytest.mark.parametrize("repetition_penalty", [1e-320, 1e-40, 1e-30, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 2e-5, 1.0])
def test_extreme_penalties_never_draw_outside_the_vocabulary(repetition_penalty, temperature):
    # In float32 these penalties round to 0 or inf, or overflow the logits they divide: +inf and NaN logits.
    logits = random_logits(1)
    seen = [int(t) for t in logits[0].topk(3).indices] + [int(logits[0].argmin())]
    params = {"repetition_penalty": repetition_penalty, "temperature": temperature}
    tokens = draw_many(logits[0], 200, prompt=seen, **params)
    assert all(0 <= t < V for t in tokens)
    if repetition_penalty < 1:  # the seen tokens with a positive logit outweigh everything else
        assert set(tokens) <= {t for t in seen if logits[0, t] > 0}


def test_a_row_with_every_token_masked_still_draws_a_token():
    # min_tokens with every id a stop id masks the whole row: it falls back to the raw logits.
    logits = random_logits(2)
    rows = [row(min_tokens=2, stop_token_ids=list(range(V))), row(temperature=0.0, min_tokens=2)]
    result = Sampler(seed=0)(logits, rows)
    assert 0 <= result.token_ids[0] < V
    assert result.token_ids[1] == int(logits[1].argmax())


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # eos
    logits[0, 9] = 9.0  # a user stop id
    logits[0, 3] = 8.0

    def pick(output: list[int]) -> int:
        r = row(output=output, temperature=0.0, min_tokens=3, stop_token_ids=[7, 9, V + 100])
        return Sampler()(logits, [r]).token_ids[0]

    assert pick([]) == 3
    assert pick([1, 2]) == 3
    assert pick([1, 2, 3]) == 7


def test_min_tokens_masking_holds_when_sampling():
    logits = torch.zeros(1, 4)
    tokens = draw_many(logits[0], 2000, min_tokens=1, stop_token_ids=[0, 2])
    assert set(tokens) == {1, 3}


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_of_raw_logits_and_include_the_sampled_token():
    logits = random_logits(6)
    rows = [
        row(logprobs=3, temperature=0.5, presence_penalty=1.5, output=[int(logits[0].argmax())]),
        row(logprobs=0),
        row(),
        row(logprobs=5, temperature=0.0),
        row(logprobs=20, top_k=3),
        row(logprobs=2, top_p=0.5, min_p=0.1),
    ]
    result = Sampler(seed=0)(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert result.logprobs[2] is None and result.ranks[2] is None
    for b, r in enumerate(rows):
        if r.params.logprobs is None:
            continue
        n, token, entry = r.params.logprobs, result.token_ids[b], result.logprobs[b]
        top_lps, top_ids = raw[b].topk(n)
        assert list(entry)[:n] == top_ids.tolist()
        assert list(entry.values())[:n] == sorted(list(entry.values())[:n], reverse=True)
        assert token in entry
        assert len(entry) == n + (token not in top_ids.tolist())
        for t, lp in entry.items():
            assert lp == pytest.approx(raw[b, t].item(), abs=1e-5)
        assert result.ranks[b] == int((raw[b] >= raw[b, token]).sum())
    assert list(result.logprobs[1]) == [result.token_ids[1]]
    assert result.ranks[3] == 1


def test_compute_logprobs_in_chunks_matches_one_pass(monkeypatch):
    logits = random_logits(37).to(torch.bfloat16)
    token_ids = torch.randint(0, V, (37,), generator=seeded(3))
    whole = compute_logprobs(logits, token_ids, 4)
    monkeypatch.setattr(sampler_module, "_LOGPROB_CHUNK_ELEMENTS", 5 * V)
    chunked = compute_logprobs(logits, token_ids, 4)
    for a, b in zip(vars(whole).values(), vars(chunked).values(), strict=True):
        assert torch.equal(a, b)
    raw = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(whole.logprobs, raw.gather(1, token_ids[:, None]).squeeze(1))
    assert whole.top_ids.shape == (37, 4)
    assert compute_logprobs(logits[:0], token_ids[:0], 4).top_ids.shape == (0, 4)


def test_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="logits"):
        Sampler()(random_logits(3), [row(), row()])


def test_penalties_count_tokens_still_in_flight_as_the_host_list_would():
    """Async scheduling: a row's newest token may still be on the device (InFlight). The penalties must
    give exactly the logits they give with that token at the end of output_token_ids: repetition over
    prompt + output, presence and frequency over output (the dense, sync-free counting), a token seen
    before or new, rows without one in flight, and a logit_bias row beside them."""
    from duoserve.engine.sampler import InFlight, apply_penalties

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(5, V, generator=gen) * 3
    full = [
        row([1, 2, 3], [4, 5, 4, 9], repetition_penalty=1.3, temperature=1.0),  # 9 is new in flight
        row([6], [7, 7, 8, 7], presence_penalty=0.5, frequency_penalty=0.25, temperature=1.0),  # 7 again
        row(
            [], [10, 11], frequency_penalty=-0.4, repetition_penalty=0.8, temperature=1.0
        ),  # no token in flight
        row([12], [13, 14], temperature=1.0, logit_bias={3: 2.0, 14: -1.0}),
        row([], [20], presence_penalty=1.5, temperature=1.0),  # its first output token, in flight
    ]
    in_flight_rows = [0, 1, 4]
    host = [
        SamplingRow(
            r.params,
            r.prompt_token_ids,
            r.output_token_ids[:-1] if i in in_flight_rows else r.output_token_ids,
            None,
            [],
        )
        for i, r in enumerate(full)
    ]
    tokens = torch.tensor([full[i].output_token_ids[-1] for i in in_flight_rows])
    want = apply_penalties(logits, full)
    got = apply_penalties(logits, host, InFlight(in_flight_rows, tokens))
    assert torch.equal(got, want)
    assert not torch.equal(apply_penalties(logits, host), want)  # the in-flight tokens mattered
    # One in-flight row alone (a subset of the tokens picked), and one that is not penalised (ignored).
    only = InFlight([4], tokens[2:])
    host_4 = host[:4] + [full[4]]
    assert torch.equal(apply_penalties(logits, [full[0], full[1], full[2], full[3], host[4]], only), want)
    assert torch.equal(
        apply_penalties(logits, host_4, InFlight([3], torch.tensor([5]))), apply_penalties(logits, host_4)
    )
