"""Whether loading a prefix from a tier beats computing it again, by speeds this worker measures.

Loading a block costs its bytes over the tier's read speed: bytes per second of the reading itself
(open, read and check on the I/O thread, then the copy into the cache; per-file costs included, the
wait in the I/O queue not, as a busy queue says nothing about the medium). Computing it again costs its
tokens over the prefill speed: tokens per second of the forward passes of steps of at least
MIN_PREFILL_SAMPLE_TOKENS tokens (smaller ones are decode steps, whose tokens cost far more each),
unless the engine gives a speed. A request's run of held blocks is cut where the rest would not pay:
the loaded prefix is the one that saves the most time. A decision to compute is only ever revised by a
new measurement, so after PROBE_EVERY runs declined in a row one is loaded anyway (a measurement taken
on a busy moment must not turn the tier off for good).

Priors, until a worker has measured its own (the first measurement replaces them):
  - disk 1 GB/s: a datacenter NVMe drive reads 2-7 GB/s sequentially, one file per block costs an
    open and a stat each, and a warm page cache reads far faster;
  - host RAM 8 GB/s: PCIe 4 copies from pageable memory (pinned ones reach ~25 GB/s);
  - prefill 4000 tokens/s: a 1B model on a server CPU, or a 70B one on one GPU.
Under them loading wins below 250 KB of KV per token from disk (2 MB from RAM): a Llama-3-8B in bfloat16
has 128 KB, SmolLM2-135M in float32 46 KB. Ignored: the step a load waits before its request is
scheduled, and attention's cost growing with the prefix (which only favours loading more).
"""

from __future__ import annotations

PRIOR_BYTES_PER_SECOND = {"cpu": 8e9, "disk": 1e9}
PRIOR_PREFILL_TOKENS_PER_SECOND = 4000.0
MIN_PREFILL_SAMPLE_TOKENS = 64
SMOOTHING = 0.3  # the weight of a new measurement in the moving average
PROBE_EVERY = 16


class LoadCostModel:
    def __init__(
        self, block_size: int, block_bytes: int, prefill_tokens_per_second: float | None = None
    ) -> None:
        """`prefill_tokens_per_second`: a known prefill speed, used instead of measuring it."""
        if prefill_tokens_per_second is not None and prefill_tokens_per_second <= 0:
            raise ValueError(f"prefill_tokens_per_second must be > 0, got {prefill_tokens_per_second}")
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.prefill_given = prefill_tokens_per_second is not None
        self.prefill_tokens_per_second = prefill_tokens_per_second or PRIOR_PREFILL_TOKENS_PER_SECOND
        self.bytes_per_second = dict(PRIOR_BYTES_PER_SECOND)
        self.measured: set[str] = set()  # "prefill" and the tiers measured so far
        self._declined_in_a_row = 0

    def observe_load(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.bytes_per_second[tier] = self._average(
                tier, self.bytes_per_second.get(tier), nbytes / seconds
            )

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One forward pass of `num_tokens` tokens took `seconds`."""
        if self.prefill_given or num_tokens < MIN_PREFILL_SAMPLE_TOKENS or seconds <= 0:
            return
        rate = num_tokens / seconds
        self.prefill_tokens_per_second = self._average("prefill", self.prefill_tokens_per_second, rate)

    def _average(self, name: str, old: float | None, new: float) -> float:
        if name not in self.measured or old is None:
            self.measured.add(name)
            return new
        return (1 - SMOOTHING) * old + SMOOTHING * new

    def relative_load_cost(self, tier: str) -> float:
        """Loading a block from `tier` over computing it: < 1 when loading pays."""
        load = self.block_bytes / self.bytes_per_second[tier]
        return load / (self.block_size / self.prefill_tokens_per_second)

    def load_seconds(self, tiers: list[str]) -> float:
        """How long reading blocks held by `tiers` (one name per block) should take, by the read speeds."""
        return sum(self.block_bytes / self.bytes_per_second[tier] for tier in tiers)

    def blocks_worth_loading(self, tiers: list[str]) -> int:
        """How many of a run of blocks (held by `tiers`, in order) to load; 0: compute them all."""
        recompute = self.block_size / self.prefill_tokens_per_second
        best, best_saved, saved = 0, 0.0, 0.0
        for count, tier in enumerate(tiers, start=1):
            saved += recompute - self.block_bytes / self.bytes_per_second[tier]
            if saved > best_saved:
                best, best_saved = count, saved
        if best or not tiers:
            self._declined_in_a_row = 0
            return best
        self._declined_in_a_row += 1
        if self._declined_in_a_row < PROBE_EVERY:
            return 0
        self._declined_in_a_row = 0
        return len(tiers)  # a probe: measured again
