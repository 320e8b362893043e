"""`duoserve plan profile`: measure a worker's steps on the engine's real paths, fit the step model.

The profiler drives a real `EngineCore` (the same model, kernels, dtype and scheduler as `duoserve
serve` with the same engine arguments) with synthetic requests that make steps of chosen shapes:
`decode_batches` requests decoding over `context_lens` tokens of context, with a prompt of
`prefill_lens` tokens added to their batch, and one long prompt prefilled in chunks (attention over
earlier chunks). Every step is timed and its shape read from the scheduler's own output; the step
model is fitted over all of them. The KV transfer of disaggregation is timed on the real transport
(duoserve/disagg/kv_transfer.py: export, ZeroMQ push over loopback, receive, import).

The profile (JSON) keeps the grid, every measured step, the fit, the engine arguments, the CPU and
the torch version: a profile is only valid for the host and arguments it was measured with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from duoserve.plan.step_model import (
    FEATURES,
    Fit,
    StepModel,
    StepShape,
    StepSpread,
    fit_step_model,
    step_shape,
)

if TYPE_CHECKING:
    from duoserve.engine.step_observer import MakeStepObserver

PROFILE_KIND = "duoserve-plan-profile"
# 2: the step model's features became kernel_rows/tiled_rows (step_model.py). A version-1 profile's
# measured steps are the same (the StepShape fields), so it is refitted from them when read. Later
# version-2 profiles add sampled_rows and streamed (a step's sampling rows, the tokens streamed during
# it): earlier ones lack them and read as 0, which computes what they computed.
PROFILE_VERSION = 2


@dataclass(frozen=True)
class Grid:
    decode_batches: tuple[int, ...] = (1, 8, 32)
    context_lens: tuple[int, ...] = (128, 1024)
    prefill_lens: tuple[int, ...] = (32, 128, 448)
    chunked_prompt_len: int = 2048  # prefilled alone, in budget-sized chunks
    decode_steps: int = 3  # pure decode steps timed per (batch, context)
    transfer_tokens: tuple[int, ...] = (128, 1024)
    repeats: int = 2


@dataclass(frozen=True)
class KVTransferModel:
    """Seconds to move a prompt's KV from a prefill worker to a decode worker: fixed + per token."""

    fixed_seconds: float = 0.0
    seconds_per_token: float = 0.0

    def seconds(self, num_tokens: int) -> float:
        return self.fixed_seconds + self.seconds_per_token * num_tokens


