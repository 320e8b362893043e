"""`duoserve plan` from the command line: bench-format results, traces, and bad input as clear errors."""

from __future__ import annotations

import json

import pytest

from duoserve.bench.metrics import summarize
from duoserve.bench.plot import load_point
from duoserve.bench.records import RequestRecord
from duoserve.bench.report import load_result
from duoserve.cli import main
from duoserve.plan.profile import write_profile

WORKLOAD = [
    "--num-prompts",
    "20",
    "--request-rate",
    "5",
    "--random-input-len",
    "200",
    "--random-output-len",
    "8",
]


@pytest.fixture
def profile_file(fixed_profile, tmp_path) -> str:
    path = tmp_path / "profile.json"
    write_profile(str(path), fixed_profile)
    return str(path)


def test_simulate_writes_a_bench_result_that_bench_reads(profile_file, tmp_path, capsys):
    out = tmp_path / "predicted.json"
    args = ["plan", "simulate", "--profile", profile_file, "--deployment", "disagg:1x1", *WORKLOAD]
    assert main([*args, "--slo", "ttft=0.5,itl=0.05", "--output", str(out)]) == 0
    assert "predicted disagg:1x1" in capsys.readouterr().out
    doc = load_result(str(out))
    records = [RequestRecord.from_json(r) for r in doc["requests"]]
    assert len(records) == 20 and all(r.success and r.output_tokens == 8 for r in records)
    assert set(doc["summary"]) >= set(summarize(records, 1.0, None))
    assert doc["summary"]["request_goodput"] is not None and doc["summary"]["median_ttft_ms"] > 0
    point = load_point(str(out))  # what `duoserve bench plot` draws
    assert point.label == "predicted disagg:1x1" and point.x > 0

    # The result file is a trace too: replayed, the same requests arrive at the same times.
    again = tmp_path / "again.json"
    assert (
        main(["plan", "simulate", "--profile", profile_file, "--trace", str(out), "--output", str(again)])
        == 0
    )
    replay = [RequestRecord.from_json(r) for r in load_result(str(again))["requests"]]
    assert [r.send_time for r in replay] == pytest.approx([r.send_time for r in records], abs=1e-6)
    assert [r.prompt_tokens for r in replay] == [r.prompt_tokens for r in records]


def test_recommend_prints_a_table_and_writes_json(profile_file, tmp_path, capsys):
    out = tmp_path / "rec.json"
    args = [
        "plan",
        "recommend",
        "--profile",
        profile_file,
        *WORKLOAD,
        "--slo",
        "ttft=1",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    assert "recommended: colocated:1" in capsys.readouterr().out
    assert json.loads(out.read_text())["desired_replicas"] == {"prefill": 0, "decode": 0, "colocated": 1}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--deployment", "disagg:2"], "bad deployment 'disagg:2'"),
        (["simulate", "--deployment", "colocated:0"], "at least one decode"),
        (["simulate", "--slo", "ttft=fast"], "not a number of seconds"),
        (["simulate", "--slo", "p99=1"], "bad SLO"),
        (["recommend", "--slo", "ttft=0.001"], "impossible SLO"),
        (["recommend", "--slo", "ttft=1", "--headroom", "-1"], "--headroom must be >= 0"),
        (["simulate", "--num-prompts", "0"], "--num-prompts must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_error(profile_file, capsys, argv, message):
    command, *rest = argv
    assert main(["plan", command, "--profile", profile_file, *WORKLOAD, *rest]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("content", ["", "{}", '{"summary": {"median_ttft_ms": 1}}', "[]", "nonsense"])
def test_an_empty_or_foreign_profile_is_a_clear_error(tmp_path, capsys, content):
    path = tmp_path / "profile.json"
    path.write_text(content)
    assert main(["plan", "simulate", "--profile", str(path), *WORKLOAD]) == 2
    err = capsys.readouterr().err
    assert f"profile {path}" in err and "Traceback" not in err


def test_a_trace_that_is_not_a_bench_result_is_a_clear_error(profile_file, capsys):
    assert main(["plan", "simulate", "--profile", profile_file, "--trace", profile_file]) == 2
    assert "not a `duoserve bench` result file" in capsys.readouterr().err
