"""The router config (TOML), validated; errors name the file and the key."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomlkit
from pydantic import Field, field_validator, model_validator

from engine.audit import trail as audit
from store.analytics import TaskPolicy, iter_policies
from store.config_files import ConfigError, HomePath, Strict, load_toml_model, parse_toml_model

_log = logging.getLogger("fleetdeck.config")



class ProxySettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=4000, ge=1, le=65535)
    api_keys_env: str | None = "FLEETDECK_PROXY_KEYS"
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3)
    # Bounded: `inf` is valid TOML, and a window of infinite days is NaN in every figure drawn from it.
    retention_days: float = Field(default=30.0, gt=0, le=100 * 365)
    # Total bounds, retries included: a timeout that is not a bound is not a timeout.
    frontier_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="a request body must arrive within this")
    # Bounds that hold before authentication (engine/router/http_limits.py).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024,
                                  description="request line and headers together, at most")
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600,
                                    description="a request's line and headers must arrive within this")
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600,
                                    description="a stop's bound from the signal: requests in flight, then the ledger")
    # The ledger's journal on another filesystem than the store: a full store disk then leaves the
    # journal able to keep what the store cannot take. Absolute: systemd and a shell must mean one folder.
    journal_dir: HomePath | None = None

    @field_validator("journal_dir")
    @classmethod
    def _absolute_dir(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("expected an absolute folder path (e.g. /var/lib/fleetdeck/journal)")
        return v


class Pricing(Strict):
    slm_gpu_hour_usd: float = Field(default=0.0, ge=0, le=1e6)
    slm_gpus: int = Field(default=1, ge=0, le=1_000_000)


class Gate(Strict):
    """What an adapter version must show before `adapters promote` points the task at it."""

    eval: Path = Field(description="the task's held-out eval set (the calibrate format), relative to this file")
    target_accuracy: float = Field(gt=0, le=1, description="the small model's own accuracy on it, at least")
    min_items: int = Field(default=1, ge=1, description="an evaluation on fewer items does not count")

    def eval_path(self, config_path: str | Path) -> Path:
        """The eval file, a relative name read from the config's folder like the operator wrote it."""
        p = self.eval.expanduser()
        return p if p.is_absolute() else (Path(config_path).parent / p).resolve()


class Task(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")
    slm_base_url: str
    slm_model: str = Field(min_length=1)
    slm_api_key_env: str | None = None
    confidence: Literal["first_token", "mean_token", "min_token"] = "mean_token"
    threshold: float = Field(ge=0.0, le=1.0)
    # Two bounds with two meanings (issue 28). Both clocks start when the request is sent upstream, so
    # time a request waits inside fleetdeck never counts against the small model.
    slm_first_token_timeout_s: float = Field(
        default=2.0, gt=0, le=3600, description="a streamed answer's first token must arrive within this")
    slm_total_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="the whole answer (streamed or not) must end within this")
    # The tokens a streamed request's confidence is decided on before anything is sent to the client.
    # first_token always decides on one; None with mean_token/min_token: the whole answer (it buffers).
    confidence_window_tokens: int | None = Field(default=None, ge=1, le=65536)
    frontier_model: str | None = None
    frontier_api_base: str | None = None
    frontier_api_key_env: str | None = None
    # For frontier models litellm's bundled price map does not know (on-prem hosted_vllm/... included).
    frontier_input_usd_per_mtok: float | None = Field(default=None, ge=0, le=1e6)
    frontier_output_usd_per_mtok: float | None = Field(default=None, ge=0, le=1e6)
    store_text: bool = False
    # Escalation-drift alerting (read by reports and the Router screen).
    baseline_days: float = Field(default=TaskPolicy.baseline_days, gt=0, le=3660)
    recent_hours: float = Field(default=TaskPolicy.recent_hours, gt=0, le=24 * 366)
    drift_threshold_pp: float = Field(default=TaskPolicy.drift_threshold_pp, gt=0, le=100)
    gate: Gate | None = None

    @model_validator(mode="before")
    @classmethod
    def _deprecated_slm_timeout(cls, data: object) -> object:
        # slm_timeout_s used to bound the whole generation, which escalated every long healthy answer;
        # it now means what operators set it for, the wait for the small model to start answering.
        if isinstance(data, dict) and "slm_timeout_s" in data:
            data = dict(data)
            old = data.pop("slm_timeout_s")
            if "slm_first_token_timeout_s" not in data:
                data["slm_first_token_timeout_s"] = old
            _log.warning("task %s: slm_timeout_s is deprecated; it is read as slm_first_token_timeout_s "
                         "(see also slm_total_timeout_s)", data.get("name", "?"))
        return data

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "Task":
        if self.slm_total_timeout_s < self.slm_first_token_timeout_s:
            raise ValueError(f"slm_total_timeout_s ({self.slm_total_timeout_s:g}) must be at least "
                             f"slm_first_token_timeout_s ({self.slm_first_token_timeout_s:g})")
        return self

    def window_tokens(self) -> int | None:
        """How many tokens a streamed answer's confidence is decided on; None: the whole answer."""
        return 1 if self.confidence == "first_token" else self.confidence_window_tokens

    def window_label(self) -> str:
        n = self.window_tokens()
        return "whole_answer" if n is None else ("first_token" if n == 1 else f"first_{n}_tokens")

    @field_validator("slm_base_url", "frontier_api_base")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return v.rstrip("/") if v else v


