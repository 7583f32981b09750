"""Helpers shared by several test modules (test modules never import each other)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from engine.vllm.profile import Profile
from fleet.model import GpuSnapshot

GIB = 1024**3
FAKE_VLLM = str(Path(__file__).parent / "fakes" / "fake_vllm")
# Run the fake with the test's own interpreter: `python3` on PATH may be one without the project.
FAKE_VLLM_CMD = f"{sys.executable} {FAKE_VLLM}"


def h100(free_gib: float = 79.0, index: int = 0) -> GpuSnapshot:
    total = int(79.65 * GIB)
    return GpuSnapshot(node="n", index=index, name="NVIDIA H100 80GB HBM3", uuid=f"GPU-{index}",
                       memory_total_bytes=total, memory_used_bytes=total - int(free_gib * GIB))


def profile(**kw) -> Profile:
    base = dict(name="qwen3-8b", model="Qwen/Qwen3-8B", max_model_len=8192,
                lora={"enable": True, "max_loras": 4, "max_lora_rank": 64})
    base.update(kw)
    return Profile.model_validate(base)


def make_adapter(root: Path, name: str, rank: int = 16, base: str = "Qwen/Qwen3-8B", weights: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": base,
        "target_modules": ["q_proj", "v_proj"]}))
    if weights:
        import numpy as np
        from safetensors.numpy import save_file

        save_file({"w": np.zeros((rank, 8), dtype=np.float16)}, str(folder / "adapter_model.safetensors"))
    return folder


# Tests wait on conditions, not for durations: this ceiling is only a safety net so a real hang ends the
# test instead of CI; no test's outcome may depend on it (a loaded 2-core CI machine can be very slow).
WAIT_CEILING_S = 300.0


def wait_for(cond, timeout=WAIT_CEILING_S, step=0.05):
    """Poll `cond` until it holds; False only if it still does not after `timeout` (a safety net)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


