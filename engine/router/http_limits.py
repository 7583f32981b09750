"""Bounds on what a client may make the proxy read before a request exists: the header size and a deadline
for the headers to arrive. Both hold before authentication, so they hold against anyone who can connect.

uvicorn's h11 parser bounds the headers (`h11_max_incomplete_event_size`: past it, a 400 and the connection
is closed); httptools, uvicorn's default when installed, has no bound at all, so the proxy names h11.
uvicorn has no deadline for headers (its keep-alive timeout covers only the idle time after a response),
so a client sending one byte every few seconds would hold a connection forever: `HeaderDeadline` closes a
connection whose request line and headers are not complete within `header_timeout_s` of its first byte
being awaited (the connection opening, or the previous response ending), with a 408 first.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.router.config import ProxySettings

_LATE = b"request headers did not arrive in time"
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_LATE), _LATE))


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on each request's line and headers."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
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

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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
        if self.conn.our_state is h11.IDLE:  # nothing of ours is half-sent on this connection
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def uvicorn_limits(settings: ProxySettings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that apply the proxy's header bounds."""
    protocol = type("ProxyHeaderDeadline", (HeaderDeadline,), {"header_timeout_s": settings.header_timeout_s})
    return {"http": protocol, "h11_max_incomplete_event_size": settings.max_header_bytes}
