"""`duoserve bench`: a load generator and result plotter for OpenAI-compatible inference servers.

Modules, one idea each: tokens (sizing prompts), datasets (workloads), payload (request bodies),
sse (the stream format), stream (one stream into a record), client (HTTP), records, metrics,
arrivals, runner (load shapes), report (result file and summary table), plot, cli.
"""

from duoserve.bench.cli import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
