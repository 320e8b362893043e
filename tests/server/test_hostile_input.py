"""Hostile clients get a 4xx and a closed connection, never a 5xx, a hang or a dead engine: slowloris,
huge bodies, deep JSON, bad Unicode, wrong content types, clients that leave mid-request, and sampling
values at the edges of float32. Raw sockets where an HTTP client would refuse to misbehave."""

from __future__ import annotations

import json
import select
import socket
import threading
import time

import httpx
import pytest

from tests.helpers import random_prompt
from tests.server.harness import wait_for_metrics

MAX_BODY = 65536
READ_TIMEOUT = 3  # --request-read-timeout: short, so that the slow clients below are cut off soon
DEADLINE = 60.0  # the most any wait below may take on a loaded machine; reaching it fails the test
LONG = 240  # tokens: with the 8-token prompts, nearly the whole 256-token context
ABORTED = 'duoserve:request_success_total{finished_reason="abort"}'


@pytest.fixture(scope="module")
def server(start_server):
    # The HTTP layer is under test: the torch attention backend spares a compiled kernel.
    return start_server(
        "--max-request-bytes",
        str(MAX_BODY),
        "--request-read-timeout",
        str(READ_TIMEOUT),
        attention_backend="torch",
    )


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    return sock


def head(
    path: str, length: int | None, content_type: str = "application/json", chunked: bool = False
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of one response on a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in header.split(b"\r\n")[1:])
    length = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return int(header.split()[1]), json.loads(body[:length])


def assert_error(status: int, body: dict, expected: int, *words: str) -> None:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == expected
    for word in words:
        assert word in error["message"], error["message"]


def completion(server, **body) -> dict:
    return {"model": server.model, "prompt": "w5 w6", "max_tokens": 3, **body}


# ---------------------------------------------------------------------- slow clients


def trickle_headers(sock: socket.socket, result: dict) -> None:
    """Slowloris: a request's headers one byte at a time, never finished; stops when the server answers
    or closes, keeping what it said."""
    sent, answer = 0, b""
    header = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        byte = header[sent : sent + 1] or b"a"
        try:
            sock.sendall(byte)
        except OSError:  # closed by the server
            break
        sent += 1
        readable, _, _ = select.select([sock], [], [], 0.05)  # the attacker's pace: a byte per 50 ms
        if readable:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    result.update(sent=sent, answer=answer, closed=time.monotonic() < deadline)


