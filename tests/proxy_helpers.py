"""The routing proxy under test: a real uvicorn server in a thread with a real ledger, the router config the
proxy tests build, and their fake upstreams as fixtures (shared by tests/test_proxy.py and
tests/test_proxy_front_door.py, which import `slm` and `frontier` so pytest finds them in each module)."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from engine.router.config import RouterConfig
from engine.router.http_limits import uvicorn_limits
from engine.router.proxy import Router, create_app
from store.db import open_store
from store.ledger import LedgerWriter
from tests.fakes.fake_openai import ServerThread, frontier_app, slm_app

ROOT = Path(__file__).resolve().parents[1]


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


# --- the real `fleetdeck proxy` as a process, and full filesystems (tests/test_ledger_faults.py, test_ledger_cut.py)
@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `folder` (root only: CI and this machine run tests as root)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # a file still open: detach it


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the filesystem to its last byte (then give `leave` bytes back); the filler's path."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    if leave:
        os.ftruncate(fd, os.fstat(fd).st_size - leave)
    os.close(fd)
    return path


@dataclass
class Stop:
    stored: int
    journaled: int
    journal: str
    lost: int
    recorded: int
    line: str


STOP_LINE = re.compile(r"fleetdeck proxy stopped: (\d+) ledger row\(s\) stored this run, (\d+) held in the journal "
                       r"(\S+) for the next start, (\d+) lost \(of (\d+) recorded\).*")


class ProxyProcess:
    """`fleetdeck proxy` as systemd runs it, stopped with SIGTERM."""

    def __init__(self, config: Path, store: Path, port: int, launcher: tuple[str, ...] = ("-m", "fleetdeck")) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "proxy", "--router-config", str(config), "--port", str(port), "--store", str(store)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and self.proc.poll() is None, self.output()
            time.sleep(0.1)

    def ask(self, i: int) -> int:
        body = {"model": "tickets", "messages": [{"role": "user", "content": f"q{i} lp=-0.01"}]}
        return self.client.post("/v1/chat/completions", json=body).status_code

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics").text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(fleetdeck_ledger_\w+) ([\d.e+]+)$", text, re.M)}

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""

    def stop(self) -> tuple[Stop | None, str]:
        """SIGTERM; the process must exit 0 by itself (no time is asserted: only that it ends and what it says)."""
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(timeout=300) == 0, self.output()
        finally:
            self.kill()
        out = self.output()
        m = STOP_LINE.search(out)
        stop = Stop(int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5)), m.group(0)) if m else None
        return stop, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def router_toml(path: Path, slm_url: str, journal_dir: Path | None) -> Path:
    """A router config with one task on the small model at `slm_url`, its journal in `journal_dir` if given."""
    extra = f'journal_dir = "{journal_dir}"\n' if journal_dir else ""
    path.write_text(f"""
[proxy]
api_keys_env = "FD_NO_SUCH_ENV"
shutdown_grace_s = 1
{extra}
[[task]]
name = "tickets"
slm_base_url = "{slm_url}/v1"
slm_model = "tickets-v3"
confidence = "first_token"
threshold = 0.5
""")
    return path
