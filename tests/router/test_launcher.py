"""`duoserve up`'s choices for its workers."""

from __future__ import annotations

from duoserve.router.launcher import step_trace_paths


def test_each_worker_gets_its_own_step_trace_named_by_its_role():
    roles = ["prefill", "decode", "decode", "both"]
    assert step_trace_paths("t-{role}.jsonl", roles) == [
        "t-prefill.jsonl",
        "t-decode0.jsonl",
        "t-decode1.jsonl",
        "t-both.jsonl",
    ]
    # No placeholder: the role goes at the end, so no two workers write one file.
    assert step_trace_paths("t.jsonl", ["prefill", "decode"]) == ["t.jsonl.prefill", "t.jsonl.decode"]
    # {pid} is each engine process's own; a single worker keeps the path as given.
    assert step_trace_paths("t-{pid}.jsonl", ["prefill", "decode"]) == ["t-{pid}.jsonl"] * 2
    assert step_trace_paths("t.jsonl", ["decode"]) == ["t.jsonl"]
