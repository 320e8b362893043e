"""Grammar-constrained decoding on the engine's batch: llguidance token masks applied before sampling.

Only requests with `params.structured_outputs` have a matcher, and a step in which none samples costs
nothing here. When a request may stop (its grammar accepts), every one of its stop tokens is allowed, not
only the tokenizer's eos, so the model ends the structure with whichever end-of-turn token it prefers;
until then none is, so a request that stops for a stop token always completes its structure (max_tokens
can still cut it: finish_reason `length`).

Sampling first (`sample_first`, on by default), as llama.cpp's sampler does with its grammars: a row
whose token the mask cannot change except by refusing it (greedy, or a plain temperature draw:
`_sample_first_exact`) is sampled without its mask, and the token checked against the grammar; only a
refused token (or a stop token, which the mask must decide) gets the row masked and sampled again. That
gives the row exactly the masked row's token when greedy, and a draw from the masked distribution when
not (rejection sampling). The check is llguidance's validation, which agrees with its mask token for
token except where the grammar forces bytes (there the mask keeps only their canonical tokens): such
rows are masked first (`_checks_sampled`). A mask costs ~50 µs of llguidance's time a row, a check
~2 µs, and SmolLM2 writing a JSON schema picks an allowed token itself for most rows, so most masks are
never computed (BENCHMARKS.md). Top-k/top-p/min-p rows, rows asking for logprobs and rows verifying
drafts are masked first.

Where the masks are computed depends on the host (`overlap_masks`):
- a spare core (usable physical cores > the forward's torch threads), or an accelerator running the
  forward: on a worker thread started before the forward pass, the batch filled by llguidance's
  executor on the spare cores (its batch API; it drops the GIL, as torch does in its kernels), so the
  two overlap;
- no spare core (e.g. 2 cores, 2 torch threads): on the engine thread once the forward has returned,
  one matcher after another, with no thread pool at all. Every core already runs one of the forward's
  OpenMP threads, and a mask thread plus llguidance's executor thread make runnable threads outnumber
  cores: whichever OpenMP thread is descheduled stalls every barrier of the forward. Measured on a 2-core
  Zen 1 at batch 32 (BENCHMARKS.md): overlapping cost 8.9% of throughput, 53 ms more process CPU per
  546 ms step, of which the masks' own work was about 7 ms (llguidance's fill of 32 masks about 4 ms
  of CPU, the same one by one on the calling thread as on a one-thread executor; applying them about
  3 ms) and the rest that contention. Filled after the forward, the masks' work is all the cost: it
  adds to the step (about 6 ms with the cheaper apply below, 2-3% of that step's 275 ms wall time;
  to confirm on a quiet machine), and nothing competes with the forward.

The per-step work is kept to the masks themselves: one bitmask buffer [rows, ceil(V / 32)] int32
allocated once (grown when a step has more rows), filled in place (a matcher whose grammar has stopped
gets the stopped mask copied, not recomputed), then applied to each run of consecutive constrained rows
of the logits with one branch-free op: the packed rows expanded by a byte -> 8 floats table (+inf where
a token is allowed, -inf where not) into a reused float32 buffer, and `torch.minimum` of the logits
with it, in place. Measured on that host while other jobs loaded it (one thread, 32 real JSON-schema
masks of SmolLM2's 49,152 tokens; ratios): expansion 1.1 ms + minimum 1.3 ms, against 0.4 ms unpacking
to bools + 4-5 ms for `masked_fill_` (whose per-element branch mispredicts on real masks) before;
listing the allowed or forbidden positions instead cost more (5-9 ms to list them in numpy; real masks
scatter their allowed tokens over a third of the words). A forbidden token ends at -inf whatever its
logit, +inf included (an additive -inf bias would make that NaN).
The mask thread never calls torch: a torch op over more than 32k elements from a new thread starts a
second OpenMP team there, whose threads spin ~9 ms after each op (GNU OpenMP's default) on the cores
the forward pass is using.

A matcher follows its request's output rather than being told of each token: before computing a mask it
consumes the tokens appended since the last one (sampled here, accepted drafts, or the first token a
prefill worker sent with the KV), so it does not depend on where the engine appends them.

Beside the forward, the sampled-first rows' masks are computed too (they cost no step time there) and
their tokens checked against the bits; after it, only the refused rows' masks are computed. The two
places make the same decisions, so outputs do not depend on the host.

Speculative decoding: a request verifying k drafts gets the mask after each draft, for its 1 + k rows.
The matcher consumes the drafts the grammar accepts to compute those masks, then rolls them back; rows
past a refused draft are unreachable (the refused draft itself is masked out, so rejected) and keep the
last mask. Verification then only ever accepts drafts the grammar allows.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy
import numpy as np
import torch

from duoserve.grammar import build_grammar
from duoserve.hardware import detect_cpu

if TYPE_CHECKING:
    from duoserve.engine.request import Request
    from duoserve.engine.scheduler import ScheduledRequest
    from duoserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Compiled grammars kept to copy matchers from (n sequences, repeated schemas and tools compile once).
_MAX_CACHED_GRAMMARS = 64

# The most threads llguidance's executor computes one step's masks on (a mask is ~0.1-0.3 ms).
_MAX_MASK_THREADS = 8

# Byte value -> its 8 bits as caps on the logits, little-endian: +inf where the bit is 1 (the token is
# allowed), -inf where it is 0. A bitmask row's bytes through this table are its [32 * words] caps.
_CAP_OF_BYTE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1, np.inf, -np.inf
).astype(np.float32)

# The most bytes of caps expanded at once (rows beyond are applied in chunks): a batch-32 step of a
# 49k vocabulary fits (6 MiB), a speculative step of hundreds of rows does not need hundreds of MiB.
_MAX_CAP_BYTES = 16 << 20


def _sample_first_exact(params: SamplingParams) -> bool:
    """Whether a row sampled without its mask, kept when the grammar takes its token and else masked
    and sampled again, gets the masked row's token: greedy (the best token, if allowed, is the best
    allowed one), or a plain temperature draw (rejection sampling: a token drawn from p, kept when
    allowed, else drawn again from the masked p, is drawn from the masked p). Penalties and logit_bias
    change each token's logit alone, so they keep this. Not with top-k, top-p or min-p (their cut-off
    depends on which tokens are masked) nor with logprobs (those of the masked logits)."""
    return params.logprobs is None and (
        params.greedy or (params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0)
    )


def overlap_masks(cores: int, forward_threads: int) -> bool:
    """Whether a CPU forward leaves a core for computing masks beside it: more usable physical cores
    than the forward's torch threads. Else the masks are computed after the forward (module docstring)."""
    return cores > forward_threads