@dataclass(frozen=True)
class WorkerLimits:
    """What the simulated scheduler needs to behave as the profiled worker's."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_prefix_caching: bool = True
    sliding_window: int | None = None  # every layer's window (blocks slide out while a request runs)
    quantized_max_rows: int = 0  # larger steps multiply dequantized weight tiles (0: dense weights)


# The roles of a disaggregated deployment's workers (`duoserve serve --role`) that a profile may model
# apart; a colocated worker (role both) has the profile's own step model and limits.
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class RoleProfile:
    """A disaggregated deployment's worker of one role, fitted from its own served steps (trace.py).

    Each role's steps carry what only it does, so one step model for both would blend them: a prefill
    worker's step includes sending each chunk's KV, a decode worker's engine loop sends every request's
    token each step and takes in arriving KV, and each worker of `duoserve up` runs on its own share of
    the cores. Its limits are its own too (each sized its KV cache from the memory free at its start)."""

    step_model: StepModel
    limits: WorkerLimits
    fit: dict[str, float] = field(default_factory=dict)
    spread: StepSpread | None = None  # how its traced steps spread around step_model (None: none)


@dataclass
class Profile:
    step_model: StepModel
    limits: WorkerLimits
    kv_transfer: KVTransferModel = field(default_factory=KVTransferModel)
    engine_args: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, float] = field(default_factory=dict)
    grid: dict[str, Any] = field(default_factory=dict)
    samples: list[list[float]] = field(default_factory=list)  # [*StepShape fields, seconds] per measured step
    roles: dict[str, RoleProfile] = field(default_factory=dict)  # ROLES fitted apart (from served traces)
    # How served steps spread around the step model (step_model.step_spread; from traces only: an
    # in-process profile's steps are the quiet case the model is). None: the simulator takes the model's time.
    spread: StepSpread | None = None

    def for_role(self, role: str) -> tuple[StepModel, WorkerLimits]:
        """The step model and limits of a worker of `role` (prefill or decode in a disaggregated
        deployment, both when colocated): its role's own where the profile has them, else its own."""
        own = self.roles.get(role)
        return (own.step_model, own.limits) if own is not None else (self.step_model, self.limits)

    def spread_for(self, role: str) -> StepSpread | None:
        """The step spread of a worker of `role` (as for_role)."""
        own = self.roles.get(role)
        return own.spread if own is not None else self.spread

    def to_json(self) -> dict[str, Any]:
        data = {
            "kind": PROFILE_KIND,
            "version": PROFILE_VERSION,
            "step_model": self.step_model.to_json(),
            "limits": dataclasses.asdict(self.limits),
            "kv_transfer": dataclasses.asdict(self.kv_transfer),
            "engine_args": self.engine_args,
            "host": self.host,
            "fit": self.fit,
            "grid": self.grid,
            "features": list(FEATURES),
            "sample_fields": [f.name for f in dataclasses.fields(StepShape)] + ["seconds"],
            "samples": self.samples,
        }
        if self.spread is not None:
            data["step_spread"] = self.spread.to_json()
        if self.roles:
            data["roles"] = {name: _role_json(role) for name, role in self.roles.items()}
        return data

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
            raise ValueError("not a duoserve plan profile (make one with `duoserve plan profile -o FILE`)")
        if data.get("version") == 1 and data.get("samples"):
            data = _refitted(data)
        if data.get("version") != PROFILE_VERSION:
            version = data.get("version")
            raise ValueError(f"profile version {version!r}; this duoserve reads version {PROFILE_VERSION}")
        limits = _limits(data.get("limits"), "the profile's")
        try:
            transfer = KVTransferModel(**data.get("kv_transfer", {}))
        except TypeError as err:
            raise ValueError(f"the profile's kv_transfer is malformed: {err}") from err
        if transfer.fixed_seconds < 0 or transfer.seconds_per_token < 0:
            raise ValueError("the profile's kv_transfer times must be >= 0")
        return cls(
            step_model=StepModel.from_json(data.get("step_model") or {}),
            limits=limits,
            kv_transfer=transfer,
            engine_args=data.get("engine_args", {}),
            host=data.get("host", {}),
            fit=data.get("fit", {}),
            grid=data.get("grid", {}),
            samples=data.get("samples", []),
            roles=_roles(data.get("roles") or {}, limits),
            spread=_spread(data.get("step_spread"), "the profile's"),
        )


def _role_json(role: RoleProfile) -> dict[str, Any]:
    data = {
        "step_model": role.step_model.to_json(),
        "limits": dataclasses.asdict(role.limits),
        "fit": role.fit,
    }
    return data | ({"step_spread": role.spread.to_json()} if role.spread is not None else {})


def _limits(data: Any, whose: str) -> WorkerLimits:
    try:
        limits = WorkerLimits(**data)
    except TypeError as err:
        raise ValueError(f"{whose} limits are malformed: {err}") from err
    if min(limits.num_kv_blocks, limits.block_size, limits.max_model_len) < 1:
        raise ValueError(f"{whose} limits must be positive")
    if limits.max_num_batched_tokens < 1 or limits.max_num_seqs < 1:
        raise ValueError(f"{whose} limits must be positive")
    return limits


