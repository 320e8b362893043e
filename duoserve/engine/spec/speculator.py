"""Which requests speculate, how many drafts each gets, back-off, and the spec_decode counters.

Before each step the engine asks for drafts for its decoding requests; the scheduler then takes
what fits the token budget and the KV cache, and after verification the engine reports how many
drafts each request had accepted.

Back-off, so that speculation does not make decoding slower than plain decoding:
- per batch: with more than `speculative_max_num_seqs` requests decoding, a step is no longer bound
  by reading the weights (the forward pass of B * (1 + k) tokens costs more than that of B), so
  nobody speculates. Below that, the decode tokens per second of pure decode steps are measured per
  batch size, with and without drafts; where drafting is slower (e.g. when the verification's extra
  rows push a 4-bit-kernel step onto the dense GEMM), unseeded requests stop speculating at that
  batch size, re-checking once every _RECHECK_EVERY steps;
- per request: its number of drafts starts at 1 and doubles, up to --num-speculative-tokens, each
  time all of them are accepted. It pauses for a few steps (doubling on each consecutive failure, up
  to _MAX_PAUSE), then probes again with a single draft, when speculating does not pay: when the
  moving average a of its acceptance rate is under `speculative_min_acceptance`, or when the tokens
  a verification of k drafts is expected to emit, 1 + a + ... + a^k, do not beat its cost in plain
  decode steps, 1 + k * c, where c is the measured time of proposing one draft token (a draft
  model's forward pass; next to nothing for n-gram lookup) over that of the target's step. So a
  draft model that is slow for what it gets accepted stops being used, and a request whose drafts
  keep failing costs one proposal and one verified draft every few dozen steps. The acceptance rate
  of all verifications so far is the prior of a request about to probe (a new one, or one whose
  pause is over): while speculating does not pay at it and proposals are not cheap (a draft model's
  catch-up on the tokens since its last probe is a prefill), only one probe in _PROBE_EVERY goes
  ahead, keeping that record current; the others pause for the longest pause. Seeded requests back
  off on their own acceptance alone: their tokens (which depend on when they speculate) never
  depend on timing or on other requests.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from duoserve.config import EngineConfig
from duoserve.engine.request import Request
from duoserve.engine.spec.proposer import Proposer

_MIN_PAUSE = 2
_MAX_PAUSE = 64
_EMA_WEIGHT = 0.5  # of the latest step's acceptance rate
_COST_EMA_WEIGHT = 0.2  # of the latest step's proposal cost
_PRIOR_EMA_WEIGHT = 0.2  # of the latest verification's acceptance rate, in the prior of new requests
_PROBE_EVERY = 8
_CHEAP = 0.05  # proposal cost per position, in target steps, under which probing is always allowed
_RATE_EMA_WEIGHT = 0.3  # of the latest pure decode step's tokens per second
_RECHECK_EVERY = 16  # steps at a batch size where drafting did not pay before it is tried again


@dataclass
class SpecStats:
    """Cumulative counters, as vLLM's spec_decode_* metrics."""

    num_drafts: int = 0  # verification steps of one request with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [j]: how often draft j was accepted

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafts:
            self.accepted_per_pos.extend([0] * (num_drafts - len(self.accepted_per_pos)))
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1


@dataclass
class _Backoff:
    acceptance: float = 1.0  # EMA of the fraction of drafts accepted; optimistic at the start
    num_drafts: int = 1  # drafts to ask for next time
    pause: int = 0  # steps left without speculating
    next_pause: int = _MIN_PAUSE
    probing: bool = True  # the next verification decides whether the request keeps speculating


@dataclass
class _BatchRate:
    """Decode tokens per second of pure decode steps at one batch size (EMA), with and without drafts."""

    plain: float | None = None
    speculative: float | None = None
    steps_since_check: int = 0

    def drafting_pays(self) -> bool:
        if self.speculative is None:
            return True  # not measured yet: try
        if self.plain is None:
            return False  # measure one plain step to compare with
        if self.speculative >= self.plain:
            return True
        self.steps_since_check += 1
        if self.steps_since_check >= _RECHECK_EVERY:  # acceptance may have changed since
            self.steps_since_check = 0
            return True
        return False

    def observe(self, speculated: bool, rate: float) -> None:
        old = self.speculative if speculated else self.plain
        new = rate if old is None else old + _RATE_EMA_WEIGHT * (rate - old)
        if speculated:
            self.speculative = new
        else:
            self.plain = new


