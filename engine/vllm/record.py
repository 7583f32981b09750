"""A vLLM server's record in the store (a managed process, local or a Slurm job) and the probe of its HTTP API."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import httpx

from engine.io.http_auth import bearer
from engine.managed import ManagedRecord


class ServerState(StrEnum):
    """A server's state, stored as its text."""

    STARTING = "starting"  # launched (or submitted to Slurm); not answering yet
    READY = "ready"  # its own process answers /health
    CRASHED = "crashed"  # it ended without being stopped (the reason says why)
    STOPPED = "stopped"  # stopped by an operator


LIVE = (ServerState.STARTING, ServerState.READY)
ENDED = (ServerState.STOPPED, ServerState.CRASHED)


@dataclass
class ServerRecord(ManagedRecord):
    KIND: ClassVar[str] = "server"
    LISTED_BY: ClassVar[str] = "fleetdeck serve ls"
    STATES: ClassVar[type[ServerState]] = ServerState

    state: ServerState

    @property
    def base_url(self) -> str:
        host = self.slurm.host if self.slurm is not None else None  # a Slurm server listens on the node Slurm chose
        return f"http://{host or '127.0.0.1'}:{self.port}"

    @property
    def served_name(self) -> str:
        return str(self.spec.get("served_model_name") or self.spec.get("model", ""))

    @property
    def api_key(self) -> str | None:
        """The server's key, from the environment variable its profile names (never stored)."""
        env_name = self.spec.get("api_key_env")
        return os.environ.get(env_name, "") or None if env_name else None

    def to_json(self) -> dict[str, Any]:
        d = self.to_doc()
        d["base_url"] = self.base_url
        return d


def probe(rec: ServerRecord, timeout: float = 1.0) -> bool:
    try:
        if httpx.get(f"{rec.base_url}/health", timeout=timeout, trust_env=False).status_code != 200:
            return False
        return httpx.get(f"{rec.base_url}/v1/models", timeout=timeout, headers=bearer(rec.api_key),
                         trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