@dataclass
class GrammarState:
    """A constrained request's matcher (Request.grammar; written only by the masks' computation)."""

    matcher: llguidance.LLMatcher | None  # None: the grammar could not be built; the request may only end
    num_consumed: int = 0  # output tokens the matcher has consumed
    reported: bool = False  # its error was logged


@dataclass
class MaskStats:
    """Where constrained decoding's time goes (benchmarks/structured_outputs.py prints it per step)."""

    steps: int = 0  # steps with a constrained row (written by the fill, as the fill_ fields)
    serial_steps: int = 0  # of them, those whose masks were filled on the engine thread after the forward
    fill_cpu_s: float = 0.0  # the filling thread's CPU time (matchers, masks, stop tokens)
    fill_wall_s: float = 0.0  # its wall time (includes masks computed on llguidance's executor threads)
    apply_cpu_s: float = 0.0  # the engine thread's CPU time applying masks (written by `apply`)
    wait_s: float = 0.0  # the engine thread's wait for masks filled on the mask thread (by `apply`)
    sampled_first_rows: int = 0  # rows sampled unmasked, then checked (written by `check`)
    refused_rows: int = 0  # of them, those whose token the grammar refused: masked and sampled again


@dataclass
class _Job:
    request: Request
    row: int  # its first row among the step's sampled logits
    new_tokens: list[int]  # output tokens since the matcher's last step
    drafts: list[int]
    sample_first: bool  # its row may be sampled unmasked, then checked (`_sample_first_exact`)
    index: int = 0  # its first row in the step's bitmask

    @property
    def num_rows(self) -> int:
        return 1 + len(self.drafts)


@dataclass
class _Filled:
    """A step's computed masks: a view of StructuredOutputs' buffer, valid until the next step starts."""

    bitmask: np.ndarray  # [rows, words] int32: bit t % 32 of word t // 32 set where token t is allowed
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (first logits row, first mask row, rows)
    unmasked: list[_Job] = field(default_factory=list)  # rows left unmasked, sampled first (`check`)
    unmasked_filled: bool = False  # their masks are in `bitmask` too (at job.index), not in `runs`