class Speculator:
    def __init__(self, config: EngineConfig, proposer: Proposer, max_model_len: int) -> None:
        self.proposer = proposer
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_num_seqs = config.speculative_max_num_seqs
        self.min_acceptance = config.speculative_min_acceptance
        self.rate_backoff = config.speculative_rate_backoff
        self.max_model_len = max_model_len
        self.stats = SpecStats()
        self._backoff: dict[str, _Backoff] = {}
        self.acceptance_prior = 1.0  # EMA of the acceptance rate over every request's verifications
        self._num_unpromising = 0  # probes due while the prior said speculation does not pay
        # Proposal time per draft position over the target's step time (EMA), and this step's proposal.
        self.draft_cost: float | None = None  # unknown until the first proposal is priced
        self._proposal: tuple[float, int] | None = None  # (seconds, most drafts asked of one request)
        self._rates: dict[int, _BatchRate] = {}  # by number of decoding requests
        self._step: tuple[_BatchRate, bool] | None = None  # this step's batch size, and whether it drafts

    def propose(self, running: Sequence[Request]) -> None:
        """Set draft_token_ids of the decoding requests that speculate this step (and clear the others':
        drafts the scheduler could not take last step are stale)."""
        for request in running:
            request.draft_token_ids = []
        decoding = [r for r in running if r.is_decoding]
        self._step = None
        if not decoding or len(decoding) > self.max_num_seqs:
            return
        rate = self._rates.setdefault(len(decoding), _BatchRate())
        batch_pays = rate.drafting_pays() if self.rate_backoff else True
        chosen, budgets = [], []
        for request in decoding:
            # Seeded requests' tokens depend on when they speculate: never on measured times.
            if not batch_pays and request.params.seed is None:
                continue
            k = self._num_drafts(request)
            if k > 0:
                chosen.append(request)
                budgets.append(k)
        proposals = []
        if chosen:
            start = time.perf_counter()
            proposals = self.proposer.propose(chosen, budgets)
            self._proposal = (time.perf_counter() - start, max(budgets))
            for request, drafts in zip(chosen, proposals, strict=True):
                request.draft_token_ids = drafts
        self._step = (rate, any(proposals))

    def observe_step(self, forward_seconds: float, num_decode_tokens: int | None) -> None:
        """The step just run: the target's forward time prices this step's proposal; for a pure decode
        step (`num_decode_tokens`: the tokens it emitted; None when it prefilled too), its tokens per
        second go into its batch size's record."""
        proposal, self._proposal = self._proposal, None
        step, self._step = self._step, None
        if forward_seconds <= 0:
            return
        if step is not None and num_decode_tokens is not None:
            rate, speculated = step
            seconds = forward_seconds + (proposal[0] if proposal else 0.0)
            rate.observe(speculated, num_decode_tokens / seconds)
        if proposal is None:
            return
        seconds, num_positions = proposal
        # A draft is no bigger than the target: a position costing more than a target step is the
        # draft catching up on a prompt, not what the next positions will cost.
        cost = min(seconds / num_positions / forward_seconds, 1.0)
        if self.draft_cost is None:
            self.draft_cost = cost
        self.draft_cost += _COST_EMA_WEIGHT * (cost - self.draft_cost)

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """One verification of `num_drafts` drafts of which the first `num_accepted` were accepted."""
        self.stats.record(num_drafts, num_accepted)
        rate = num_accepted / num_drafts
        self.acceptance_prior += _PRIOR_EMA_WEIGHT * (rate - self.acceptance_prior)
        state = self._backoff[request.request_id]
        state.acceptance += _EMA_WEIGHT * (rate - state.acceptance)
        if num_accepted == num_drafts:
            state.num_drafts = min(2 * state.num_drafts, self.num_speculative_tokens)
        state.probing = not self._pays(state.acceptance, num_drafts, priced=request.params.seed is None)
        if not state.probing:
            state.next_pause = _MIN_PAUSE
            return
        state.pause = state.next_pause
        state.next_pause = min(2 * state.next_pause, _MAX_PAUSE)
        # The probe after the pause (one draft) decides alone whether the request speculates again.
        state.num_drafts = 1
        state.acceptance = self.min_acceptance

    def _pays(self, acceptance: float, num_drafts: int, priced: bool) -> bool:
        if acceptance < self.min_acceptance:
            return False
        expected_tokens = sum(acceptance**j for j in range(num_drafts + 1))
        return not priced or expected_tokens > 1 + num_drafts * (self.draft_cost or 0.0)

    def _num_drafts(self, request: Request) -> int:
        """How many drafts the request may verify now: 0 when it cannot or should not speculate."""
        if request.params.logprobs is not None:
            return 0  # verification does not compute logprobs: this request decodes normally
        state = self._backoff.setdefault(request.request_id, _Backoff())
        if state.pause > 0:
            state.pause -= 1
            return 0
        if state.probing and not self._may_probe(request):
            state.pause = _MAX_PAUSE
            return 0
        # Room for the drafts and the token the target adds, within max_tokens and the context.
        room = min(
            request.max_tokens - len(request.output_token_ids), self.max_model_len - request.num_tokens
        )
        return min(state.num_drafts, room - 1)

    def _may_probe(self, request: Request) -> bool:
        if request.params.seed is not None or (self.draft_cost or 0.0) < _CHEAP:
            return True
        if self._pays(self.acceptance_prior, 1, priced=True):
            return True
        self._num_unpromising += 1
        return self._num_unpromising % _PROBE_EVERY == 0

    def retain(self, live_request_ids: Collection[str]) -> None:
        """Forget the requests that are gone (and free their draft KV)."""
        for request_id in [r for r in self._backoff if r not in live_request_ids]:
            del self._backoff[request_id]
        self.proposer.retain(live_request_ids)
