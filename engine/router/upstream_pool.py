"""The proxy's HTTP clients for its upstreams: per upstream host, several small connection pools, not one big one.

Why (issue 28, measured in docs/architecture.md): httpcore's pool (1.0.x) re-scans its connections on every
request it admits and every response it releases, and its keep-alive check counts all connections once for
each idle one, so one call costs O(connections x idle connections). At 256 concurrent streams through one pool
that is ~65,000 checks per admission, and with fewer keep-alive slots than streams every released connection
is closed and a new one opened for the next request. Shards of SHARD_CONNECTIONS connections keep each scan
at most SHARD_CONNECTIONS^2 and keep every connection alive (keep-alive slots = connections); requests are
spread round-robin, which for one host's similar requests keeps the shards evenly loaded.

All shards share one TLS context: httpx makes (and loads the CA bundle into) one per client otherwise, ~40 ms
of CPU each, 32 times over on the event loop when a host is first used.
"""

from __future__ import annotations

import itertools
import ssl
from dataclasses import dataclass, field
from typing import Iterator

import httpx

SHARD_CONNECTIONS = 16  # per pool: the quadratic scan stays ~250 checks
HOST_CONNECTIONS = 512  # per upstream host, all shards together (the single pool's limit before)


@dataclass
class _Host:
    clients: list[httpx.AsyncClient]
    turn: Iterator[int] = field(default_factory=itertools.count)

    def next(self) -> httpx.AsyncClient:
        return self.clients[next(self.turn) % len(self.clients)]


class UpstreamClients:
    """`for_url(url)` gives the client to send a request to that URL with; `aclose()` closes them all."""

    def __init__(self, host_connections: int = HOST_CONNECTIONS, shard_connections: int = SHARD_CONNECTIONS,
                 timeout: float = 30.0) -> None:
        self.shard_connections = max(1, min(shard_connections, host_connections))
        self.shards = max(1, host_connections // self.shard_connections)
        self.timeout = timeout
        self._hosts: dict[tuple[str, str, int | None], _Host] = {}
        self._tls: ssl.SSLContext | None = None  # made on first use, the same one for every client
        self._by_url: dict[str, _Host] = {}

    def _new_client(self) -> httpx.AsyncClient:
        n = self.shard_connections
        if self._tls is None:
            # What each client would make for itself (verify=True, trust_env=False): certifi's CA bundle.
            self._tls = httpx.create_ssl_context(verify=True, trust_env=False)
        return httpx.AsyncClient(
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=httpx.Timeout(self.timeout),
            verify=self._tls,
            trust_env=False,  # never route SLM traffic through an environment proxy
        )

    def for_url(self, url: str) -> httpx.AsyncClient:
        host = self._by_url.get(url)  # the tasks' slm_base_url, on every request: each parsed once
        if host is None:
            u = httpx.URL(url)
            key = (u.scheme, u.host, u.port)
            host = self._hosts.get(key)
            if host is None:
                # Made on first use (no await: two requests cannot both make one); the pools connect lazily.
                host = self._hosts[key] = _Host([self._new_client() for _ in range(self.shards)])
            self._by_url[url] = host
        return host.next()

    def hosts(self) -> int:
        return len(self._hosts)

    async def aclose(self) -> None:
        for host in self._hosts.values():
            for client in host.clients:
                await client.aclose()
        self._hosts.clear()
        self._by_url.clear()
