"""`fleetdeck nodes install NODE --bundle DIR`: a bundle pushed to a node over the system's OpenSSH and
installed there by the bundle's own install step.

The node is reached exactly as the dashboard reaches it (the fleet config's `ssh` and `ssh_options`, so
aliases, jump hosts and keys in ~/.ssh/config all apply). What runs on the node is fixed here, never taken
from a request: `tar -x` of the bundle into ~/.local/share/fleetdeck/bundles/VERSION-DIGEST, then
`sh .../install.sh --json` (engine/bundle/install_script.py), which verifies every file before installing.
Before copying, the node's agent is asked its version: the same bundle again is "already at VERSION" and
nothing is copied or changed. After installing, the agent's place is recorded in the fleet config
(`agent_command`, unless the node's PATH already finds it) and the new agent must answer with the bundle's
version and this dashboard's protocol. The node's config, profiles, store and running servers live outside
the environments and are never touched; an agent still running keeps its (previous) environment's files.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.audit import trail as audit
from engine.bundle import install_script
from engine.bundle.build import BundleError, Manifest, read_manifest
from fleet.config import FleetConfig, NodeConfig, set_agent_command
from fleet.protocol import PROTOCOL_VERSION
from fleet.remote import DEFAULT_AGENT, LinkState, RemoteNode, ssh_command

REMOTE_HOME_DIR = ".local/share/fleetdeck"  # relative to the node user's home, where ssh starts a command


class InstallRefused(Exception):
    """Nothing was changed on the node: the bundle, the node or the config says no (the message says why)."""


class InstallFailed(Exception):
    """The node was changed but the result does not answer as it should; the message says what to check."""


@dataclass
class InstallOutcome:
    node: str
    status: str  # already | installed | upgraded
    version: str
    previous: str | None
    agent_command: list[str] = field(default_factory=list)
    config_changed: bool = False

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def probe(node: NodeConfig, command: list[str] | None = None, timeout_s: float = 30.0) -> LinkState:
    """How the node's agent answers now: connected (version, protocol), incompatible, or unreachable."""
    remote = RemoteNode.over_ssh(node.name, node.ssh, list(node.ssh_options), command or node.agent_command or None,
                                 hello_timeout_s=min(20.0, timeout_s), backoff_s=(timeout_s, timeout_s))
    try:
        deadline = time.monotonic() + timeout_s
        while remote.link.status == "connecting" and time.monotonic() < deadline:
            time.sleep(0.05)
        return LinkState(**{**remote.link.__dict__})
    finally:
        remote.close()


def _run(cmd: list[str], what: str, stdin: int | None = None, timeout_s: float = 1800) -> str:
    try:
        done = subprocess.run(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallRefused(f"{what}: {exc}") from None
    if done.returncode != 0:
        tail = " ".join(line.strip() for line in done.stderr.splitlines()[-3:] if line.strip())
        raise InstallRefused(f"{what} failed (exit {done.returncode}): {tail or done.stdout.strip()[-300:]}")
    return done.stdout


def copy_bundle(node: NodeConfig, bundle: Path, remote_dir: str) -> None:
    """A tar stream over ssh into remote_dir (made whole under a .partial name, then renamed)."""
    q, part = shlex.quote(remote_dir), shlex.quote(remote_dir + ".partial")
    script = f"umask 077 && rm -rf {part} && mkdir -p {part} && tar -x -f - -C {part} && rm -rf {q} && mv {part} {q}"
    tar = subprocess.Popen(["tar", "-c", "-f", "-", "-C", str(bundle), "."], stdout=subprocess.PIPE)
    try:
        assert tar.stdout is not None
        _run(ssh_command(node.ssh, list(node.ssh_options), ["sh", "-c", script]), f"copying the bundle to {node.name}",
             stdin=tar.stdout.fileno())
    finally:
        if tar.stdout is not None:
            tar.stdout.close()
        if tar.wait() != 0:
            raise InstallRefused(f"tar could not read {bundle}")


def _install_step(node: NodeConfig, remote_dir: str) -> dict[str, object]:
    """The bundle's own install step on the node; its last line is one JSON object saying what happened."""
    cmd = ssh_command(node.ssh, list(node.ssh_options), ["sh", f"{remote_dir}/install.sh", "--json"])
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallFailed(f"{node.name}: the install step did not finish: {exc}") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
        if not isinstance(result, dict):
            raise ValueError("not an object")
    except (IndexError, ValueError):
        said = (done.stderr.strip() or done.stdout.strip())[-300:]
        raise InstallFailed(f"{node.name}: the install step said nothing readable (exit {done.returncode}): {said}") from None
    if result.get("status") == "refused":  # nothing was installed: the bundle or the node's Python says no
        raise InstallRefused(f"{node.name}: {result.get('message')}")
    if done.returncode != 0 or result.get("status") not in ("installed", "upgraded", "already"):
        raise InstallFailed(f"{node.name}: {result.get('message')}")
    return result


def _agent_version_check(node: NodeConfig, command: list[str], manifest: Manifest) -> None:
    link = probe(node, command)
    if link.status != "connected":
        raise InstallFailed(f"{node.name}: installed, but its agent does not answer ({link.error or link.status})")
    if link.agent_version != manifest.fleetdeck or link.agent_protocol != PROTOCOL_VERSION:
        raise InstallFailed(f"{node.name}: its agent answers as fleetdeck {link.agent_version} protocol "
                            f"v{link.agent_protocol}, expected {manifest.fleetdeck} v{PROTOCOL_VERSION}")


def install_on_node(config: FleetConfig, config_path: Path, name: str, bundle: Path) -> InstallOutcome:
    node = next((n for n in config.node if n.name == name), None)
    with audit.audited("node.install", name, refusals=(InstallRefused,), bundle=str(bundle)) as entry:
        if node is None:
            raise InstallRefused(f"no node {name!r} in {config_path} "
                                 f"(nodes: {', '.join(n.name for n in config.node) or 'none'})")
        try:
            manifest = read_manifest(bundle)
        except BundleError as exc:
            raise InstallRefused(str(exc)) from None
        entry.params["version"] = manifest.fleetdeck
        problems = install_script.verify(bundle, manifest.model_dump())
        if problems:  # refused here, before a byte crosses: the node would refuse it too
            raise InstallRefused(f"{bundle}: " + "; ".join(problems))
        now = probe(node)
        entry.params["previous"] = now.agent_version
        if now.status == "connected" and now.agent_version == manifest.fleetdeck:
            entry.params["result"] = "already"
            return InstallOutcome(name, "already", manifest.fleetdeck, now.agent_version,
                                  list(node.agent_command or DEFAULT_AGENT))
        remote_dir = f"{REMOTE_HOME_DIR}/bundles/{manifest.fleetdeck}-{install_script.bundle_digest(bundle)[:12]}"
        copy_bundle(node, bundle, remote_dir)
        result = _install_step(node, remote_dir)
        agent = [str(result["agent"]), "agent", "--stdio"]
        command = list(node.agent_command) if result.get("on_path") else agent
        changed = command != list(node.agent_command)
        if changed:
            set_agent_command(config_path, name, command)
        entry.params.update(agent=" ".join(command), result=str(result["status"]))
        _agent_version_check(node, command, manifest)
        status = "upgraded" if now.agent_version and now.agent_version != manifest.fleetdeck else str(result["status"])
        previous = now.agent_version or (str(result["previous"]) if result.get("previous") else None)
        return InstallOutcome(name, status, manifest.fleetdeck, previous, command, changed)
    raise AssertionError("unreachable")  # audited() re-raises; mypy cannot see the with-block always returns
