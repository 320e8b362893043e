"""The simulated workload is bench's: the same prompts (token ids) and the same arrival times."""

from __future__ import annotations

import argparse

from duoserve.bench.arrivals import arrival_offsets
from duoserve.bench.cli import configure_parser, dataset_config
from duoserve.bench.datasets import load_dataset
from duoserve.bench.payload import completion_prompt
from duoserve.bench.tokens import make_counter
from duoserve.plan.workload import add_workload_args, workload_from_args


def test_bench_flags_give_benchs_prompts_and_arrivals():
    flags = ["--dataset", "shared-prefix", "--prompt-format", "token-ids", "--num-prompts", "12"]
    flags += ["--prefix-repetition-num-prefixes", "3", "--request-rate", "4", "--burstiness", "0.25"]
    flags += ["--seed", "7", "--ignore-eos"]
    bench = argparse.ArgumentParser()
    configure_parser(bench)
    bench_args = bench.parse_args(flags)
    convs = load_dataset(dataset_config(bench_args), make_counter(None))
    plan = argparse.ArgumentParser()
    add_workload_args(plan)
    workload = workload_from_args(plan.parse_args(flags))
    sent = [completion_prompt(c, 0, []) for c in convs]
    simulated = [[*c.system, *c.turns[0].prompt] for c in workload.conversations]
    assert simulated == sent
    assert [c.arrival for c in workload.conversations] == arrival_offsets(12, 4, 0.25, 7)
    assert [c.turns[0].output_len for c in workload.conversations] == [c.turns[0].output_len for c in convs]
