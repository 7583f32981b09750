"""Which node an action goes to: by its name in the fleet, or by the `@node:id` a screen shows."""

from __future__ import annotations

from typing import Any, Iterable

from engine.adapters import registry as engine_adapters
from engine.nodes.local import LocalOps
from engine.nodes.ids import split_id
from engine.nodes.ops import NodeOps
from engine.vllm.record import ServerState
from engine.nodes.remote import AgentOps
from fleet.remote import AgentError, RemoteNode


def remote_ops(sources: Iterable[Any]) -> list[AgentOps]:
    """The connected SSH nodes among a poller's sources."""
    return [AgentOps(s) for s in sources if isinstance(s, RemoteNode) and s.link.status == "connected"]


def ops_named(sources: Iterable[Any], local: LocalOps, node: str | None) -> NodeOps:
    """A node by its name in the fleet: a node reached over SSH, or else this host (None, or the name of
    one of this host's own sources)."""
    remote = next((s for s in sources if isinstance(s, RemoteNode) and s.name == node), None) if node else None
    if remote is None:
        return local
    if remote.link.status != "connected":
        raise AgentError(f"{node} is not connected ({remote.link.error or remote.link.status})")
    return AgentOps(remote)


def ops_for(sources: Iterable[Any], local: LocalOps, shown_id: str) -> tuple[NodeOps, str]:
    """The node an id (`@node:id` or a local id) lives on, and the id there."""
    node, ident = split_id(shown_id)
    if node is None:
        return local, ident
    for s in sources:
        if isinstance(s, RemoteNode) and s.name == node:
            return AgentOps(s), ident
    raise AgentError(f"{node} is not connected")


def serve_adapter(ops: NodeOps, adapter: str) -> str:
    """Load an adapter of a node into the first ready server of that node that can serve it."""
    listing = ops.adapters(None)
    found = next((a for a in listing.adapters if a.name == adapter), None)
    if found is None:
        raise engine_adapters.AdapterError(f"no adapter {adapter!r} in the adapter roots of {ops.name or 'this host'}: "
                                           "add the job's adapter_root to the node's adapter_roots")
    for st in ops.servers():
        rec = st.rec
        lora = rec.spec.get("lora", {})
        if rec.state == ServerState.READY and not engine_adapters.compatibility_problems(
                found, rec.spec.get("model", ""), lora.get("enable", False), lora.get("max_lora_rank", 16)):
            return f"{rec.id}: " + ops.load_adapter(split_id(rec.id)[1], adapter)
    raise engine_adapters.AdapterError(f"no ready server can take {adapter} (same base model, LoRA on, max rank >= "
                                       f"{found.rank})")