class CapBuffer:
    """The float32 rows that `apply_bitmask` expands bitmask rows into: reused, grown to at most
    _MAX_CAP_BYTES (used only by the engine thread)."""

    def __init__(self, words: int) -> None:
        self.max_rows = max(1, _MAX_CAP_BYTES // (4 * 32 * words))
        self._rows = np.zeros((0, 32 * words), dtype=np.float32)

    def rows(self, num_rows: int) -> np.ndarray:
        """The first num_rows (<= max_rows) rows (grown to the next power of two when short)."""
        if self._rows.shape[0] < num_rows:
            capacity = min(self.max_rows, 1 << (num_rows - 1).bit_length())
            self._rows = np.zeros((capacity, self._rows.shape[1]), dtype=np.float32)
        return self._rows[:num_rows]


@functools.cache
def _bitmask_op() -> bool:
    """The C++ op (engine/csrc/token_bitmask_cpu.cpp) where the CPU kernels build: it writes only the
    forbidden logits. The apply of 32 rows of 49,152 tokens took 0.57 ms a step through the caps path
    below (the fallback), 0.29 ms with it (Zen 5, 2 cores)."""
    from duoserve.cpu_kernels import cpu_kernels_available

    return cpu_kernels_available()


def apply_bitmask(
    logits: torch.Tensor, bitmask: np.ndarray, runs: list[tuple[int, int, int]], caps: CapBuffer
) -> None:
    """-inf written in place where the bitmask forbids a token, for CPU logits [rows, V]: per run of rows,
    the packed rows expanded to +inf/-inf caps (one numpy table lookup) and the logits capped by them
    (one vectorised torch op, no branch per element)."""
    if logits.dtype in (torch.float32, torch.bfloat16) and logits.stride(-1) == 1 and _bitmask_op():
        words = torch.from_numpy(bitmask)
        for logits_row, mask_row, num_rows in runs:
            torch.ops.duoserve_cpu.apply_token_bitmask(logits, words, logits_row, mask_row, num_rows)
        return
    vocab = logits.shape[1]
    for logits_row, mask_row, num_rows in runs:
        for start in range(0, num_rows, caps.max_rows):
            count = min(caps.max_rows, num_rows - start)
            cap = caps.rows(count)
            packed = bitmask[mask_row + start : mask_row + start + count].view(np.uint8)
            np.take(_CAP_OF_BYTE, packed, axis=0, out=cap.reshape(count, -1, 8), mode="clip")
            target = logits[logits_row + start : logits_row + start + count]
            torch.minimum(target, torch.from_numpy(cap)[:, :vocab], out=target)


class GrammarMasks:
    """The masks of one step (being computed on the mask thread, or to compute): `apply` writes them into
    the logits before sampling, and `check` masks the rows sampled first whose token the grammar refuses."""

    def __init__(
        self,
        masks: Callable[[], _Filled],
        refused: Callable[[_Filled, list[_Job], dict[int, int]], _Filled | None],
        overlapped: bool,
        caps: CapBuffer | None,
        stats: MaskStats,
    ) -> None:
        self._masks = masks
        self._refused = refused  # the masks of the sampled-first rows whose token is refused (None: none)
        self._overlapped = overlapped  # masks() waits for the mask thread (else it computes them)
        self._caps = caps  # None: the logits are on an accelerator
        self._stats = stats
        self._filled: _Filled | None = None  # what `apply` applied (written by it)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits [rows, V], -inf written in place where the grammars forbid a token (except in the
        rows to sample first)."""
        start = time.perf_counter()
        filled = self._masks()
        if self._overlapped:
            self._stats.wait_s += time.perf_counter() - start
        self._filled = filled
        self._write(logits, filled)
        return logits

    def check(self, logits: torch.Tensor, sampled: dict[int, int]) -> list[int]:
        """The rows sampled first (of `sampled`: logits row -> its token) whose token the grammar refuses:
        their masks written into `logits`, to sample them again (the other rows keep their token)."""
        jobs = [job for job in self._filled.unmasked if job.row in sampled] if self._filled else []
        if not jobs:
            return []
        filled = self._refused(self._filled, jobs, sampled)
        if filled is None:
            return []
        self._write(logits, filled)
        return [row for first, _, count in filled.runs for row in range(first, first + count)]

    def _write(self, logits: torch.Tensor, filled: _Filled) -> None:
        if not filled.runs:
            return
        cpu = time.thread_time()
        # Inference mode: the model's logits are inference tensors, written in place only there.
        with torch.inference_mode():
            if self._caps is not None:
                apply_bitmask(logits, filled.bitmask, filled.runs, self._caps)
            else:  # ship 32x fewer bytes and unpack on the device
                forbidden = unpack_forbidden(torch.from_numpy(filled.bitmask).to(logits.device))
                for logits_row, mask_row, num_rows in filled.runs:
                    logits[logits_row : logits_row + num_rows].masked_fill_(
                        forbidden[mask_row : mask_row + num_rows, : logits.shape[1]], -float("inf")
                    )
        self._stats.apply_cpu_s += time.thread_time() - cpu


def unpack_forbidden(bitmask: torch.Tensor) -> torch.Tensor:
    """[rows, words] int32 bitmask -> [rows, 32 * words] bool, True where the token is forbidden (torch
    ops, for a bitmask on an accelerator; CPU logits are capped by `apply_bitmask`)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return (((bitmask[:, :, None] >> shifts) & 1) == 0).flatten(1)