def _roles(data: Any, limits: WorkerLimits) -> dict[str, RoleProfile]:
    """A profile's per-role models; every role's blocks are the profile's size (the router hashes
    prompts in blocks of one size for every worker)."""
    if not isinstance(data, dict) or not set(data) <= set(ROLES):
        raise ValueError(f"the profile's roles must be a mapping of {' and/or '.join(ROLES)}")
    roles = {}
    for name, role in data.items():
        if not isinstance(role, dict):
            raise ValueError(f"the profile's {name} role is not a mapping")
        role_limits = _limits(role.get("limits"), f"the {name} role's")
        if role_limits.block_size != limits.block_size:
            raise ValueError(f"the {name} role's block size is not the profile's")
        try:
            step_model = StepModel.from_json(role.get("step_model") or {})
        except ValueError as err:
            raise ValueError(f"the {name} role's {err.args[0].removeprefix('the ')}") from err
        spread = _spread(role.get("step_spread"), f"the {name} role's")
        roles[name] = RoleProfile(step_model, role_limits, role.get("fit") or {}, spread)
    return roles


def _spread(data: Any, whose: str) -> StepSpread | None:
    """A step spread as stored (None: none)."""
    if data is None:
        return None
    try:
        return StepSpread.from_json(data)
    except ValueError as err:
        raise ValueError(f"{whose} {err}") from err


def fit_summary(fit: Fit) -> dict[str, float]:
    return {
        "r2": fit.r2,
        "rmse_seconds": fit.rmse,
        "num_samples": fit.num_samples,
        "num_dropped": fit.num_dropped,
    }


