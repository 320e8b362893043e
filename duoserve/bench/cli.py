"""`duoserve bench ...` and `duoserve bench plot ...`: argument parsing and the top-level flow.

Option names follow vLLM's benchmarks/benchmark_serving.py where it has one, so commands carry over.
httpx, tqdm and matplotlib are imported only when a subcommand runs, so adding this parser to the main
CLI costs nothing at startup.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from typing import Any
from urllib.parse import urlparse

from duoserve.bench.datasets import DATASETS, PROMPT_FORMATS, DatasetConfig
from duoserve.bench.payload import ENDPOINTS, is_chat

DESCRIPTION = "Load generator for OpenAI-compatible endpoints (duoserve, llama-server, vLLM)."
# Left out of the result file: the key is a secret, the others are parser plumbing.
_NOT_CONFIG = frozenset({"api_key", "func", "bench_command"})


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    g.add_argument("--model", help="model name to send (default: the first one GET /v1/models lists)")
    g.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token ($OPENAI_API_KEY)"
    )
    g.add_argument("--label", help="name of this run in tables and plots (default: host/model)")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=DATASETS)
    g.add_argument("--dataset-path", help="ShareGPT JSON file for --dataset sharegpt")
    g.add_argument("--num-prompts", type=int, default=1000, help="requests (conversations for multi-turn)")
    g.add_argument(
        "--random-input-len", type=int, default=1024, help="prompt tokens (per turn for multi-turn)"
    )
    g.add_argument("--random-output-len", type=int, default=128, help="max_tokens (per turn for multi-turn)")
    g.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [L*(1-r), L*(1+r)]; 0 = fixed",
    )
    g.add_argument(
        "--prompt-format",
        default="text",
        choices=PROMPT_FORMATS,
        help="token-ids: send /v1/completions prompts as lists of token ids (exact lengths; random and "
        "shared-prefix only; without --tokenizer ids are drawn from 1000-29999)",
    )
    g.add_argument("--sharegpt-output-len", type=int, help="override every ShareGPT output length")
    g.add_argument(
        "--prefix-repetition-num-prefixes", type=int, default=10, help="shared-prefix: system prompts"
    )
    g.add_argument(
        "--prefix-repetition-prefix-len", type=int, default=256, help="shared-prefix: prefix tokens"
    )
    g.add_argument(
        "--prefix-repetition-suffix-len", type=int, default=256, help="shared-prefix: question tokens"
    )
    g.add_argument("--prefix-repetition-output-len", type=int, default=128, help="shared-prefix: max_tokens")
    g.add_argument("--multi-turn-turns", type=int, default=4, help="multi-turn: user turns per conversation")
    g.add_argument(
        "--tokenizer",
        help="tokenizer.json (or a directory holding one) to size prompts exactly; without it prompts assume "
        "~1 token per short English word",
    )


def _add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument(
        "--concurrency", "--max-concurrency", dest="concurrency", type=int, help="requests in flight at most"
    )
    g.add_argument(
        "--max-active-conversations",
        type=int,
        help="multi-turn: conversations active at once, each turn taking a --concurrency slot only while "
        "it runs, so active conversations take turns round-robin (vLLM's benchmarks/multi_turn); "
        "default: a conversation holds its slot across its turns",
    )
    g.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="arrivals per second (Poisson); inf = all at once",
    )
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM, llama-server)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one request")
    g.add_argument("--disable-tqdm", action="store_true")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("results")
    g.add_argument("--slo", help="goodput objectives in seconds, e.g. ttft=0.5,tpot=0.05,e2e=10")
    g.add_argument("--output", help="write config, per-request records and summary to this JSON file")


def _add_plot_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plot",
        help="compare result files",
        description="Plot TTFT/TPOT/ITL p50 and p99 and output throughput against concurrency, "
        "one line per run label.",
    )
    p.add_argument("results", nargs="+", help="result JSON files from `duoserve bench --output`")
    # Its own dest: argparse merges a subcommand's namespace into the parent's, which has --output too.
    p.add_argument(
        "-o", "--output", dest="plot_output", metavar="PNG", default="bench.png", help="file to write"
    )
    p.add_argument("--title")


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Fill `p` with the bench options and the `plot` subcommand; `func` dispatches to run_bench."""
    for add in (_add_target_args, _add_dataset_args, _add_load_args, _add_output_args):
        add(p)
    _add_plot_parser(p.add_subparsers(dest="bench_command", metavar="{plot}"))
    p.set_defaults(func=run_bench)


def add_bench_parser(subparsers: Any) -> None:
    """Register `bench` (and its `plot` subcommand) on the main CLI's subparsers."""
    configure_parser(
        subparsers.add_parser("bench", help="load-test an OpenAI-compatible server", description=DESCRIPTION)
    )


