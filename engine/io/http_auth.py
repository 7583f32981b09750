"""The one way fleetdeck sends a key to an OpenAI-compatible server (vLLM, the small model of a task)."""

from __future__ import annotations

import os


def bearer(key: str | None) -> dict[str, str]:
    """The Authorization header for `key`, or none when there is no key."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def bearer_from_env(env_name: str | None) -> dict[str, str]:
    """The header for the key held in an environment variable a config names (the key is never in config)."""
    return bearer(os.environ.get(env_name, "")) if env_name else {}