def test_slowloris_clients_are_cut_off_and_do_not_hold_the_server(server, http):
    slow = [connect(server) for _ in range(3)]
    silent = connect(server)  # connects and never sends a byte
    results: list[dict] = [{} for _ in slow]
    threads = [
        threading.Thread(target=trickle_headers, args=(s, r)) for s, r in zip(slow, results, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        # Served while the slow clients trickle (asyncio: they hold a socket each, not a worker).
        response = http.post("/v1/completions", json=completion(server))
        assert response.status_code == 200, response.text
        for thread in threads:
            thread.join(DEADLINE + 5)
        silent.settimeout(DEADLINE)
        assert silent.recv(1024) == b"", "a connection that never sent anything was not closed"
    finally:
        for sock in [*slow, silent]:
            sock.close()
    for result in results:
        assert result["closed"], f"a slowloris connection was still open after {DEADLINE}s"
        # It had started a request, so it is told why before the connection closes.
        assert result["answer"].startswith(b"HTTP/1.1 408 "), result["answer"]
        body = json.loads(result["answer"].partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == 408 and "headers" in body["error"]["message"]
    assert http.post("/v1/completions", json=completion(server)).status_code == 200


def test_a_body_that_never_arrives_is_408(server):
    with connect(server) as sock:
        sock.sendall(head("/v1/completions", 100) + b'{"prompt": ')  # 11 of the 100 bytes announced
        status, body = read_response(sock)
    assert_error(status, body, 408, "body")


# ---------------------------------------------------------------------- huge bodies


def test_a_huge_declared_body_is_413_before_it_is_sent(server):
    with connect(server) as sock:
        sock.sendall(head("/v1/completions", 10**12))  # a terabyte announced, nothing sent
        status, body = read_response(sock)
    assert_error(status, body, 413, str(MAX_BODY))


def test_a_chunked_body_past_the_limit_is_413_without_reading_the_rest(server):
    piece = b"x" * 16384
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with connect(server) as sock:
        sock.sendall(head("/v1/chat/completions", None, chunked=True))
        for _ in range(MAX_BODY // len(piece) + 1):  # one piece past the limit, and no end chunk
            sock.sendall(chunk)
        status, body = read_response(sock)
    assert_error(status, body, 413, str(MAX_BODY))


# ---------------------------------------------------------------------- malformed JSON and Unicode


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, ["nested"]),  # past the parser's recursion limit
        (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", ["nested"]),
        (b'{"prompt": "w5 \\ud800"}', ["surrogate"]),  # valid JSON, not valid Unicode
        (b'{"prompt": "w5", "\\udfff": 1}', ["surrogate"]),
        (b'{"prompt": "w5 \xc0\xaf"}', ["UTF-8"]),  # an overlong encoding of "/"
        (b'{"prompt": "w5 \xed\xa0\x80"}', ["UTF-8"]),  # a surrogate encoded in UTF-8
        (b'{"prompt": "w5", "temperature": NaN}', ["NaN", "not valid JSON"]),
        (b'{"prompt": "w5", "x": -Infinity}', ["Infinity", "not valid JSON"]),
        (b"1", ["JSON object"]),
        (b'"a string"', ["JSON object"]),
        (b"null", ["JSON object"]),
        (b"true", ["JSON object"]),
        (b"[]", ["JSON object"]),
        (b"", ["not valid JSON"]),
        (b"\xef\xbb\xbf{}", ["not valid JSON"]),  # a UTF-8 byte-order mark
    ],
    ids=lambda value: repr(value)[:24] if isinstance(value, bytes) else "",
)
def test_malformed_json_is_400(http, raw, words):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_error(response.status_code, response.json(), 400, *words)


def test_deep_json_within_the_parser_limit_is_not_a_5xx(http, server):
    deep = '{"a": ' * 900 + "1" + "}" * 900  # under the parser's recursion limit: parsed, then handled
    chat = {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2}
    bodies = [
        ("/v1/completions", f'{{"prompt": "w5", "max_tokens": 2, "unknown": {deep}}}'),
        ("/v1/chat/completions", json.dumps(chat)[:-1] + f', "chat_template_kwargs": {{"k": {deep}}}}}'),
        ("/v1/chat/completions", json.dumps(chat)[:-1] + f', "response_format": {deep}}}'),
        ("/tokenize", f'{{"prompt": "w5", "extra": [{deep}]}}'),
    ]
    for path, raw in bodies:
        response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code < 500, response.text


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),  # what curl -d sends unless told otherwise
        ("multipart/form-data; boundary=x", 415),
        ("application/xml", 415),
        ("application/json; charset=utf-8", 200),
        ("application/vnd.api+json", 200),
        (None, 200),  # undeclared: read as JSON, as FastAPI does
    ],
)
def test_only_json_content_types_are_read(http, server, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    raw = json.dumps(completion(server)).encode()
    response = http.post("/v1/completions", content=raw, headers=headers)
    assert response.status_code == status, response.text
    if status == 415:
        assert_error(response.status_code, response.json(), 415, "application/json")


# ---------------------------------------------------------------------- values that reach the engine


@pytest.mark.parametrize(
    "extra",
    [
        {"repetition_penalty": 1e-320, "temperature": 1.0},  # rounds to 0 in float32: +inf logits
        {"repetition_penalty": 1e-40, "temperature": 2e-5},
        {"repetition_penalty": 1e300, "temperature": 1.0},  # rounds to inf
        {"min_tokens": 2, "temperature": 1.0, "stop_token_ids": list(range(300))},  # every token masked
    ],
)
def test_sampling_values_at_the_edges_of_float32_do_not_kill_the_engine(http, server, extra):
    response = http.post("/v1/completions", json=completion(server, **extra))
    assert response.status_code == 200, response.text
    assert http.get("/health").status_code == 200


# ---------------------------------------------------------------------- clients that leave


def start_request(server, stream: bool) -> socket.socket:
    # Four sequences of LONG tokens do not fit the 64 KV blocks together: they take turns (preemption),
    # so the request runs many times longer than the client below takes to leave.
    body = completion(
        server, prompt=random_prompt(8, seed=3), max_tokens=LONG, ignore_eos=True, stream=stream, n=4
    )
    raw = json.dumps(body).encode()
    sock = connect(server)
    sock.sendall(head("/v1/completions", len(raw)) + raw)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_mid_request_aborts_it_in_the_engine(server, stream):
    wait_for_metrics(server, lambda m: m["duoserve:num_requests_running"] == 0, "idle before the test")
    aborted = server.metrics()[ABORTED]
    sock = start_request(server, stream)
    try:
        if stream:  # leave after the first tokens arrived
            data = b""
            while b"data: {" not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        else:  # leave once the engine runs it
            wait_for_metrics(server, lambda m: m["duoserve:num_requests_running"] > 0, "the request running")
    finally:
        sock.close()
    idle = wait_for_metrics(server, lambda m: m["duoserve:num_requests_running"] == 0, "the request aborted")
    assert idle[ABORTED] > aborted
    assert idle["duoserve:kv_cache_usage_perc"] == 0


def test_no_5xx_and_no_traceback_after_all_that(http, server):
    assert http.post("/v1/completions", json=completion(server)).status_code == 200
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log and "engine died" not in log
