"""Bounds on what a client may make the proxy read before a request exists: the header size and a deadline
for the headers to arrive. Both hold before authentication, so they hold against anyone who can connect.

httptools, uvicorn's default parser when installed, has no bound on headers at all, so the proxy names h11;
h11's own bound (`h11_max_incomplete_event_size`) holds only while the headers are incomplete, so headers
over the limit that arrive in one read would pass it: `HeaderDeadline` checks each request head against
`max_header_bytes` before h11 parses it, and answers 431 and closes (h11's bound stays as a backstop).
uvicorn has no deadline for headers (its keep-alive timeout covers only the idle time after a response),
so a client sending one byte every few seconds would hold a connection forever: `HeaderDeadline` closes a
connection whose request line and headers are not complete within `header_timeout_s` of its first byte
being awaited (the connection opening, or the previous response ending): with a 408 first when part of a
request has arrived, silently when none has.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.router.config import ProxySettings

_END_OF_HEAD = re.compile(rb"\n\r?\n")  # h11 takes bare LF line ends too


def _error_body(message: str, code: str) -> bytes:
    """OpenAI's error shape, as the app's own refusals (an OpenAI client reads `error.message` from any 4xx)."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


def _error_response(status: bytes, message: str, code: str) -> bytes:
    body = _error_body(message, code)
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(body), body))


_TIMEOUT_RESPONSE = _error_response(b"408 Request Timeout", "The request's headers did not arrive in time.",
                                    "request_timeout")
_TOO_LARGE_RESPONSE = _error_response(b"431 Request Header Fields Too Large",
                                      "The request's line and headers are over the size limit.", "headers_too_large")
# uvicorn answers what h11 cannot parse (a bad request line, header, Content-Length or chunk) with text.
_MALFORMED = _error_body("Malformed HTTP/1.1 request: its request line, a header, Content-Length or "
                         "chunked framing could not be parsed.", "malformed_request")


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, with a size bound and a deadline on each request's line and headers."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own narrowing
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused or timed out already: nothing more is read
            return
        if self.conn.their_state is h11.IDLE and not self._head_fits(data):
            self._disarm()
            self.transport.write(_TOO_LARGE_RESPONSE)
            self.transport.close()
            return
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm()  # bytes of a request whose headers are not complete yet (the clock is not reset)
        else:
            self._disarm()  # headers complete: the body has its own deadline (body_timeout_s)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this connection: uvicorn's keep-alive timeout bounds the wait for its first
        # byte, this deadline the time until its headers are complete.
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._disarm()
            self._arm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 refused, in OpenAI's shape (and, as uvicorn's, closing)."""
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_MALFORMED)),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=_MALFORMED), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:  # a response had begun already: nothing more can be said on it
            pass
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_fits(self, data: bytes) -> bool:
        """Whether the request head being read (h11's buffer, then `data`) ends within the limit."""
        buffered = self.conn.trailing_data[0]
        if len(buffered) + len(data) <= self.max_header_bytes:
            return True
        return _END_OF_HEAD.search((buffered + data)[: self.max_header_bytes + 2]) is not None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # A client that began a request is told why; an idle kept-alive connection is closed silently
        # (a pooled client would read an unasked-for 408 as the answer to its next request).
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def uvicorn_limits(settings: ProxySettings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that apply the proxy's header bounds."""
    protocol = type("ProxyHeaderDeadline", (HeaderDeadline,), {"header_timeout_s": settings.header_timeout_s,
                                                                "max_header_bytes": settings.max_header_bytes})
    # ws="none": an Upgrade: websocket request is served as the plain HTTP request it also is (the proxy
    # has no WebSocket route; uvicorn would otherwise answer it with a bare 403).
    return {"http": protocol, "h11_max_incomplete_event_size": settings.max_header_bytes, "ws": "none"}