def kill_processes_mentioning(marker: str) -> list[int]:
    """End, by pid, the processes whose command line holds `marker` (a path unique to one test)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                proc.kill()
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


class Pipe:
    """Two in-memory line streams wired to an Agent running in a thread."""

    def __init__(self, agent: Any) -> None:
        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        self.to_agent = os.fdopen(w_in, "w", buffering=1)
        self.from_agent = os.fdopen(r_out, "r")
        agent_in, agent_out = os.fdopen(r_in, "r"), os.fdopen(w_out, "w", buffering=1)
        self.thread = threading.Thread(target=agent.serve, args=(agent_in, agent_out), daemon=True)
        self.thread.start()

    def send(self, msg: dict | str) -> None:
        self.to_agent.write((msg if isinstance(msg, str) else json.dumps(msg)) + "\n")

    def next(self, kind: str, timeout: float = 60.0) -> dict:  # a ceiling against a hang only
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.from_agent.readline())
            if msg["type"] == kind:
                return msg
        raise AssertionError(f"no {kind} message")

    def close(self) -> None:
        self.to_agent.close()
        self.thread.join(timeout=5)


def make_node_files(root: Path, api_key_env: str | None = None) -> Path:
    """What a node's own folders hold, for tests of its commands and agent: profile `q` (Qwen3-8B, LoRA
    up to rank 32) in root/profiles, adapters tickets-v1 and tickets-v2 in root/adapters (named by
    root/fleet.toml), a catalogue base-model folder, a dataset, and the simulated job spec `sim` in
    root/config/fleetdeck/finetune (so XDG_CONFIG_HOME=root/config finds it)."""
    from engine.kvfit.catalogue import CATALOGUE

    (root / "profiles").mkdir(parents=True)
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    (root / "profiles" / "q.toml").write_text(
        f'name = "q"\nmodel = "Qwen/Qwen3-8B"\n{key}[lora]\nenable = true\nmax_lora_rank = 32\n')
    make_adapter(root / "adapters", "tickets-v1")
    make_adapter(root / "adapters", "tickets-v2")
    (root / "fleet.toml").write_text(f'adapter_roots = ["{root / "adapters"}"]\n')
    base = root / "Qwen3-8B"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(CATALOGUE["Qwen/Qwen3-8B"]))
    (root / "d.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    specs = root / "config" / "fleetdeck" / "finetune"
    specs.mkdir(parents=True)
    (specs / "sim.toml").write_text(f'name = "sim"\nbase_model = "{base}"\ndataset = "{root / "d.jsonl"}"\n'
                                    f'backend = "simulated"\nmax_steps = 400\nadapter_root = "{root / "adapters"}"\n')
    return root



def local_wheelhouse(out: Path, root: str = "fleetdeck", extras: tuple[str, ...] = ()) -> Path:
    """A wheelhouse of what `root` (with `extras`) needs, re-packed from this environment's installed
    distributions, plus pip: what `fleetdeck bundle --find-links DIR --no-index` builds from with no index."""
    from importlib import metadata

    from packaging.requirements import Requirement

    from engine.bundle.wheels import normalize, repack_installed

    seen: set[str] = set()
    done: set[tuple[str, str]] = set()  # (distribution, extra): a dependency may be asked for with its extras
    todo = [(root, extras)]
    while todo:
        name, want = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*want, "")):
                continue
            key = normalize(req.name)
            new = [e for e in ("", *req.extras) if (key, e) not in done]
            if new:
                seen.add(key)
                done.update((key, e) for e in new)
                todo.append((req.name, tuple(req.extras)))
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(seen - {normalize(root)}) + ["pip"]:
        repack_installed(name, out)
    return out


SSHD = "/usr/sbin/sshd"


def sshd_server(tmp_path: Path, extra_config: str = ""):
    """A real sshd on 127.0.0.1 with throwaway keys (a generator for a fixture): yields the destination
    and the ssh options that reach it; `extra_config` adds sshd_config lines (e.g. SetEnv HOME=...)."""
    import shutil
    import socket
    import subprocess
    import textwrap

    import pytest

    sshd = shutil.which("sshd") or SSHD
    if not Path(sshd).exists():
        pytest.skip("sshd is not installed (.ci/run installs Debian's openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "client")], check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path("/run/sshd").mkdir(exist_ok=True)
    config = keys / "sshd_config"
    config.write_text(textwrap.dedent(f"""
        ListenAddress 127.0.0.1
        Port {port}
        HostKey {keys / 'host'}
        AuthorizedKeysFile {keys / 'authorized_keys'}
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        StrictModes no
        UsePAM no
        PidFile {keys / 'sshd.pid'}
        AcceptEnv NONE
        ExposeAuthInfo yes
    """) + extra_config)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)

    def port_open() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    assert wait_for(port_open, timeout=10)
    user = os.environ.get("USER") or "root"
    opts = ["-p", str(port), "-i", str(keys / "client"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    yield f"{user}@127.0.0.1", opts
    proc.terminate()
    proc.wait(timeout=10)


# A ledger writer that queues `argv[2]` rows (ids k0, k1, ...) and waits to be killed: its flush interval is an
# hour, so nothing reaches the store before the kill and every row is only in the journal.
KILLED_WRITER = """
import sys, time
from store.db import open_store
from store.ledger import LedgerRow, LedgerWriter
writer = LedgerWriter(open_store(sys.argv[1]), flush_every_s=3600)
for i in range(int(sys.argv[2])):
    writer.put(LedgerRow(id=f"k{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident", status=200))
print("queued", flush=True)
time.sleep(600)
"""


def kill_a_writer_with_queued_rows(db: Path, rows: int) -> None:
    """Create the store `db`, let a writer in another process queue `rows` rows, and SIGKILL it (by its pid)."""
    import signal
    import subprocess

    from store.db import open_store

    open_store(db).close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(db), str(rows)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "queued"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def router_history(folder: Path) -> tuple[Path, Path]:
    """A store back-filled with the demo router's history up to now (8 days by the minute and the hour, 20 more
    by the day) and the demo's router config (its SLM at a port nothing listens on): (store, config)."""
    from engine.router.demo import backfill, demo_router_toml
    from store.db import open_store

    db = folder / "fd.db"
    store = open_store(db)
    backfill(store, time.time(), days=8, daily_only_days=20, minute_hours=2)
    store.close()
    cfg = folder / "router.toml"
    cfg.write_text(demo_router_toml("http://127.0.0.1:9", 4000))
    return db, cfg