def _refitted(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 profile as version 2: today's step model fitted to its measured steps."""
    try:
        shapes = [StepShape(*row[:-1]) for row in data["samples"]]
        seconds = [float(row[-1]) for row in data["samples"]]
        fit = fit_step_model(shapes, seconds)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the version-1 profile's samples cannot be refitted: {err}") from err
    return data | {"version": PROFILE_VERSION, "step_model": fit.model.to_json(), "fit": fit_summary(fit)}


def load_profile(path: str) -> Profile:
    """A profile file; ValueError (never a traceback) for a missing, empty, non-JSON or foreign one."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"cannot read profile {path}: {err.strerror or err}") from err
    if not text.strip():
        raise ValueError(f"profile {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"profile {path} is not JSON: {err}") from err
    try:
        return Profile.from_json(data)
    except ValueError as err:
        raise ValueError(f"profile {path}: {err}") from err


def write_profile(path: str, profile: Profile) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(profile.to_json(), f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------------------------------------- measuring


def quantized_rows(core) -> int:
    """The engine's quantized row threshold where its weights are quantized (0: dense weights)."""
    from duoserve.models.linear import _QuantizedLinear

    linears = [core.model.lm_head] + [linear for layer in core.model.layers for linear in layer.linears()]
    parts = [p for linear in linears for p in getattr(linear, "parts", [linear])]
    return max((p.max_rows for p in parts if isinstance(p, _QuantizedLinear)), default=0)


def worker_limits(core, quantized_max_rows: int) -> WorkerLimits:
    """What the simulated scheduler needs to behave as this core's."""
    config = core.config
    return WorkerLimits(
        num_kv_blocks=core.kv.num_blocks,
        block_size=config.block_size,
        max_model_len=core.max_model_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        enable_prefix_caching=config.enable_prefix_caching,
        sliding_window=core.kv.sliding_window,
        quantized_max_rows=quantized_max_rows,
    )


class StepTimer:
    """Times `core.step()` and records the shape of what the core's scheduler scheduled for it.

    The shape is read from the scheduler's output inside the step (the scheduler's `schedule` is
    wrapped on this one instance): the profiler then describes a step exactly as the simulator does.
    """

    def __init__(self, core) -> None:
        self.core = core
        self.shapes: list[StepShape] = []
        self.seconds: list[float] = []
        self._last: StepShape | None = None
        schedule = core.scheduler.schedule
        max_rows = quantized_rows(core)

        def recording_schedule():
            out = schedule()
            self._last = step_shape(out.scheduled, max_rows)
            return out

        core.scheduler.schedule = recording_schedule

    def step(self, record: bool = True) -> None:
        self._last = None
        start = time.perf_counter()
        self.core.step()
        elapsed = time.perf_counter() - start
        if record and self._last is not None and (self._last.prefill_tokens or self._last.decode_seqs):
            self.shapes.append(self._last)
            self.seconds.append(elapsed)


class _Requests:
    """Synthetic requests on the core: random prompts (no prefix hits), ignore_eos, long max_tokens."""

    def __init__(self, core, eos_token_ids: list[int], seed: int = 0) -> None:
        self.core = core
        self.eos = eos_token_ids
        self.rng = random.Random(seed)
        self.count = 0
        self.vocab = core.model_config.vocab_size

    def tokens(self, count: int) -> list[int]:
        low = min(3, self.vocab - 1)  # past the usual specials
        return [self.rng.randrange(low, self.vocab) for _ in range(count)]

    def add(self, prompt_len: int, max_tokens: int, prefix: list[int] = ()) -> str:
        """A request of `prompt_len` tokens: `prefix`, then fresh random ones."""
        from duoserve.sampling_params import SamplingParams

        self.count += 1
        request_id = f"profile-{self.count}"
        prompt = [*prefix, *self.tokens(prompt_len - len(prefix))]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.core.add_request(request_id, prompt, params, self.eos)
        return request_id

    def abort_all(self) -> None:
        for request_id in list(self.core.scheduler.requests):
            self.core.abort(request_id)


def measure_steps(core, grid: Grid, progress: Callable[[str], None] = lambda _: None) -> StepTimer:
    """Run the grid on the core; the timer holds every measured step."""
    timer = StepTimer(core)
    requests = _Requests(core, list(core.model_config.eos_token_ids))
    budget = core.config.max_num_batched_tokens
    max_len = core.max_model_len
    # Warm-up: first calls build kernels and grow allocator pools.
    requests.add(min(64, max_len - 8), 4)
    for _ in range(6):
        timer.step(record=False)
    requests.abort_all()
    if grid.chunked_prompt_len > 1:
        progress(f"chunked prefill of {grid.chunked_prompt_len} tokens")
        for _ in range(grid.repeats):
            requests.add(min(grid.chunked_prompt_len, max_len - 2), 1)
            while core.has_unfinished():
                timer.step()
    for batch in grid.decode_batches:
        if batch > core.config.max_num_seqs:
            continue
        for context in grid.context_lens:
            steps_needed = grid.decode_steps + len(grid.prefill_lens) * grid.repeats + 2
            if context + steps_needed + 2 > max_len:
                continue
            progress(f"{batch} decodes over {context} tokens of context")
            _measure_batch(timer, requests, batch, context, grid, budget, steps_needed)
    return timer


def _measure_batch(
    timer: StepTimer, requests: _Requests, batch: int, context: int, grid: Grid, budget: int, steps: int
) -> None:
    core = timer.core
    # The decoders share all but their last block of context: the prefix cache prefills it once, so a
    # batch of 32 over 1024 tokens costs ~1.5k prompt tokens to set up, not 32k. Their decode steps
    # still read every sequence's whole context (attention walks each block table).
    tail = min(context, 2 * core.config.block_size)
    shared = requests.tokens(context - tail)
    decoders = [requests.add(context, steps + 1, shared) for _ in range(batch)]
    # Their prefill: timed too (chunked steps of full budget, mixed shapes).
    while any(not core.scheduler.requests[r].is_decoding for r in decoders if r in core.scheduler.requests):
        timer.step()
    for _ in range(grid.decode_steps):
        timer.step()
    for prefill in grid.prefill_lens:
        if prefill + batch > budget:
            continue
        for _ in range(grid.repeats):
            extra = requests.add(prefill, 2)
            timer.step()  # batch decodes + the whole prompt
            core.abort(extra)
    requests.abort_all()


def measure_kv_transfer(core, token_counts: tuple[int, ...], repeats: int) -> tuple[KVTransferModel, list]:
    """Time export + send + receive + import of prompts' KV through the real transport, on loopback.

    Blocks are copied within the core's own cache (from one set of block ids to another): the same
    bytes and layout a prefill worker sends a decode worker.
    """
    import zmq

    from duoserve.disagg.kv_transfer import (
        KVBlocks,
        KVDone,
        KVLayout,
        KVReceiver,
        KVSender,
        KVTicket,
        decode_blocks,
    )

    cache, bs = core.kv_cache, core.config.block_size
    layout = KVLayout.of(cache.spec)
    counts = [n for n in token_counts if 2 * -(-n // bs) <= cache.num_blocks]
    if not counts:
        return KVTransferModel(), []
    context = zmq.Context()
    sender = KVSender(context)
    receiver = KVReceiver(context, "127.0.0.1", layout, cache.num_blocks)
    samples = []
    try:
        for num_tokens in counts:
            num_blocks = -(-num_tokens // bs)
            source, target = list(range(num_blocks)), list(range(num_blocks, 2 * num_blocks))
            per_chunk = max(1, core.config.max_num_batched_tokens // bs)
            for attempt in range(repeats + 1):
                ticket = KVTicket(f"t{num_tokens}-{attempt}", receiver.address, target, 0, layout)
                start = time.perf_counter()
                for first in range(0, num_blocks, per_chunk):
                    ids = source[first : first + per_chunk]
                    sender.send_blocks(ticket, target[first : first + per_chunk], cache.export_blocks(ids))
                sender.send_done(ticket, 0, num_blocks)
                done = False
                while not done:
                    for message, payload in receiver.receive(lambda rid, t=ticket: rid == t.request_id):
                        if isinstance(message, KVBlocks):
                            cache.import_blocks(message.block_ids, decode_blocks(message, payload, layout))
                        elif isinstance(message, KVDone):
                            done = True
                if attempt:  # the first one connects the socket
                    samples.append([num_tokens, time.perf_counter() - start])
    finally:
        sender.close()
        receiver.close()
        context.term()
    return _fit_transfer(samples), samples


def _fit_transfer(samples: list[list[float]]) -> KVTransferModel:
    import numpy as np

    tokens = np.array([s[0] for s in samples], dtype=float)
    seconds = np.array([s[1] for s in samples], dtype=float)
    if len(set(tokens.tolist())) < 2:
        return KVTransferModel(0.0, float(seconds.mean() / tokens.mean()))
    slope, intercept = np.polyfit(tokens, seconds, 1)
    return KVTransferModel(max(0.0, float(intercept)), max(0.0, float(slope)))


def host_info(core) -> dict[str, Any]:
    import torch

    from duoserve.engine.engine_env import WAIT_VARS
    from duoserve.hardware import host_defaults

    cpu = host_defaults().cpu
    return {
        # How its OpenMP threads waited (duoserve/engine/engine_env.py): served engines sleep.
        "openmp_wait": {name: os.environ[name] for name in WAIT_VARS if name in os.environ},
        "cpu": cpu.model,
        "arch": cpu.arch,
        "cores": cpu.cores,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(core.device),
        "dtype": str(core.config.resolved_dtype()).removeprefix("torch."),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_profile(
    config,
    grid: Grid = Grid(),
    progress: Callable[[str], None] = lambda _: None,
    make_step_observer: MakeStepObserver | None = None,
) -> Profile:
    """Load the engine `config` describes, measure it, and fit: the whole `duoserve plan profile`.
    `make_step_observer`: the core's step observer (--step-trace of the profiled steps)."""
    from duoserve.engine.core import EngineCore
    from duoserve.models.loader import load_model

    progress("loading the model")
    core = EngineCore(config, load_model(config.model, config.resolved_dtype()), None, make_step_observer)
    timer = measure_steps(core, grid, progress)
    fit = fit_step_model(timer.shapes, timer.seconds)
    progress(f"KV transfer of {', '.join(map(str, grid.transfer_tokens))} tokens")
    transfer, transfer_samples = measure_kv_transfer(core, grid.transfer_tokens, grid.repeats)
    engine_args = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return Profile(
        step_model=fit.model,
        limits=worker_limits(core, quantized_rows(core)),
        kv_transfer=transfer,
        engine_args=engine_args,
        host=host_info(core),
        fit=fit_summary(fit),
        grid=dataclasses.asdict(grid) | {"transfer_samples": transfer_samples},
        samples=[[*s.values(), t] for s, t in zip(timer.shapes, timer.seconds, strict=True)],
    )
