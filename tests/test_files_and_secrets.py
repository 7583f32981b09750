"""What fleetdeck writes is for its user only, what it starts inherits no secrets, and what it reads
from config cannot be turned into an option or a loophole."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from engine import managed
from engine.router.config import is_loopback
from engine.router.server import ProxyStartError, check_can_start
from engine.router.config import RouterConfig
from fleet.config import load_fleet_config
from store.config_files import ConfigError
from store.db import open_store
from tests.helpers import wait_for


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_existing_store_at_0644_is_made_0600_with_its_wal(tmp_path):
    path = tmp_path / "fd.db"
    open_store(path).close()
    path.chmod(0o644)
    store = open_store(path)
    store.execute("CREATE TABLE IF NOT EXISTS t (a)")  # a write, so the WAL exists
    assert _mode(path) == 0o600
    for side in ("-wal", "-shm"):
        side_path = Path(f"{path}{side}")
        if side_path.exists():
            assert _mode(side_path) == 0o600
    store.close()


def test_a_new_store_folder_is_0700(tmp_path):
    open_store(tmp_path / "new" / "deeper" / "fd.db").close()
    assert _mode(tmp_path / "new" / "deeper") == 0o700


def test_an_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "fd.db"
    path.touch()
    open_store(path).close()
    open_store(path).close()  # and is recognised as one afterwards


def test_a_managed_process_inherits_no_secrets_and_logs_privately(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-planted-openai")
    monkeypatch.setenv("FLEETDECK_PROXY_KEYS", "planted-proxy-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-aws")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    log = tmp_path / "logs" / "p.log"
    log.parent.mkdir()
    pid, _ = managed.spawn([sys.executable, "-c", "import time; time.sleep(60)"], {"VLLM_API_KEY": "on-purpose"}, str(log))
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        names = {e.split(b"=", 1)[0].decode() for e in environ if e}
        assert "PATH" in names and "CUDA_VISIBLE_DEVICES" in names and "VLLM_API_KEY" in names
        assert not names & {"OPENAI_API_KEY", "FLEETDECK_PROXY_KEYS", "AWS_SECRET_ACCESS_KEY"}
        assert b"planted" not in b"\0".join(environ)
        assert _mode(log) == 0o600
    finally:
        os.kill(pid, 9)
        assert wait_for(lambda: not managed.alive(pid, None))


def test_an_ssh_destination_cannot_be_an_option(tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[node]]\nname = "evil"\nssh = "-oProxyCommand=touch /tmp/pwned"\n')
    with pytest.raises(ConfigError, match="node\\[0\\].ssh"):
        load_fleet_config(fleet, required=True)


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("127.evil.example", False), ("0.0.0.0", False), ("10.0.0.5", False), ("localhost.evil.example", False),
])
def test_only_loopback_addresses_skip_the_key_requirement(host, loopback, monkeypatch):
    assert is_loopback(host) is loopback
    if not loopback:
        monkeypatch.delenv("FLEETDECK_PROXY_KEYS", raising=False)
        config = RouterConfig.model_validate({"task": [{"name": "t", "slm_base_url": "http://127.0.0.1:1/v1",
                                                        "slm_model": "m", "threshold": 0.5}]})
        with pytest.raises(ProxyStartError, match="without API keys"):
            check_can_start(config, host, 0)


def test_server_logs_and_job_folders_are_private_even_when_they_existed_wider(tmp_path, monkeypatch):
    from engine.vllm import launcher
    from tests.helpers import FAKE_VLLM_CMD, profile

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    logs = tmp_path / "state" / "fleetdeck" / "servers"
    logs.mkdir(parents=True, mode=0o755)
    logs.chmod(0o755)
    store = open_store(tmp_path / "fd.db")
    rec, _ = launcher.start(store, profile(name="q", lora={"enable": False}), [0], force=True)
    try:
        assert _mode(logs) == 0o700 and _mode(Path(rec.log_path)) == 0o600
    finally:
        launcher.stop(store, rec, timeout=5)
