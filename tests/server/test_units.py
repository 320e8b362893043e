"""The server's pure parts, without a server: stream deltas and the command line."""

from __future__ import annotations

from duoserve.cli import build_parser
from duoserve.outputs import CompletionOutput, RequestOutput
from duoserve.server.serving import StreamTracker, holdback_for
from duoserve.server.settings import settings_from_args


def output(*texts: str, finished: bool = False) -> RequestOutput:
    completions = [
        CompletionOutput(i, text, list(range(len(text.split()))), None, None, "stop" if finished else None)
        for i, text in enumerate(texts)
    ]
    return RequestOutput("r", None, [1], None, completions, finished)


def test_stream_holds_back_what_could_start_a_stop_string():
    tracker = StreamTracker(n=1, holdback=holdback_for(["w9 w", "x"]))
    assert holdback_for(["w9 w", "x"]) == 3 and holdback_for([]) == 0
    (delta,) = tracker.deltas(0, output("w1 w2"))
    assert delta.text == "w1" and delta.finish_reason is None  # " w2" might begin "w9 w"... or not
    (delta,) = tracker.deltas(0, output("w1 w2 w9"))
    assert delta.text == " w2"
    # The stop string completed: the output processor cut the text before it and finished the choice.
    (delta,) = tracker.deltas(0, output("w1 w2 ", finished=True))
    assert delta.text == " " and delta.finish_reason == "stop"
    assert tracker.deltas(0, output("w1 w2 ", finished=True)) == []  # nothing after the finish


def test_stream_numbers_choices_by_prompt_and_sequence():
    tracker = StreamTracker(n=2, holdback=0)
    deltas = tracker.deltas(1, output("w1", "w2 w3"))
    assert [(d.index, d.text, d.token_ids) for d in deltas] == [(2, "w1", [0]), (3, "w2 w3", [0, 1])]


def test_serve_arguments(monkeypatch):
    monkeypatch.setenv("DUOSERVE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "some/model", "--port", "9000", "--max-queued-requests", "7"])
    settings = settings_from_args(args)
    assert (args.model, settings.port, settings.host) == ("some/model", 9000, "127.0.0.1")
    assert (
        settings.api_key == "from-env" and settings.max_queued_requests == 7 and settings.log_level == "INFO"
    )
    args = build_parser().parse_args(["serve", "--api-key", "flag", "--log-level", "debug"])
    assert settings_from_args(args).api_key == "flag" and settings_from_args(args).log_level == "DEBUG"
