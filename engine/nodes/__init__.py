"""Everything a node can be asked, and the one client that asks it (issue #27).

- ops.py: `NodeOps`, the protocol the CLI and the TUI use for any node, and its typed results.
- local.py: `LocalOps`, this host's engine on its store; the agent answers with one too.
- remote.py: `AgentOps`, a node over SSH through fleet/protocol.py's request/response models; `connect`.
- select.py: which node an action goes to (`ops_named`, `ops_for`, `remote_ops`), `serve_adapter`.
- agent.py: `fleetdeck agent --stdio`, the node's side of the protocol, dispatching to one LocalOps.
- placement.py: a record's GPUs or Slurm ask, read in one place.
- ids.py: `@node:id` and back (import-free: the screens load it at start).
- processes.py: the guarded kill of a process that holds a GPU.

Import from the module, not from here: this package imports nothing itself, so the screens that only
need ids.py do not load the engine at start.
"""
