"""Running the proxy: config, store and ledger, then uvicorn until SIGINT/SIGTERM (which flush the ledger)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import uvicorn

from engine.router.config import RouterConfig, api_keys, is_loopback
from engine.router.http_limits import uvicorn_limits
from engine.router.proxy import Router, create_app
from store.db import open_store
from store.ledger import LedgerWriter


class ProxyStartError(Exception):
    """The proxy cannot start; the message says why and what to do."""


def check_can_start(config: RouterConfig, host: str, port: int, config_path: Path | None = None) -> None:
    if not is_loopback(host) and not api_keys(config.proxy):
        env = config.proxy.api_keys_env or "[proxy] api_keys_env"
        raise ProxyStartError(
            f"refusing to listen on {host} without API keys: set {env} to a comma-separated list of keys "
            "(clients send Authorization: Bearer <key>), or bind to 127.0.0.1"
        )
    check_journal_dir(config, config_path)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ProxyStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port") from exc


def check_journal_dir(config: RouterConfig, config_path: Path | None = None) -> None:
    """`[proxy] journal_dir` is a folder only this user can write (made 0700 when missing), or the proxy does
    not start: a journal that cannot be written leaves the ledger to memory alone, and one in a folder others
    can write (/tmp) could be swapped for a link. A folder that exists is never chmodded: it may not be ours."""
    folder = config.proxy.journal_dir
    if folder is None:
        return
    where = f"[proxy] journal_dir = {str(folder)!r}"
    where = f"{config_path}: {where}" if config_path else where
    if folder.exists() and not folder.is_dir():
        raise ProxyStartError(f"{where}: not a folder; name a folder for the ledger's journal")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.stat()
    except OSError as exc:
        raise ProxyStartError(f"{where}: cannot make the folder: {exc.strerror or exc}") from exc
    if st.st_uid != os.getuid():
        raise ProxyStartError(f"{where}: the folder belongs to another user (uid {st.st_uid}); "
                              "use one of this user's own")
    if st.st_mode & 0o022:
        raise ProxyStartError(f"{where}: other users can write to the folder (mode {st.st_mode & 0o7777:o}); "
                              "use a folder only this user can write (chmod 700)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ProxyStartError(f"{where}: not writable by this user")


def serve(config: RouterConfig, store_path: Path, host: str | None = None, port: int | None = None,
          config_path: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT; then finish requests in flight and store the ledger, both within
    `shutdown_grace_s` of the signal (plus one last store attempt), checkpoint the store's WAL, print what
    the ledger kept and return 0."""
    host = host or config.proxy.host
    port = port or config.proxy.port
    check_can_start(config, host, port, config_path)
    store = open_store(store_path)
    ledger = LedgerWriter(store, retention_days=config.proxy.retention_days, journal_dir=config.proxy.journal_dir)
    router = Router(config, ledger, config_path=config_path)
    app = create_app(router)
    # uvicorn annotates timeout_graceful_shutdown as int but waits on it as a float timeout: the grace is kept exact.
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                       timeout_graceful_shutdown=config.proxy.shutdown_grace_s,  # type: ignore[arg-type]
                       server_header=False,
                       **uvicorn_limits(config.proxy))
    )
    # The grace is counted from the signal: uvicorn spends it on requests in flight, the ledger gets the rest.
    handle_exit = server.handle_exit

    def on_exit(sig: int, frame: object) -> None:
        router.stop_requested(time.monotonic())
        handle_exit(sig, frame)  # type: ignore[arg-type]

    server.handle_exit = on_exit  # type: ignore[method-assign]
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place that
    # re-raise lands here instead of killing the process before the store is closed.
    stopped: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    print(f"fleetdeck proxy on http://{host}:{port}/v1 · {len(config.task)} task(s) · ledger {store_path}"
          f" · journal {ledger.journal}", flush=True)
    try:
        server.run()
    finally:
        # Already closed by the app's shutdown, unless a second Ctrl-C skipped it: then closed here.
        report = ledger.close(router.ledger_close_bound())
        store.close()
    if stopped or server.should_exit:
        print(f"fleetdeck proxy stopped: {report.summary()}", flush=True)
    return 0