class StructuredOutputs:
    """The engine's grammars and masks. The tokenizer's tables are built when the first constrained request
    is added (about a second for a 49k vocabulary, once), so an engine that serves none pays nothing."""

    def __init__(
        self,
        tokenizer_source: str,
        vocab_size: int,
        eos_token_ids: list[int],
        logits_on_host: bool = True,
        overlap: bool | None = None,
    ) -> None:
        self._source = tokenizer_source
        self.vocab_size = vocab_size
        self._model_eos_ids = eos_token_ids
        # Where the masks are computed: None decides per step from the host (`overlap_masks`); True or
        # False forces it (an accelerator's forward leaves the CPU free: True; tests and benchmarks).
        self.overlap = overlap
        # Rows that can be are sampled before their mask, which is computed only when the grammar refuses
        # the token (`_sample_first_exact`, `_checks_sampled`); False masks every row first (tests,
        # benchmarks).
        self.sample_first = True
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None  # why the tokenizer cannot drive a grammar
        self._eos_ids: list[int] = []  # what the tokenizer and the model call eos: llguidance's end tokens
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._thread: ThreadPoolExecutor | None = None  # the mask thread (overlapped steps only)
        self._executor: llguidance.LLExecutor | None = None  # llguidance's own pool, for batched masks
        self.stats = MaskStats()
        # Reused every step (written by the fill, read by `apply` before the next step starts).
        self._words = -(-vocab_size // 32)
        self._bitmask = np.zeros((0, self._words), dtype=np.int32)
        self._stopped_row: np.ndarray | None = None  # a stopped matcher's mask (its eos tokens)
        # CPU logits are capped with rows expanded here; an accelerator's unpack the bitmask there.
        self._caps = CapBuffer(self._words) if logits_on_host else None

    def check(self, params: SamplingParams) -> None:
        """Before a constrained request is admitted: the tokenizer's tables are built (once, on the first
        such request), or ValueError when this model's tokenizer cannot drive a grammar."""
        if params.structured_outputs is None or self._tokenizer is not None:
            return
        if self._tokenizer_error is None:
            try:
                self._tokenizer = self._build_tokenizer()
                return
            except Exception as err:  # whatever llguidance says of this tokenizer
                self._tokenizer_error = f"{type(err).__name__}: {err}"
        raise ValueError(
            f"structured_outputs: this model's tokenizer cannot drive a grammar ({self._tokenizer_error})"
        )

    def overlaps(self) -> bool:
        """Whether this step's masks are computed while the forward runs (else after it)."""
        if self.overlap is not None:
            return self.overlap
        return overlap_masks(detect_cpu().cores, torch.get_num_threads())

    def start(self, sampling: list[ScheduledRequest]) -> GrammarMasks | None:
        """The masks of this step's sampled rows (None: no request is constrained): started on the mask
        thread where the masks overlap the forward, else computed when `apply` is called.

        Rows are laid out as the engine samples them: per request in `sampling` order, 1 + its drafts.
        """
        jobs, row = [], 0
        for s in sampling:
            request = s.request
            if request.params.structured_outputs is not None:
                consumed = request.grammar.num_consumed if request.grammar is not None else 0
                drafts = list(s.draft_token_ids)
                first = self.sample_first and not drafts and _sample_first_exact(request.params)
                jobs.append(_Job(request, row, request.output_token_ids[consumed:], drafts, first))
            row += 1 + len(s.draft_token_ids)
        if not jobs:
            return None
        if not self.overlaps():
            masks = functools.partial(self._masks, jobs, None)
            return GrammarMasks(masks, self._refused, False, self._caps, self.stats)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="duoserve-grammar")
            self._executor = llguidance.LLExecutor(_mask_threads())
        future = self._thread.submit(self._masks, jobs, self._executor)
        return GrammarMasks(future.result, self._refused, True, self._caps, self.stats)

    # ---------------------------------------------------------------- filling (mask thread or engine thread)

    def _masks(self, jobs: list[_Job], executor: llguidance.LLExecutor | None) -> _Filled:
        """The step's bitmask, but for the rows to sample first (a matcher that can tell a token's fate
        without its mask); `executor` batches the matchers' work on its pool (None: one by one here)."""
        cpu, wall = time.thread_time(), time.perf_counter()
        self._advance(jobs, executor)
        unmasked, masked = [], []
        for job in jobs:
            (unmasked if job.sample_first and self._checks_sampled(job) else masked).append(job)
        # Beside the forward, the sampled-first rows' masks cost no step time: computed too (after the
        # others in the bitmask), so that `check` reads their bits instead of asking the matchers.
        filled = self._fill_rows(masked + unmasked if executor is not None else masked, executor)
        if executor is not None:  # the sampled-first rows' masks are kept for `check`, not applied
            filled.runs = _runs(masked)
        filled.unmasked, filled.unmasked_filled = unmasked, executor is not None
        self.stats.steps += 1
        self.stats.serial_steps += executor is None
        self.stats.fill_cpu_s += time.thread_time() - cpu
        self.stats.fill_wall_s += time.perf_counter() - wall
        return filled

    def _checks_sampled(self, job: _Job) -> bool:
        """Whether a token sampled without the mask can be checked against the grammar instead: the
        matcher runs (not stopped, not failed) and no bytes are forced. Where bytes are forced (a JSON
        key, a literal), llguidance's mask allows only their canonical tokens (`"city"`, not `"c"`)
        while validation accepts any token spelling them; elsewhere the two agree token for token (the
        test checks every token of a vocabulary at every state of real grammars). So checked rows get
        exactly the token the mask would have given them."""
        matcher = job.request.grammar.matcher
        try:
            return matcher is not None and not matcher.is_stopped() and not matcher.compute_ff_bytes()
        except Exception:  # masked, where a failing grammar is dealt with
            return False

    def _refused(self, step: _Filled, jobs: list[_Job], sampled: dict[int, int]) -> _Filled | None:
        """Of the rows sampled first, those whose token the grammar refuses, with their masks (None: it
        takes every token): read from the step's bitmask where it has them, else the matchers validate
        the tokens and the refused rows' masks are computed now. A stop token is refused whatever the
        grammar says, to be sampled again under the mask, which decides when a request may stop
        (`_allow_stop_tokens`)."""
        cpu, wall = time.thread_time(), time.perf_counter()
        refused = [job for job in jobs if not self._takes(step, job, sampled[job.row])]
        self.stats.sampled_first_rows += len(jobs)
        self.stats.refused_rows += len(refused)
        if not refused:
            filled = None
        elif step.unmasked_filled:
            filled = _Filled(step.bitmask, _runs(refused))
        else:
            filled = self._fill_rows(refused, None)
        self.stats.fill_cpu_s += time.thread_time() - cpu
        self.stats.fill_wall_s += time.perf_counter() - wall
        return filled

    def _takes(self, step: _Filled, job: _Job, token: int) -> bool:
        if token in self._eos_ids or token in job.request.stop_token_ids:
            return False
        if step.unmasked_filled:
            return bool((int(step.bitmask[job.index, token >> 5]) >> (token & 31)) & 1)
        try:
            return job.request.grammar.matcher.validate_tokens([token]) == 1
        except Exception:  # refused: its mask is computed where a failing grammar is dealt with
            return False

    def _fill_rows(self, jobs: list[_Job], executor: llguidance.LLExecutor | None) -> _Filled:
        """The masks of the jobs' rows, one after another in the reused bitmask (job.index), with the runs
        of logits rows they go to."""
        index = 0
        for job in jobs:
            job.index = index
            index += job.num_rows
        bitmask = self._bitmask_rows(index)
        self._fill([job for job in jobs if job.request.grammar.matcher is not None], bitmask, executor)
        for job in jobs:
            if job.request.grammar.matcher is None:
                self._only_stop(bitmask, job)
        self._allow_stop_tokens(bitmask, jobs)
        return _Filled(bitmask, _runs(jobs))

    def _bitmask_rows(self, num_rows: int) -> np.ndarray:
        """The first num_rows rows of the reused bitmask (grown to the next power of two when short)."""
        if self._bitmask.shape[0] < num_rows:
            capacity = 1 << (num_rows - 1).bit_length()
            self._bitmask = np.zeros((capacity, self._words), dtype=np.int32)
        return self._bitmask[:num_rows]

    def _advance(self, jobs: list[_Job], executor: llguidance.LLExecutor | None) -> None:
        """Each job's matcher made (on its first step) and fed the tokens output since its last mask. A
        failing grammar leaves its request with no matcher (its rows allow only its stop tokens)."""
        single = []
        for job in jobs:
            try:
                state = job.request.grammar
                if state is None:
                    state = job.request.grammar = GrammarState(self._matcher(job.request))
                if state.matcher is None:
                    continue
                if state.matcher.is_stopped() or not job.new_tokens:
                    pass
                elif len(job.new_tokens) == 1:
                    single.append(job)  # the usual case: one call for all of them below
                else:
                    state.matcher.consume_tokens(job.new_tokens)
                state.num_consumed += len(job.new_tokens)
            except Exception:  # one request's grammar must never take the engine down
                self._fail(job)
        if single:
            # A refused token leaves its matcher in an error state: reported, and it may only end.
            try:
                tokens = [(job.request.grammar.matcher, job.new_tokens[0]) for job in single]
                if executor is not None:
                    executor.consume_token_par(tokens)
                else:
                    for matcher, token in tokens:
                        matcher.consume_token(token)
            except Exception:
                for job in single:
                    self._fail(job)

    def _fill(self, jobs: list[_Job], bitmask: np.ndarray, executor: llguidance.LLExecutor | None) -> None:
        """The masks of the jobs' rows: stopped matchers' copied, the other plain ones computed in one
        batched call (or one by one without an executor), then those with drafts."""
        plain, drafted = [], []
        for job in jobs:
            if job.request.grammar.matcher.is_stopped():
                self._fill_stopped(job, bitmask)
            else:
                (drafted if job.drafts else plain).append(job)
        if plain:
            try:
                pairs = [(job.request.grammar.matcher, job.index) for job in plain]
                if executor is not None:
                    llguidance.numpy.fill_next_token_bitmask_par(executor, pairs, bitmask)
                else:
                    _fill_in_turn(pairs, bitmask)
                plain = []
            except Exception:  # one at a time below, so that only a failing request is cut
                pass
        for job in plain + drafted:
            self._fill_one(job, bitmask)
        for job in jobs:
            state = job.request.grammar
            if state.matcher is not None and state.matcher.is_error() and not state.reported:
                state.reported = True
                logger.warning(
                    "request %s: grammar error: %s", job.request.request_id, state.matcher.get_error()
                )

    def _fill_stopped(self, job: _Job, bitmask: np.ndarray) -> None:
        """A stopped matcher (its grammar complete, or in error) allows only eos, whatever its state: its
        rows get that mask, computed by llguidance once."""
        if self._stopped_row is None:
            row = np.zeros((1, self._words), dtype=np.int32)
            llguidance.numpy.fill_next_token_bitmask(job.request.grammar.matcher, row, 0)
            self._stopped_row = row[0]
        bitmask[job.index : job.index + job.num_rows] = self._stopped_row

    def _fill_one(self, job: _Job, bitmask: np.ndarray) -> None:
        try:
            self._fill_drafts(job, bitmask)
        except Exception:
            self._fail(job)
            self._only_stop(bitmask, job)

    def _fill_drafts(self, job: _Job, bitmask: np.ndarray) -> None:
        """The masks of a job's 1 + k rows: after its output, then after each draft the grammar accepts."""
        matcher, index = job.request.grammar.matcher, job.index
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, index)
        valid = matcher.validate_tokens(job.drafts) if job.drafts and not matcher.is_stopped() else 0
        for j in range(valid):
            matcher.consume_token(job.drafts[j])
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, index + 1 + j)
        if valid:
            matcher.rollback(valid)
        if valid < len(job.drafts):  # rows after a refused draft are never reached
            bitmask[index + 1 + valid : index + job.num_rows] = bitmask[index + valid]

    def _fail(self, job: _Job) -> None:
        logger.exception("request %s: its grammar failed; it may only end now", job.request.request_id)
        job.request.grammar = GrammarState(None, reported=True)

    def _matcher(self, request: Request) -> llguidance.LLMatcher:
        grammar = build_grammar(request.params.structured_outputs)
        template = self._compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            self._compiled[grammar] = template
            if len(self._compiled) > _MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return template.deep_copy()

    def _build_tokenizer(self) -> llguidance.LLTokenizer:
        from duoserve.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self._source)
        eos_ids = [*tokenizer.eos_token_ids, *self._model_eos_ids]
        self._eos_ids = [t for t in dict.fromkeys(eos_ids) if t < self.vocab_size] or [0]  # it needs one
        # From the tokenizer's JSON, as llguidance.hf does (which would import transformers).
        return llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self._eos_ids
        )

    def _only_stop(self, bitmask: np.ndarray, job: _Job) -> None:
        """The job's rows allow nothing (`_allow_stop_tokens` then allows its stop tokens)."""
        bitmask[job.index : job.index + job.num_rows] = 0

    def _allow_stop_tokens(self, bitmask: np.ndarray, jobs: list[_Job]) -> None:
        """Where an eos token is allowed, allow each of the request's stop tokens too; where nothing is
        allowed (a failed grammar's rows among them), allow only those: a row is never left with no token
        to sample. Which rows: one vectorised test; the few it finds are changed one by one."""
        words = bitmask.view(np.uint32)
        eos = np.asarray(self._eos_ids or [0], dtype=np.int64)
        eos_allowed = ((words[:, eos >> 5] >> (eos & 31).astype(np.uint32)) & 1).any(axis=1)
        open_rows = np.flatnonzero(eos_allowed | ~words.any(axis=1))
        if not len(open_rows):
            return
        owner = np.repeat(np.arange(len(jobs)), [job.num_rows for job in jobs])
        for row in open_rows.tolist():
            request = jobs[owner[row]].request
            stops = [t for t in request.stop_token_ids if t < self.vocab_size] or self._eos_ids[:1] or [0]
            for token in stops:
                words[row, token >> 5] |= np.uint32(1 << (token & 31))


