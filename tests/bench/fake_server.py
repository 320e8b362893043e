"""A small but real OpenAI-style streaming HTTP server for the bench tests.

It speaks HTTP/1.1 over asyncio streams (keep-alive, chunked transfer encoding) on 127.0.0.1 in a
background thread, and streams completions with known timings: the first token after `ttft` seconds,
then one chunk every `gap` seconds carrying `tokens_per_chunk` tokens. Token i's text is "w{i} ".
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MODEL = "fake-model"


@dataclass
class FakeServer:
    ttft: float = 0.05
    gap: float = 0.02
    tokens_per_chunk: int = 1
    send_usage: bool = True  # honour stream_options.include_usage
    fail_status: int | None = None  # answer every POST with this HTTP status
    error_after_chunks: int | None = None  # send an SSE error event after this many content chunks
    bodies: list[dict[str, Any]] = field(default_factory=list)
    max_in_flight: int = 0
    base_url: str = ""
    _in_flight: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> str:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()
            self._loop.run_forever()
            # Handlers still streaming (a client that timed out) are cancelled so they close cleanly.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self.base_url

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    # -- HTTP ----------------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: serve requests until the client closes
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self._route(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/v1/models":
            await _send_json(writer, 200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            return
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            await _send_json(writer, 404, {"error": {"message": f"no route {path}"}})
            return
        body = json.loads(raw)
        self.bodies.append(body)
        if self.fail_status is not None:
            await _send_json(
                writer, self.fail_status, {"error": {"message": "boom", "code": self.fail_status}}
            )
            return
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            await self._stream(body, path.endswith("chat/completions"), writer)
        finally:
            self._in_flight -= 1

    async def _stream(self, body: dict[str, Any], chat: bool, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        n_tokens = int(body["max_tokens"])
        if chat:  # role-only first chunk, sent at once: it must not count as the first token
            await _send_event(writer, _chat_chunk({"role": "assistant", "content": ""}))
        start = time.perf_counter()
        sent, chunk_no = 0, 0
        while sent < n_tokens:
            k = min(self.tokens_per_chunk, n_tokens - sent)
            delay = self.ttft + chunk_no * self.gap - (time.perf_counter() - start)
            await asyncio.sleep(max(0.0, delay))
            if self.error_after_chunks is not None and chunk_no == self.error_after_chunks:
                await _send_event(writer, {"error": {"message": "engine died", "code": 500}})
                break
            text = "".join(f"w{i} " for i in range(sent, sent + k))
            finish = "length" if sent + k == n_tokens else None
            chunk = _chat_chunk({"content": text}, finish) if chat else _text_chunk(text, finish)
            await _send_event(writer, chunk)
            sent, chunk_no = sent + k, chunk_no + 1
        if self.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": sent}
            await _send_event(writer, {"choices": [], "usage": usage})
        await _send_raw(writer, "data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _prompt_tokens(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"])
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.split())


def _text_chunk(text: str, finish: str | None) -> dict[str, Any]:
    return {
        "object": "text_completion",
        "model": MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def _chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


async def _send_raw(writer: asyncio.StreamWriter, text: str) -> None:
    data = text.encode()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _send_event(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    await _send_raw(writer, f"data: {json.dumps(obj)}\n\n")


async def _send_json(writer: asyncio.StreamWriter, status: int, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()