def dataset_config(args: argparse.Namespace) -> DatasetConfig:
    return DatasetConfig(
        name=args.dataset,
        num_prompts=args.num_prompts,
        seed=args.seed,
        dataset_path=args.dataset_path,
        prompt_format=args.prompt_format,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        sharegpt_output_len=args.sharegpt_output_len,
        prefix_num_prefixes=args.prefix_repetition_num_prefixes,
        prefix_len=args.prefix_repetition_prefix_len,
        prefix_suffix_len=args.prefix_repetition_suffix_len,
        prefix_output_len=args.prefix_repetition_output_len,
        multi_turn_turns=args.multi_turn_turns,
    )


def run_config(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The run's settings for the result file; never the API key."""
    config = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and not callable(v)}
    config["model"] = model
    config["label"] = args.label or f"{urlparse(args.base_url).netloc or args.base_url}/{model}"
    if math.isinf(args.request_rate):
        config["request_rate"] = "inf"  # as vLLM writes it: JSON has no infinity
    config["token_counts"] = "tokenizer" if args.tokenizer else "estimated (~1 token per short word)"
    return config


def _notes(args: argparse.Namespace, records: list[Any]) -> list[str]:
    notes = []
    if not args.tokenizer:
        notes.append(
            "no --tokenizer: prompt lengths are estimates (~1 token per short English word); "
            "input totals use the server's usage where reported"
        )
    no_usage = sum(1 for r in records if r.success and not r.usage_reported)
    if no_usage:
        notes.append(f"{no_usage} responses had no usage: their output tokens are counted stream chunks")
    return notes


def _validate(args: argparse.Namespace) -> None:
    if args.prompt_format == "token-ids" and is_chat(args.endpoint):
        raise ValueError("--prompt-format token-ids needs --endpoint /v1/completions")
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.timeout <= 0 or args.request_timeout <= 0:
        raise ValueError("--timeout and --request-timeout must be positive")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if args.max_active_conversations is not None and args.max_active_conversations < 1:
        raise ValueError("--max-active-conversations must be >= 1")


async def _bench(args: argparse.Namespace) -> int:
    from duoserve.bench.client import BenchClient, ClientConfig
    from duoserve.bench.datasets import load_dataset
    from duoserve.bench.metrics import SLO, summarize
    from duoserve.bench.payload import RequestOptions
    from duoserve.bench.report import format_summary, result_document, top_errors, write_result
    from duoserve.bench.runner import LoadConfig, run_load
    from duoserve.bench.tokens import make_counter

    _validate(args)
    slo = SLO.parse(args.slo) if args.slo else None
    convs = load_dataset(dataset_config(args), make_counter(args.tokenizer))
    client_cfg = ClientConfig(
        args.base_url, args.endpoint, args.api_key, args.request_timeout, args.concurrency
    )
    load = LoadConfig(
        concurrency=args.concurrency,
        max_active_conversations=args.max_active_conversations,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        seed=args.seed,
        timeout=args.timeout,
        progress=not args.disable_tqdm,
    )
    async with BenchClient(client_cfg) as client:
        model = args.model or await client.first_model()
        opts = RequestOptions(model, args.endpoint, args.ignore_eos, args.temperature)
        outcome = await run_load(convs, client, opts, load)
    summary: dict[str, Any] = summarize(outcome.records, outcome.duration, slo)
    summary["not_started"] = outcome.not_started
    config = run_config(args, model)
    print(format_summary(config, summary, top_errors(outcome.records), _notes(args, outcome.records)))
    if args.output:
        write_result(args.output, result_document(config, summary, outcome.records))
        print(f"wrote {args.output}")
    return 0 if summary["completed"] else 1


def _plot(args: argparse.Namespace) -> int:
    from duoserve.bench.plot import plot_runs

    plot_runs(args.results, args.plot_output, args.title)
    print(f"wrote {args.plot_output}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """Entry point for parsed `bench` arguments: 0 ok, 1 no request succeeded, 2 bad input or no server."""
    try:
        if getattr(args, "bench_command", None) == "plot":
            return _plot(args)
        return asyncio.run(_bench(args))
    except KeyboardInterrupt:
        return 130
    except _user_errors() as e:  # evaluated only once something was raised
        print(f"duoserve bench: error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Bad options, missing files, unreachable servers: things the user fixes, not bugs to trace."""
    from duoserve.bench.plot import PlotError

    errors: tuple[type[BaseException], ...] = (ValueError, OSError, PlotError)
    try:
        import httpx
    except ImportError:
        return errors
    return (*errors, httpx.HTTPError)
