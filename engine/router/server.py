"""Running the proxy: config, store and ledger, then uvicorn until SIGINT/SIGTERM (which flush the ledger)."""

from __future__ import annotations

import socket
from pathlib import Path

from engine.router.config import RouterConfig, api_keys, is_loopback


class ProxyStartError(Exception):
    """The proxy cannot start; the message says why and what to do."""


def check_can_start(config: RouterConfig, host: str, port: int) -> None:
    if not is_loopback(host) and not api_keys(config.proxy):
        env = config.proxy.api_keys_env or "[proxy] api_keys_env"
        raise ProxyStartError(
            f"refusing to listen on {host} without API keys: set {env} to a comma-separated list of keys "
            "(clients send Authorization: Bearer <key>), or bind to 127.0.0.1"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ProxyStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port") from exc


def serve(config: RouterConfig, store_path: Path, host: str | None = None, port: int | None = None,
          config_path: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT; then finish requests in flight (up to `shutdown_grace_s`), store every
    ledger row, checkpoint the store's WAL and return 0."""
    import signal

    import uvicorn

    from engine.router.http_limits import uvicorn_limits
    from engine.router.proxy import Router, create_app
    from store.db import open_store
    from store.ledger import LedgerWriter

    host = host or config.proxy.host
    port = port or config.proxy.port
    check_can_start(config, host, port)
    store = open_store(store_path)
    ledger = LedgerWriter(store, retention_days=config.proxy.retention_days)
    app = create_app(Router(config, ledger, config_path=config_path))
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                       timeout_graceful_shutdown=config.proxy.shutdown_grace_s, server_header=False,
                       **uvicorn_limits(config.proxy))
    )
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place that
    # re-raise lands here instead of killing the process before the store is closed.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    print(f"fleetdeck proxy on http://{host}:{port}/v1 · {len(config.task)} task(s) · ledger {store_path}", flush=True)
    try:
        server.run()
    finally:
        ledger.close()
        store.close()
    if stopped or server.should_exit:
        print(f"fleetdeck proxy stopped: {ledger.written} ledger row(s) stored this run"
              + (f", {ledger.pending} held in the journal for the next start" if ledger.pending else ""), flush=True)
    return 0