def _runs(jobs: list[_Job]) -> list[tuple[int, int, int]]:
    """The jobs' (first logits row, first bitmask row, rows): one run while both are consecutive."""
    runs: list[tuple[int, int, int]] = []
    for job in jobs:
        last = runs[-1] if runs else None
        if last and last[0] + last[2] == job.row and last[1] + last[2] == job.index:
            runs[-1] = (last[0], last[1], last[2] + job.num_rows)
        else:
            runs.append((job.row, job.index, job.num_rows))
    return runs


def _fill_in_turn(pairs: list[tuple[llguidance.LLMatcher, int]], bitmask: np.ndarray) -> None:
    """Each matcher's mask into its row of the C-contiguous bitmask, one after another on this thread
    (llguidance.numpy.fill_next_token_bitmask without its per-call checks and views)."""
    assert bitmask.flags.c_contiguous and bitmask.dtype == np.int32  # raw pointers below
    base, row_bytes = bitmask.ctypes.data, bitmask.shape[1] * bitmask.itemsize
    for matcher, index in pairs:
        matcher.unsafe_compute_mask_ptr(base + index * row_bytes, row_bytes)


def _mask_threads() -> int:
    """Threads for llguidance's executor: the cores torch's threads leave free (overlapped steps run only
    where there is one; at least one all the same, for an accelerator's host or a forced overlap)."""
    free = detect_cpu().cores - torch.get_num_threads()
    return max(1, min(_MAX_MASK_THREADS, free))
