"""The command line's one way to a node: `--node NAME` is that node of the fleet config through its agent
(engine/nodes/remote.py's AgentOps), no `--node` is this host (LocalOps on the store `--store` names).
Every command that acts on a node asks the `NodeOps` this gives, so the two cannot drift."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from engine.nodes.local import LocalOps
    from engine.nodes.ops import NodeOps


def node_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", help="on this node of the fleet config, through its agent over SSH (default: this host)")


def own_id(shown: str) -> str:
    """A record's id on its node: `@node:id` -> `id` (what `--node NODE` commands take and print)."""
    return shown[1:].partition(":")[2] if shown.startswith("@") and ":" in shown else shown


def log_text(text: str) -> str:
    """A log tail as the terminal may print it: what a served request or a node's process wrote there is
    not to move the cursor, retitle the window or recolour the operator's terminal. Lines stay lines (a
    carriage return, a progress bar's, starts one), tabs stay tabs; every other control or format
    character is shown as its escape (`\\x1b`), as `fleetdeck audit` shows them."""
    from engine.audit.text import shown

    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join("\t".join(shown(part) for part in line.split("\t")) for line in lines)


def local_ops(args: argparse.Namespace, create: bool = True) -> LocalOps:
    """This host as a node: the store, adapter roots, model roots and Slurm settings of its fleet config."""
    from engine.nodes.local import LocalOps
    from fleetdeck.cmdutil import fleet_config_of, store_of

    config = fleet_config_of(args)
    return LocalOps(store_of(args, create=create), list(config.adapter_roots), model_roots=list(config.models.roots),
                    slurm_settings=config.slurm)


@contextmanager
def ops_of(args: argparse.Namespace, create: bool = True) -> Iterator[NodeOps]:
    """The node `args.node` names, connected for this command and closed after; else this host."""
    from engine.nodes.remote import AgentOps, connect
    from fleetdeck.cmdutil import fleet_config_of

    if not getattr(args, "node", None):
        yield local_ops(args, create)
        return
    remote = connect(fleet_config_of(args), args.node)
    try:
        yield AgentOps(remote)
    finally:
        remote.close()


def node_errors() -> tuple[type[Exception], ...]:
    """What a node's op raises for a request it refuses or cannot do: one line for the user, exit 2."""
    from engine.adapters import registry as adapters
    from engine.finetune.jobs import JobError
    from engine.nodes.processes import KillError
    from engine.vllm.command import LaunchError
    from fleet.remote import AgentError
    from store.config_files import ConfigError
    from store.db import StoreError

    return (AgentError, LaunchError, JobError, adapters.AdapterError, KillError, ConfigError, StoreError, ValueError,
            LookupError)
