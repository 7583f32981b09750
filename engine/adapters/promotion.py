"""Promotion and rollback: point a router task at an adapter version that passed the task's gate.

A promotion (1) checks the gate: an evaluation of these exact weights on the task's eval file as it is
now, meeting the target; (2) loads the version into every ready server that can serve it, keeping what
was there; (3) checks the task's own endpoint lists it; (4) rewrites the task's `slm_model` in the
router config; (5) records the promotion; (6) asks the running proxy to reload, so requests flow on with
no restart. A rollback is the same steps back to the model the last promotion replaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from engine.adapters import registry as adapters
from engine.audit import trail as audit
from engine.audit.who import identity
from engine.adapters.evaluation import compatible_servers, ensure_loaded, evals_of, file_sha256
from engine.adapters.registry import Adapter, AdapterError, integrity_problem
from engine.io.http_auth import bearer, bearer_from_env
from engine.router.config import api_keys, load_router_config, set_task_field

if TYPE_CHECKING:
    from store.db import Store


class PromotionError(Exception):
    """A promotion or rollback refused; the message says what is missing and what to run."""


@dataclass
class Outcome:
    task: str
    old: str
    new: str
    servers: list[str] = field(default_factory=list)
    reload: str = ""
    eval_id: int | None = None

    def lines(self) -> list[str]:
        where = ", ".join(self.servers) or "no server fleetdeck runs (the task's endpoint already lists it)"
        return [f"{self.task}: {self.old} -> {self.new}", f"  loaded in: {where}", f"  proxy: {self.reload}"]


def gate_check(store: Store, config_path: Path, task: Any, adapter: Adapter) -> dict[str, Any]:
    """The evaluation that lets this version through the task's gate, or PromotionError saying why not."""
    gate = task.gate
    if gate is None:
        raise PromotionError(f"task {task.name} has no gate: add a [task.gate] with `eval` (its held-out set) and "
                             "`target_accuracy` to the router config before promoting into it")
    eval_file = gate.eval_path(config_path)
    try:
        eval_sha = file_sha256(eval_file)
    except OSError as exc:
        raise PromotionError(f"task {task.name}'s gate eval {eval_file} cannot be read: {exc.strerror or exc}") from exc
    content = (adapter.metadata or {}).get("content_sha256")
    runs = [e for e in evals_of(store, adapter.name) if e["eval_sha256"] == eval_sha and e["content_sha256"] == content]
    if not runs:
        raise PromotionError(f"{adapter.name} has no evaluation on the eval set of task {task.name} as it is now ({eval_file}): "
                             f"run `fleetdeck adapters eval {adapter.name} --eval {eval_file} --task {task.name}`")
    best = runs[0]  # the newest: a later, worse result is not hidden by an older, better one
    if best["items"] < gate.min_items:
        raise PromotionError(f"{adapter.name}'s evaluation has {best['items']} items; {task.name}'s gate asks for "
                             f"{gate.min_items}")
    if best["accuracy"] + 1e-12 < gate.target_accuracy:
        raise PromotionError(f"{adapter.name} scored {best['accuracy'] * 100:.1f}% on the eval set of task {task.name}; its gate "
                             f"asks for {gate.target_accuracy * 100:.1f}% (evaluation #{best['id']})")
    return best


def _listed(base_url: str, name: str, api_key_env: str | None) -> bool:
    try:
        r = httpx.get(f"{base_url}/models", headers=bearer_from_env(api_key_env), timeout=10, trust_env=False)
        r.raise_for_status()
        return any(m.get("id") == name for m in r.json().get("data", []))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def _serve_everywhere(store: Store, task: Any, adapter: Adapter) -> list[str]:
    """Load the version where it can run; the task's endpoint must list it afterwards."""
    servers = compatible_servers(store, adapter)
    loaded = []
    for rec in servers:
        ensure_loaded(rec, adapter)
        loaded.append(rec.id)
    if not _listed(task.slm_base_url, adapter.name, task.slm_api_key_env):
        raise PromotionError(f"{task.slm_base_url} (task {task.name}'s slm_base_url) does not list {adapter.name}"
                             + (f" after loading it into {', '.join(loaded)}" if loaded else
                                "; no ready server fleetdeck runs can serve it (LoRA on, same base model)")
                             + "; the task still points at its current model")
    return loaded


