"""A start names GPUs the node has: the node's own inventory decides (its NVML readings, a simulated node's
GPUs, and where NVML cannot read, the GPUs its NVIDIA driver lists), even when the start is forced past the
planner. A GPU the node lacks is refused in one line and recorded as a refusal."""

from __future__ import annotations

import json

import pynvml
import pytest

from engine.audit import trail as audit
from engine.nodes.agent import Agent
from fleet import inventory
from fleet.simulated import demo_fleet
from fleet.source import LocalNode
from store.db import open_store
from tests.fakes.fake_nvml import FakeNvml
from tests.helpers import Pipe, make_node_files

START = {"start_server": ("server.start", {"profile": "q"}), "start_job": ("job.start", {"spec": "sim"})}


@pytest.fixture
def node_files(tmp_path, monkeypatch):
    root = make_node_files(tmp_path / "node")
    monkeypatch.setenv("FLEETDECK_PROFILES", str(root / "profiles"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state"))
    monkeypatch.setenv("FLEETDECK_VLLM", str(tmp_path / "no-vllm-here"))  # a start past the checks fails to launch
    monkeypatch.chdir(tmp_path)
    return root


def _driver_lists(monkeypatch, tmp_path, n: int) -> None:
    """The NVIDIA driver's /proc list with `n` GPUs (None of them readable through NVML)."""
    folder = tmp_path / "proc-gpus"
    folder.mkdir()
    for i in range(n):
        (folder / f"0000:{i + 1:02x}:00.0").mkdir()
    monkeypatch.setattr(inventory, "DRIVER_GPUS", folder)


def _start(root, source, op: str, gpus: list[int]) -> tuple[dict, list[dict]]:
    db = root / "fd.db"
    with audit.session(db, "agent"):
        pipe = Pipe(Agent(source, db, [root / "adapters"], "9.9", interval_s=0.2))
        try:
            pipe.next("hello")
            args = {**START[op][1], "gpus": gpus, "force": True}  # forced: past the planner, not past the inventory
            pipe.send({"v": 2, "type": "request", "id": 1, "op": op, "args": args, "operator": "eve@dash"})
            answer = pipe.next("response")
        finally:
            pipe.close()
    return answer, audit.query(open_store(db))


@pytest.mark.parametrize("op", list(START))
def test_a_gpu_a_node_without_nvml_does_not_have_is_refused_and_recorded(node_files, tmp_path, monkeypatch, op):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    _driver_lists(monkeypatch, tmp_path, 2)
    answer, records = _start(node_files, LocalNode("node-b"), op, [7])
    assert answer["ok"] is False and answer["error"].startswith("no GPU [7] on node-b (it has [0, 1]; NVML: "), answer
    assert "\n" not in answer["error"]
    (rec,) = records
    assert rec["action"] == START[op][0] and rec["outcome"] == "refused" and "no GPU [7]" in rec["reason"]
    assert json.loads(rec["params"])["gpus"] == "7" and "eve@dash" in json.dumps(rec)  # what and for whom


def test_a_gpu_the_driver_lists_passes_the_check_without_nvml(node_files, tmp_path, monkeypatch):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    _driver_lists(monkeypatch, tmp_path, 2)
    answer, _ = _start(node_files, LocalNode("node-b"), "start_server", [1])
    assert answer["error"].startswith("cannot find the vLLM command"), answer  # past the check, to the launch


def test_a_node_with_no_gpu_at_all_refuses_every_index(node_files, tmp_path, monkeypatch):
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    monkeypatch.setattr(inventory, "DRIVER_GPUS", tmp_path / "no-driver-here")
    answer, records = _start(node_files, LocalNode("node-b"), "start_server", [0])
    assert answer["error"].startswith("no GPU [0] on node-b (it has no GPU; NVML: "), answer
    assert [r["outcome"] for r in records] == ["refused"]


def test_a_simulated_nodes_own_gpus_decide(node_files):
    source = demo_fleet()[0]
    have = sorted(g.index for g in source.snapshot().gpus)
    answer, records = _start(node_files, source, "start_server", [max(have) + 1])
    assert answer["error"] == f"no GPU [{max(have) + 1}] on {source.name} (it has {have})", answer
    assert [r["outcome"] for r in records] == ["refused"]


def test_a_profile_for_vllms_cpu_build_names_no_real_gpu_and_is_not_checked(node_files, tmp_path, monkeypatch):
    """vLLM's CPU build runs on no GPU (the profile's VLLM_CPU_KVCACHE_SPACE): a node without GPUs serves it."""
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    monkeypatch.setattr(inventory, "DRIVER_GPUS", tmp_path / "no-driver-here")
    (node_files / "profiles" / "q.toml").write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n[env]\nVLLM_CPU_KVCACHE_SPACE = "4"\n')
    answer, _ = _start(node_files, LocalNode("node-b"), "start_server", [0])
    assert answer["error"].startswith("cannot find the vLLM command"), answer  # past the check, to the launch