class RouterConfig(Strict):
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    pricing: Pricing = Field(default_factory=Pricing)
    task: list[Task] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tasks(self) -> "RouterConfig":
        names = [t.name for t in self.task]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        return self

    def task_by_name(self, name: str) -> Task | None:
        return next((t for t in self.task if t.name == name), None)


def load_router_config(path: str | Path) -> RouterConfig:
    return load_toml_model(path, RouterConfig)


def api_keys(settings: ProxySettings) -> set[str]:
    if not settings.api_keys_env:
        return set()
    raw = os.environ.get(settings.api_keys_env, "")
    return {k.strip() for k in raw.split(",") if k.strip()}


def is_loopback(host: str) -> bool:
    """A loopback address or the name `localhost`; a name that merely starts with "127." is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def set_task_threshold(path: str | Path, task: str, threshold: float) -> None:
    """Rewrite one task's `threshold` in the router TOML, keeping comments and layout; validate first."""
    try:
        old = next((t.threshold for t in load_router_config(path).task if t.name == task), None)
    except Exception:
        old = None
    with audit.audited("router.threshold", task, refusals=(ValueError, KeyError), config=str(path), task=task,
                       old=old, new=threshold):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        set_task_field(path, task, "threshold", round(threshold, 4))


def set_task_field(path: str | Path, task: str, key: str, value: object) -> None:
    """Rewrite one key of one [[task]] in place and atomically; the result must load, or nothing is written.
    Callers audit: this is the mechanism, not the action."""
    # tomlkit edits the document in place: comments, order and layout stay as the operator wrote them.
    p = Path(path)
    doc = tomlkit.parse(p.read_text(encoding="utf-8"))
    entry = next((t for t in doc.get("task", []) if t.get("name") == task), None)
    if entry is None:
        raise KeyError(f"no [[task]] named {task!r} in {p}")
    entry[key] = value
    text = tomlkit.dumps(doc)
    parse_toml_model(p, text, RouterConfig)  # never write a config the proxy would refuse
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)


@dataclass
class RouterSettings:
    """What the analytics need from a router config: pricing, drift windows, thresholds."""

    gpu_hour_usd: float = 0.0
    gpus: int = 0
    policies: dict[str, TaskPolicy] = field(default_factory=dict)  # task name -> its drift policy
    thresholds: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # task name -> the small model it asks now
    windows: dict[str, str] = field(default_factory=dict)  # task name -> Task.window_label()
    journal_dir: Path | None = None  # where the proxy's ledger journal is, when not beside the store
    error: str | None = None  # a config that could not be read, or none at all


def load_router_settings(path: Path | None) -> RouterSettings:
    """Never raises: a missing or broken config gives defaults and says why in `error`."""
    if path is None or not Path(path).exists():
        return RouterSettings(error=f"no router config at {path}: the local fleet's cost counts as $0.00")
    try:
        cfg = load_router_config(path)
    except ConfigError as exc:
        return RouterSettings(error=str(exc))
    return RouterSettings(cfg.pricing.slm_gpu_hour_usd, cfg.pricing.slm_gpus, iter_policies(cfg.task),
                          {t.name: t.threshold for t in cfg.task}, {t.name: t.slm_model for t in cfg.task},
                          {t.name: t.window_label() for t in cfg.task}, cfg.proxy.journal_dir)