def history(store: Store, task: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Promotions and rollbacks, newest first."""
    if task is None:
        return store.query("SELECT * FROM promotions ORDER BY ts DESC, id DESC LIMIT ?", (limit,))
    return store.query("SELECT * FROM promotions WHERE task = ? ORDER BY ts DESC, id DESC LIMIT ?", (task, limit))


def _record(store: Store, task: str, kind: str, old: str, new: str, eval_id: int | None) -> None:
    store.insert("promotions", {"ts": time.time(), "task": task, "kind": kind, "from_model": old, "to_model": new,
                                "eval_id": eval_id, "actor": identity()["actor"]})


def _task(config_path: Path, name: str) -> Any:
    cfg = load_router_config(config_path)
    task = cfg.task_by_name(name)
    if task is None:
        raise PromotionError(f"no task {name!r} in {config_path} (tasks: {', '.join(t.name for t in cfg.task)})")
    return cfg, task


def promote(store: Store, config_path: Path, task_name: str, ref: str, roots: list[Path]) -> Outcome:
    cfg, task = _task(config_path, task_name)
    with audit.audited("adapter.promote", task_name, refusals=(PromotionError, AdapterError), config=str(config_path),
                       task=task_name, old=task.slm_model, new=ref) as entry:
        adapter = adapters.by_name(roots, ref)
        if adapter.version is None:
            raise PromotionError(f"{adapter.name} is not a registered version: `fleetdeck adapters import` it first")
        entry.params["new"] = adapter.name
        if adapter.name == task.slm_model:
            raise PromotionError(f"task {task_name} already points at {adapter.name}")
        problem = integrity_problem(adapter)
        if problem:
            raise PromotionError(problem)
        passed = gate_check(store, config_path, task, adapter)
        entry.params["eval"] = passed["id"]
        servers = _serve_everywhere(store, task, adapter)
        entry.params["servers"] = ",".join(servers)
        set_task_field(config_path, task_name, "slm_model", adapter.name)
        _record(store, task_name, "promote", task.slm_model, adapter.name, passed["id"])
    return Outcome(task_name, task.slm_model, adapter.name, servers, reload_proxy(cfg.proxy, config_path), passed["id"])


def rollback(store: Store, config_path: Path, task_name: str, roots: list[Path]) -> Outcome:
    """Back to the model the task's newest promotion replaced (which may itself be a version or a plain name)."""
    cfg, task = _task(config_path, task_name)
    with audit.audited("adapter.rollback", task_name, refusals=(PromotionError, AdapterError), config=str(config_path),
                       task=task_name, old=task.slm_model) as entry:
        last = next((p for p in history(store, task_name) if p["kind"] == "promote"), None)
        if last is None:
            raise PromotionError(f"task {task_name} has no promotion to roll back")
        if last["to_model"] != task.slm_model:
            raise PromotionError(f"task {task_name} points at {task.slm_model}, not {last['to_model']} (its newest "
                                 "promotion): the config was changed by hand since; point it back yourself")
        previous = last["from_model"]
        entry.params["new"] = previous
        servers: list[str] = []
        try:
            adapter = adapters.by_name(roots, previous)
        except AdapterError:
            adapter = None  # not an adapter of the roots (the base model, another host's): it must be served already
        if adapter is not None and adapter.name == previous:
            servers = _serve_everywhere(store, task, adapter)
        elif not _listed(task.slm_base_url, previous, task.slm_api_key_env):
            raise PromotionError(f"{task.slm_base_url} no longer lists {previous}; load it before rolling back")
        entry.params["servers"] = ",".join(servers)
        set_task_field(config_path, task_name, "slm_model", previous)
        _record(store, task_name, "rollback", task.slm_model, previous, None)
    return Outcome(task_name, task.slm_model, previous, servers, reload_proxy(cfg.proxy, config_path))


def reload_proxy(settings: Any, config_path: Path) -> str:
    """Ask the running proxy to reload its config; what happened, in one phrase (never raises)."""
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    keys = sorted(api_keys(settings))
    headers = bearer(keys[0] if keys else None)
    url = f"http://{host}:{settings.port}/admin/reload"
    try:
        r = httpx.post(url, headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError:
        return f"not running at {host}:{settings.port}; it reads {config_path} when it starts"
    if r.status_code == 200:
        return f"reloaded at {host}:{settings.port}"
    detail = adapters.error_message(r)
    return (f"did not reload ({r.status_code}: {detail}); send it SIGHUP, or "
            f"set {settings.api_keys_env or 'the proxy key variable'} here to one of its keys")
