"""The routing proxy under test: a real uvicorn server in a thread with a real ledger, the router config the
proxy tests build, and their fake upstreams as fixtures (shared by tests/test_proxy.py and
tests/test_proxy_front_door.py, which import `slm` and `frontier` so pytest finds them in each module)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.router.config import RouterConfig
from engine.router.http_limits import uvicorn_limits
from engine.router.proxy import Router, create_app
from store.db import open_store
from store.ledger import LedgerWriter
from tests.fakes.fake_openai import ServerThread, frontier_app, slm_app


@pytest.fixture(scope="module")
def slm():
    server = ServerThread(slm_app()).start()
    yield server
    server.app.state.release.set()  # a held stream, if a test failed half-way, ends
    server.stop()


@pytest.fixture(scope="module")
def frontier():
    server = ServerThread(frontier_app()).start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(slm_url: str, frontier_url: str | None, **task: Any) -> RouterConfig:
    base = {
        "name": "tickets", "slm_base_url": f"{slm_url}/v1", "slm_model": "tickets-v3",
        "confidence": "mean_token", "threshold": 0.85, "slm_first_token_timeout_s": 2.0,
    }
    if frontier_url:
        base.update(frontier_model="openai/gpt-4o", frontier_api_base=f"{frontier_url}/v1",
                    frontier_api_key_env="FAKE_FRONTIER_KEY")
    base.update(task)
    return RouterConfig.model_validate({"proxy": {"api_keys_env": None}, "pricing": {"slm_gpu_hour_usd": 1.2, "slm_gpus": 2},
                                        "task": [base]})


class Proxy:
    def __init__(self, config: RouterConfig, store_path: Path) -> None:
        self.store_path = store_path
        self.store = open_store(store_path)
        self.ledger = LedgerWriter(self.store, flush_every_s=0.05)
        self.router = Router(config, self.ledger)
        # The proxy's own header limits, as `fleetdeck proxy` serves it.
        self.server = ServerThread(create_app(self.router), **uvicorn_limits(config.proxy)).start()
        self.client = httpx.Client(base_url=self.server.url, timeout=30, trust_env=False)

    def post(self, content: str = "hello", headers: dict | None = None, **body: Any) -> httpx.Response:
        payload = {"model": "tickets", "messages": [{"role": "user", "content": content}], **body}
        return self.client.post("/v1/chat/completions", json=payload, headers=headers or {})

    def rows(self) -> list[dict[str, Any]]:
        """Stop the proxy (its shutdown flushes the ledger), then read every row."""
        self.stop()
        store = open_store(self.store_path)
        rows = store.query("SELECT * FROM requests ORDER BY ts")
        store.close()
        return rows

    def stop(self) -> None:
        if self.server.thread.is_alive():
            self.client.close()
            self.server.stop()


class Proxies:
    """The proxies one test starts, each on its own store in `folder`; `close()` stops them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[Proxy] = []

    def __call__(self, config: RouterConfig) -> Proxy:
        p = Proxy(config, self.folder / f"fd{len(self.made)}.db")
        self.made.append(p)
        return p

    def close(self) -> None:
        for p in self.made:
            p.stop()
