"""The simulated workload, in `duoserve bench`'s vocabulary: its datasets, arrivals and result files.

A workload is conversations arriving on bench's schedule (`arrival_offsets`: Poisson, or gamma with
--burstiness), capped by --concurrency as bench's runner caps them. Prompts are bench's own
(`load_dataset` with the same flags and seed) as token ids: the random and shared-prefix datasets
generate exactly the ids `duoserve bench --prompt-format token-ids` sends, so prefix structure carries
over; text datasets keep their lengths (random ids of each turn's measured length).

A trace is a `duoserve bench` result file: each recorded request arrives at its send time with its
prompt length and its output length (the tokens it got, or its max_tokens if it failed). Its turns are
replayed as independent requests at their recorded times, so conversations' prefix reuse is not.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duoserve.bench.arrivals import arrival_offsets
from duoserve.bench.cli import dataset_config
from duoserve.bench.datasets import load_dataset
from duoserve.bench.report import load_result
from duoserve.bench.tokens import WordEstimator


@dataclass
class SimTurn:
    prompt: list[int]  # this turn's own tokens (after the system prefix and earlier turns)
    output_len: int


@dataclass
class SimConversation:
    conv_id: int
    arrival: float  # seconds from the start of the run
    turns: list[SimTurn]
    system: list[int] = field(default_factory=list)


@dataclass
class Workload:
    conversations: list[SimConversation]
    concurrency: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # bench's run config keys, for the result file

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Bench's workload flags (and --trace) as a workload; ValueError for bad values."""
    if getattr(args, "trace", None):
        return workload_from_trace(args.trace)
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    ids = args.dataset in ("random", "shared-prefix")
    # bench's own flags -> DatasetConfig; the simulator has no tokenizer, so text datasets stay text.
    fmt = "token-ids" if ids else "text"
    cfg = dataset_config(argparse.Namespace(**{**vars(args), "prompt_format": fmt}))
    counter = WordEstimator()
    convs = load_dataset(cfg, counter)
    offsets = arrival_offsets(len(convs), args.request_rate, args.burstiness, args.seed)
    rng = np.random.default_rng(args.seed + 1)

    def ids_of(prompt: Any, length: int) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else counter.random_ids(length, rng)

    conversations = [
        SimConversation(
            conv.conv_id,
            offset,
            [SimTurn(ids_of(t.prompt, t.prompt_len), max(1, t.output_len)) for t in conv.turns],
            ids_of(conv.system, conv.system_len) if conv.system is not None else [],
        )
        for conv, offset in zip(convs, offsets, strict=True)
    ]
    config = {
        "dataset": args.dataset,
        "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "multi_turn_turns": args.multi_turn_turns,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "prompt_format": "token-ids",
        "ignore_eos": True,
    }
    return Workload(conversations, args.concurrency, config)


def workload_from_trace(path: str) -> Workload:
    """The requests of a `duoserve bench --output` file, at their recorded send times."""
    try:
        doc = load_result(path)
    except OSError as err:
        raise ValueError(f"cannot read trace {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise ValueError(f"trace {path} is not JSON: {err}") from err
    records = doc.get("requests") if isinstance(doc, dict) else None
    if not isinstance(records, list) or not records:
        raise ValueError(f"trace {path} is not a `duoserve bench` result file with requests")
    rng = np.random.default_rng(0)
    counter = WordEstimator()
    conversations = []
    try:
        for i, r in enumerate(sorted(records, key=lambda r: float(r["send_time"]))):
            prompt_len = int(r.get("prompt_tokens") or r["prompt_len"])
            output = int(r.get("output_tokens") or 0) if r.get("error") is None else 0
            output = output or int(r["max_tokens"])
            turn = SimTurn(counter.random_ids(max(1, prompt_len), rng), max(1, output))
            conversations.append(SimConversation(i, float(r["send_time"]), [turn]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"trace {path}: a request record lacks {err}") from err
    config = dict(doc.get("config") or {})
    config.update({"trace": path, "num_prompts": len(conversations), "concurrency": None})
    return Workload(conversations, None, config)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """bench's workload and load flags, with bench's names and defaults (what a simulation needs)."""
    from duoserve.bench.datasets import DATASETS

    g = p.add_argument_group("workload (as `duoserve bench`)")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=DATASETS)
    g.add_argument("--dataset-path", help="ShareGPT JSON file for --dataset sharegpt")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--sharegpt-output-len", type=int)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)
    g.add_argument("--multi-turn-turns", type=int, default=4)
    g.add_argument("--concurrency", "--max-concurrency", dest="concurrency", type=int)
    g.add_argument("--request-rate", type=float, default=math.inf, help="arrivals per second; inf = at once")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--trace", help="a `duoserve bench --output` file: replay its requests instead")
    # Accepted so that a bench command line simulates unchanged; the simulation always runs each
    # request to its output length (ignore_eos) on token-id prompts.
    g.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--prompt-format", default="token-ids", help=argparse.SUPPRESS)
