"""`python -m duoserve.bench` end to end: a run against the real test server, its result file, the plot."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from duoserve.bench import add_bench_parser, run_bench  # noqa: E402
from duoserve.bench.__main__ import main  # noqa: E402
from tests.bench.fake_server import MODEL, FakeServer  # noqa: E402


def bench_args(base_url: str, *extra: str) -> list[str]:
    small = ["--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "4", "--disable-tqdm"]
    return ["--base-url", base_url, *small, *extra]


def test_bench_run_writes_result_and_prints_summary(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.ttft, server.gap = 0.01, 0.005
    out = tmp_path / "a.json"
    argv = bench_args(server.base_url, "--concurrency", "2", "--slo", "ttft=5,tpot=1", "--output", str(out))
    assert main([*argv, "--api-key", "sk-secret", "--ignore-eos"]) == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "goodput" in printed and "6 ok, 0 failed" in printed
    assert "no --tokenizer" in printed
    doc = json.loads(out.read_text())
    assert "sk-secret" not in out.read_text()
    config, summary = doc["config"], doc["summary"]
    assert config["model"] == MODEL and config["concurrency"] == 2 and config["request_rate"] == "inf"
    assert config["label"] == f"{server.base_url.removeprefix('http://')}/{MODEL}"
    assert summary["completed"] == 6 and summary["total_output_tokens"] == 24
    assert summary["request_goodput"] == pytest.approx(summary["request_throughput"])
    assert len(doc["requests"]) == 6 and doc["requests"][0]["chunk_tokens"] == [1, 1, 1, 1]
    assert all(b["ignore_eos"] is True for b in server.bodies)


def test_plot_compares_runs(server: FakeServer, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    server.ttft, server.gap = 0.0, 0.002
    files = []
    for label in ("A", "B"):
        for conc in ("1", "2"):
            path = tmp_path / f"{label}{conc}.json"
            args = ["--concurrency", conc, "--label", label, "--output", str(path)]
            assert main(bench_args(server.base_url, *args)) == 0
            files.append(str(path))
    png = tmp_path / "cmp.png"
    assert main(["plot", *files, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lead_wiring_and_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="duoserve")
    add_bench_parser(parser.add_subparsers(dest="command"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parser.parse_args(["bench", *bench_args(f"http://127.0.0.1:{port}")])
    assert args.func is run_bench and run_bench(args) == 2
    assert "duoserve bench: error" in capsys.readouterr().err
    bad = parser.parse_args(["bench", "--prompt-format", "token-ids", "--endpoint", "/v1/chat/completions"])
    assert run_bench(bad) == 2
    missing = parser.parse_args(["bench", "plot", str(tmp_path / "nope.json")])
    assert missing.bench_command == "plot" and run_bench(missing) == 2


def test_max_active_conversations_runs_and_is_validated(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.ttft, server.gap = 0.0, 0.0
    out = tmp_path / "mt.json"
    multi = ["--dataset", "multi-turn", "--multi-turn-turns", "2", "--concurrency", "1", "--output", str(out)]
    assert main(bench_args(server.base_url, *multi, "--max-active-conversations", "6")) == 0
    assert "6 conversations active (slot per turn)" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["config"]["max_active_conversations"] == 6
    requests = sorted(doc["requests"], key=lambda r: r["send_time"])
    assert [r["turn"] for r in requests] == [0] * 6 + [1] * 6  # round-robin: every first turn, then seconds
    assert main(bench_args(server.base_url, "--max-active-conversations", "0")) == 2
    assert "--max-active-conversations must be >= 1" in capsys.readouterr().err
