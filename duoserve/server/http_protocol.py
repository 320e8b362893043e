"""uvicorn's HTTP/1.1 protocol (h11), with a deadline on a request's headers.

uvicorn has no such deadline: its keep-alive timer only runs between a response and the next byte, so a
client that opens a connection and sends nothing, or sends its headers one byte at a time (slowloris),
holds the connection forever, and enough such clients exhaust the process's file descriptors. Here a
request's headers must be complete within `timeout` seconds of the connection being ready for them (when
it opens, or when the previous response is done); otherwise the client gets a 408 (if it had started a
request) and the connection is closed. A slow body is bounded in the handler (OpenAIServer._read_body).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from duoserve.server.protocol import APIError

# How long a connection cut off with a 408 keeps draining what its client sends, before it is closed.
_LINGER_SECONDS = 5.0


def _timeout_response() -> bytes:
    body = json.dumps(APIError(408, "the request headers did not arrive in time").body()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers are not in within `timeout` seconds."""

    timeout: float = 10.0  # set per server by with_header_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._started = False  # a byte of a new request arrived since the deadline was armed
        self._lingering = False  # the 408 is out: what the client still sends is dropped
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        # IDLE: these bytes start a request (not the rest of a body the handler refused to read).
        if self.conn.their_state is h11.IDLE:
            self._started = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        # Armed before super(): that may already start a pipelined request, whose headers are then in.
        self._arm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        """Headers of a request are in and its response is not done: the handler owns the connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._started = False
        self._deadline = self.loop.call_later(self.timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._in_request() or self.transport.is_closing():
            return
        if not (self._started and self.transport.can_write_eof()):
            self.transport.close()
            return
        # Lingering close: the 408, then FIN, while reading on for a while. Closing at once with the
        # client's unread bytes in the buffer would send a RST, which can destroy the 408 in flight.
        self.transport.write(_timeout_response())
        self.transport.write_eof()
        self._lingering = True
        self.loop.call_later(_LINGER_SECONDS, self.transport.close)


def with_header_timeout(timeout: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class to give uvicorn.Config(http=...), with this server's header deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"timeout": timeout})
