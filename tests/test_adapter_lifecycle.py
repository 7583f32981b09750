"""Adapter versions from import to rollback, through the CLI, with the proxy as its own process and
vLLM's simulator as the server: immutable NAME@vN folders, what each bad adapter folder gets, the
evaluation record, a gate that refuses and one that passes, a promotion while requests flow with no
failed request, the ledger naming the version that answered, and a rollback. The same path on the
real vLLM CPU build with peft-trained versions is in tests/engines/test_real_promotion.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine.adapters import registry as adapters
from engine.adapters.registry import content_hash, integrity_problem
from engine.vllm import launcher
from fleetdeck.cli import main
from store.db import open_store
from tests.helpers import FAKE_VLLM_CMD, WAIT_CEILING_S, h100, make_adapter, profile, wait_for

# The simulator answers " tok0 ... tok15" to a request without max_tokens (as calibration sends it).
SIM_ANSWER = " ".join(f"tok{i}" for i in range(16))


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.2")
    monkeypatch.delenv("FLEETDECK_PROXY_KEYS", raising=False)


@pytest.fixture
def site(tmp_path):
    """A store, a fleet config with one adapter root, and a ready simulated server with LoRA."""
    roots = tmp_path / "adapters"
    roots.mkdir()
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'adapter_roots = ["{roots}"]\n')
    store = open_store(tmp_path / "fd.db")
    rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    assert rec.state == "ready", rec.reason
    yield {"root": tmp_path, "roots": roots, "fleet": fleet, "store": store, "server": rec,
           "common": ["--store", str(tmp_path / "fd.db"), "--config", str(fleet)]}
    for r in launcher.list_servers(store):
        if r.state not in ("stopped", "crashed"):
            launcher.stop(store, r, timeout=5)


def cli(site, *args: str) -> int:
    return main([*args, *site["common"]])


def write_eval(path: Path, right: int, wrong: int) -> Path:
    lines = [{"messages": [{"role": "user", "content": f"ticket {i}"}], "expected": SIM_ANSWER} for i in range(right)]
    lines += [{"messages": [{"role": "user", "content": f"ticket {i}"}], "expected": "billing"} for i in range(wrong)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def router_toml(site, port: int, target: float, slm_model: str = "Qwen/Qwen3-8B") -> Path:
    path = site["root"] / "router.toml"
    path.write_text(f"""# the operator's own comment stays
[proxy]
host = "127.0.0.1"
port = {port}

[[task]]
name = "tickets"
slm_base_url = "{site['server'].base_url}/v1"
slm_model = "{slm_model}"
threshold = 0.0

[task.gate]
eval = "gate.jsonl"
target_accuracy = {target}
""")
    return path


def test_import_makes_immutable_versions_and_refuses_what_vllm_would(site, tmp_path, capsys):
    src = make_adapter(tmp_path / "src", "tickets", rank=16)
    assert cli(site, "adapters", "import", str(src), "tickets") == 0
    assert cli(site, "adapters", "import", str(src), "tickets") == 0
    out = capsys.readouterr().out
    assert "tickets@v1: registered" in out and "tickets@v2: registered" in out
    v1 = site["roots"] / "tickets@v1"
    meta = json.loads((v1 / "fleetdeck.json").read_text())
    assert meta["origin"] == "import" and meta["content_sha256"] == content_hash(v1) and meta["registered_by"]
    assert all(p.stat().st_mode & 0o222 == 0 for p in [v1, *v1.iterdir()])  # no write bit anywhere
    # A bare name means the newest version.
    assert adapters.by_name([site["roots"]], "tickets").name == "tickets@v2"

    # Each bad folder gets one line naming the problem; nothing is registered.
    bad_name = cli(site, "adapters", "import", str(src), "tickets@v9")
    not_adapter = cli(site, "adapters", "import", str(tmp_path), "other")
    saved = make_adapter(tmp_path / "src", "with-head")
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"], "use_dora": True}))
    head = cli(site, "adapters", "import", str(saved), "with-head")
    err = capsys.readouterr().err.strip().splitlines()
    assert (bad_name, not_adapter, head) == (2, 2, 2) and len(err) == 3
    assert "letters, digits" in err[0] and "no adapter_config.json" in err[1]
    assert "vLLM would refuse" in err[2] and "modules_to_save" in err[2] and "DoRA" in err[2]
    assert sorted(p.name for p in site["roots"].iterdir()) == ["tickets@v1", "tickets@v2"]

    # A version whose files changed is flagged, and no server gets it.
    (v1 / "adapter_model.safetensors").chmod(0o600)
    (v1 / "adapter_model.safetensors").write_bytes(b"tampered")
    changed = adapters.by_name([site["roots"]], "tickets@v1")
    assert "changed after it was registered" in integrity_problem(changed)
    assert cli(site, "adapters", "load", site["server"].id, "tickets@v1") == 2
    assert "changed after it was registered" in capsys.readouterr().err
    # A version is served under its own name only: a name is never given to other weights.
    assert cli(site, "adapters", "load", site["server"].id, "tickets@v2", "--name", "tickets") == 2
    assert "served as tickets@v2 only" in capsys.readouterr().err
    rows = site["store"].query("SELECT action, target, outcome FROM audit ORDER BY seq")
    assert ("adapter.import", "tickets@v1", "done") in [tuple(r.values()) for r in rows]


def test_eval_records_accuracy_calibration_latency_and_the_files_hashes(site, tmp_path, capsys):
    src = make_adapter(tmp_path / "src", "tickets")
    assert cli(site, "adapters", "import", str(src), "tickets") == 0
    evalset = write_eval(tmp_path / "held-out.jsonl", right=3, wrong=1)
    capsys.readouterr()
    assert cli(site, "adapters", "eval", "tickets@v1", "--eval", str(evalset), "--json", "--target-accuracy", "0.5") == 0
    row = json.loads(capsys.readouterr().out)
    assert row["adapter"] == "tickets@v1" and row["items"] == 4 and row["accuracy"] == 0.75
    assert row["server"] == site["server"].id and row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"]
    assert 0 <= row["ece"] <= 1 and len(row["eval_sha256"]) == 64 and row["threshold"] is not None
    # The version was loaded for the evaluation, under its own name.
    assert "tickets@v1" in [m["id"] for m in adapters.loaded(site["server"].base_url)]
    assert cli(site, "adapters", "ls", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    (entry,) = listed["adapters"]
    assert entry["status"] == "intact" and entry["latest_eval"]["id"] == row["id"]
    # A bad eval file: its lines are named, nothing is sent, nothing recorded.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    assert cli(site, "adapters", "eval", "tickets@v1", "--eval", str(bad)) == 2
    assert "2 bad line(s)" in capsys.readouterr().err
    assert len(site["store"].query("SELECT id FROM adapter_evals")) == 1
    # An unversioned folder is not evaluated: a result must belong to weights that cannot change.
    loose = make_adapter(site["roots"], "loose")
    assert cli(site, "adapters", "eval", loose.name, "--eval", str(evalset)) == 2
    assert "not a registered version" in capsys.readouterr().err


def test_compare_scores_a_served_model_against_its_version_and_says_when_it_loses_past_the_gate(site, tmp_path, capsys):
    src = make_adapter(tmp_path / "src", "tickets")
    assert cli(site, "adapters", "import", str(src), "tickets") == 0
    gate = write_eval(site["root"] / "gate.jsonl", right=3, wrong=1)
    router = ["--router-config", str(router_toml(site, 1, target=0.9))]
    capsys.readouterr()
    # No evaluation of the version on this set yet: nothing to compare with.
    assert cli(site, "adapters", "compare", "tickets@v1", "--server", site["server"].id, "--eval", str(gate)) == 2
    assert "has no evaluation on" in capsys.readouterr().err
    assert cli(site, "adapters", "eval", "tickets@v1", "--eval", str(gate), "--target-accuracy", "0.7") == 0
    # A second server stands for the merged (or quantized) model, served without the adapter.
    merged, _ = launcher.start(site["store"], profile(name="merged", served_model_name="tickets-merged"), [1],
                               gpu_snapshots=[h100(index=1)], log_dir=tmp_path)
    merged = launcher.wait_ready(site["store"], merged, timeout=WAIT_CEILING_S, poll=0.1)
    capsys.readouterr()
    assert cli(site, "adapters", "compare", "tickets@v1", "--server", merged.id, "--eval", str(gate), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["model"]["adapter"] == "model:tickets-merged" and doc["model"]["accuracy"] == 0.75
    assert "(+0.0 pp)" in doc["verdict"] and doc["model"]["content_sha256"] != doc["adapter"]["content_sha256"]
    # Against the task's gate (90 %), the same 75 % loses: said so, exit 3.
    assert cli(site, "adapters", "compare", "tickets@v1", "--server", merged.id, "--eval", str(gate), "--task", "tickets",
               *router) == 3
    assert "LOSES ACCURACY PAST THE GATE" in capsys.readouterr().out


def _start_proxy(cfg: Path, db: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "fleetdeck", "proxy", "--router-config", str(cfg), "--store", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc


def test_gate_refuses_then_promotion_under_traffic_then_rollback(site, tmp_path, capsys):
    from tests.engines.stack import free_port, wait_http

    src = make_adapter(tmp_path / "src", "tickets")
    for _ in range(2):
        assert cli(site, "adapters", "import", str(src), "tickets") == 0
    # v1 serves the task today (promoted by hand, before fleetdeck kept versions).
    assert cli(site, "adapters", "load", site["server"].id, "tickets@v1") == 0
    port = free_port()
    cfg = router_toml(site, port, target=0.7, slm_model="tickets@v1")
    write_eval(site["root"] / "gate.jsonl", right=3, wrong=1)  # the simulator scores 75 % on it
    router = ["--router-config", str(cfg)]
    capsys.readouterr()

    # 1. No evaluation on the task's eval set: refused, and the refusal is in the audit trail.
    assert cli(site, "adapters", "promote", "tickets", "tickets@v2", *router) == 2
    assert "no evaluation on the eval set of task tickets" in capsys.readouterr().err
    # 2. An evaluation on another file does not count; one on the gate's file below its target is refused.
    other = write_eval(tmp_path / "other.jsonl", right=4, wrong=0)
    assert cli(site, "adapters", "eval", "tickets@v2", "--eval", str(other)) == 0
    assert cli(site, "adapters", "promote", "tickets", "tickets@v2", *router) == 2
    assert "no evaluation on the eval set of task tickets" in capsys.readouterr().err
    strict = cfg.read_text().replace("target_accuracy = 0.7", "target_accuracy = 0.9")
    cfg.write_text(strict)
    assert cli(site, "adapters", "eval", "tickets@v2", "--eval", str(site["root"] / "gate.jsonl"), "--task", "tickets",
               *router) == 0
    assert cli(site, "adapters", "promote", "tickets", "tickets@v2", *router) == 2
    err = capsys.readouterr().err
    assert "scored 75.0%" in err and "asks for 90.0%" in err
    cfg.write_text(strict.replace("target_accuracy = 0.9", "target_accuracy = 0.7"))

    # 3. With the proxy running and requests flowing, the promotion passes and not one request fails.
    db = site["root"] / "fd.db"
    proxy = _start_proxy(cfg, db)
    codes: list[int] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        stop = threading.Event()

        def flow() -> None:
            with httpx.Client(trust_env=False, timeout=30) as c:
                while not stop.is_set():
                    codes.append(c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
                        "model": "tickets", "messages": [{"role": "user", "content": "route me"}]}).status_code)

        t = threading.Thread(target=flow)
        t.start()
        assert wait_for(lambda: len(codes) >= 5)
        assert cli(site, "adapters", "promote", "tickets", "tickets@v2", *router) == 0
        out = capsys.readouterr().out
        assert "tickets@v1 -> tickets@v2" in out and f"reloaded at 127.0.0.1:{port}" in out
        n = len(codes)
        assert wait_for(lambda: len(codes) >= n + 5)
        # 4. Rollback in one step, still under traffic.
        assert cli(site, "adapters", "rollback", "tickets", *router) == 0
        assert "tickets@v2 -> tickets@v1" in capsys.readouterr().out
        n = len(codes)
        assert wait_for(lambda: len(codes) >= n + 5)
        stop.set()
        t.join(timeout=30)
    finally:
        proxy.send_signal(signal.SIGTERM)
        out, _ = proxy.communicate(timeout=30)
    assert codes and set(codes) == {200}, codes
    assert proxy.returncode == 0, out

    # The config names v1 again, the operator's comment kept; both versions stay loaded.
    assert 'slm_model = "tickets@v1"' in cfg.read_text() and "# the operator's own comment stays" in cfg.read_text()
    assert {"tickets@v1", "tickets@v2"} <= {m["id"] for m in adapters.loaded(site["server"].base_url)}
    # 5. The ledger names the version that answered each request: v1, then v2, then v1 again.
    store = open_store(db)
    seq = [r["slm_model"] for r in store.query("SELECT slm_model FROM requests ORDER BY ts")]
    assert len(seq) == len(codes)
    runs = [m for i, m in enumerate(seq) if i == 0 or seq[i - 1] != m]
    assert runs == ["tickets@v1", "tickets@v2", "tickets@v1"]
    kinds = [(p["kind"], p["from_model"], p["to_model"]) for p in store.query("SELECT * FROM promotions ORDER BY id")]
    assert kinds == [("promote", "tickets@v1", "tickets@v2"), ("rollback", "tickets@v2", "tickets@v1")]
    audit = [(r["action"], r["outcome"]) for r in store.query("SELECT action, outcome FROM audit WHERE action LIKE "
                                                               "'adapter.promote' OR action = 'adapter.rollback'")]
    assert audit == [("adapter.promote", "refused")] * 3 + [("adapter.promote", "done"), ("adapter.rollback", "done")]
    # Nothing left to roll back to a second time that the operator did not do by hand.
    assert cli(site, "adapters", "rollback", "tickets", *router) == 2
    assert "points at tickets@v1, not tickets@v2" in capsys.readouterr().err


def test_read_only_refuses_promotion_and_rollback(site, tmp_path, capsys):
    src = make_adapter(tmp_path / "src", "tickets")
    assert cli(site, "adapters", "import", str(src), "tickets") == 0
    cfg = router_toml(site, 1, target=0.5)
    before = cfg.read_text()
    assert cli(site, "--read-only", "adapters", "promote", "tickets", "tickets@v1", "--router-config", str(cfg)) == 2
    assert cli(site, "--read-only", "adapters", "rollback", "tickets", "--router-config", str(cfg)) == 2
    assert cli(site, "--read-only", "adapters", "import", str(src), "tickets") == 2
    assert "read-only" in capsys.readouterr().err
    assert cfg.read_text() == before and not (site["roots"] / "tickets@v2").exists()


def test_proxy_reload_is_loopback_only_and_keeps_the_old_config_when_the_new_one_is_bad(tmp_path):
    from starlette.testclient import TestClient

    from engine.router.config import load_router_config
    from engine.router.proxy import Router, create_app

    cfg = tmp_path / "router.toml"
    cfg.write_text('[[task]]\nname = "a"\nslm_base_url = "http://127.0.0.1:9/v1"\nslm_model = "m@v1"\nthreshold = 0.5\n')
    router = Router(load_router_config(cfg), load_litellm=False, config_path=cfg)
    app = create_app(router)
    with TestClient(app, base_url="http://127.0.0.1") as remote:  # the test client's address is "testclient", not loopback
        assert remote.post("/admin/reload").status_code == 403
    with TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 5000)) as local:
        cfg.write_text(cfg.read_text().replace("m@v1", "m@v2"))
        r = local.post("/admin/reload")
        assert r.status_code == 200 and r.json()["changed_tasks"] == ["a"]
        assert router.config.task[0].slm_model == "m@v2"
        cfg.write_text("[[task]]\nname = 3\n")
        r = local.post("/admin/reload")
        assert r.status_code == 409 and "keeps its current one" in r.json()["error"]["message"]
        assert router.config.task[0].slm_model == "m@v2"


async def _until(app, pilot, cond) -> bool:
    from tests.tui_helpers import until

    await until(app, pilot, cond)  # the condition, not a number of rounds (fails itself past its safety net)
    return True


async def test_router_screen_evaluates_promotes_and_rolls_back_from_the_keyboard(site, tmp_path):
    from fleet.config import FleetConfig
    from store.ledger import LedgerRow, LedgerWriter
    from tests.engines.stack import free_port
    from tests.tui_helpers import make_app, open_screen, press_and_confirm, static_text
    from tui.screens.router import RouterScreen

    src = make_adapter(tmp_path / "src", "tickets")
    for _ in range(2):
        assert cli(site, "adapters", "import", str(src), "tickets") == 0
    assert cli(site, "adapters", "load", site["server"].id, "tickets@v1") == 0
    cfg = router_toml(site, free_port(), target=0.7, slm_model="tickets@v1")
    write_eval(site["root"] / "gate.jsonl", right=3, wrong=1)
    now = time.time()
    writer = LedgerWriter(site["store"])
    for i in range(20):  # an hour of v1 traffic, one request in five escalated
        writer.put(LedgerRow(id=f"r{i}", ts=now - 3600 + i * 60, task="tickets", route="slm", escalated=i % 5 == 0,
                             reason="confident", status=200, slm_model="tickets@v1"))
    writer.close()

    app = make_app(store_path=site["root"] / "fd.db")
    app.options.router_config = cfg
    app.options.config = FleetConfig(adapter_roots=[site["roots"]])
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_screen(app, pilot, "5", RouterScreen)
        assert await _until(app, pilot, lambda: screen.data is not None and screen.data.versions)
        detail = screen.query_one("#router-detail")
        assert "model now tickets@v1" in static_text(detail) and "tickets@v1 20.0% of 20" in static_text(detail)

        await press_and_confirm(app, pilot, "e")  # scores the newest version on the gate's set
        assert await _until(app, pilot, lambda: site["store"].query("SELECT id FROM adapter_evals"))
        (ev,) = site["store"].query("SELECT adapter, accuracy FROM adapter_evals")
        assert (ev["adapter"], ev["accuracy"]) == ("tickets@v2", 0.75)

        await press_and_confirm(app, pilot, "p")
        assert await _until(app, pilot, lambda: 'slm_model = "tickets@v2"' in cfg.read_text())
        assert await _until(app, pilot, lambda: "promote tickets@v1 → tickets@v2" in static_text(detail))
        assert "model now tickets@v2" in static_text(detail)

        await press_and_confirm(app, pilot, "r")
        assert await _until(app, pilot, lambda: 'slm_model = "tickets@v1"' in cfg.read_text())
    kinds = [p["kind"] for p in site["store"].query("SELECT kind FROM promotions ORDER BY id")]
    assert kinds == ["promote", "rollback"]


async def test_router_screen_keys_that_change_a_node_are_off_when_read_only(site, tmp_path):
    from fleet.config import FleetConfig
    from tests.tui_helpers import make_app, open_screen, settle
    from tui.screens.confirm import ConfirmScreen
    from tui.screens.router import RouterScreen

    # Everything each key needs is there: a newer version to evaluate or promote, a promotion to roll back.
    src = make_adapter(tmp_path / "src", "tickets")
    for _ in range(2):
        assert cli(site, "adapters", "import", str(src), "tickets") == 0
    cfg = router_toml(site, 1, target=0.5, slm_model="tickets@v1")
    with site["store"].transaction() as conn:
        conn.execute("INSERT INTO promotions (ts, task, kind, from_model, to_model, actor) VALUES (?,?,?,?,?,?)",
                     (time.time(), "tickets", "promote", "Qwen/Qwen3-8B", "tickets@v1", "ann"))
    before = cfg.read_text()

    async def asks(read_only: bool, key: str) -> bool:
        app = make_app(store_path=site["root"] / "fd.db")
        app.options.router_config = cfg
        app.options.config = FleetConfig(adapter_roots=[site["roots"]], read_only=read_only)
        async with app.run_test(size=(120, 40)) as pilot:
            await open_screen(app, pilot, "5", RouterScreen)
            await pilot.press(key)
            await settle(app, pilot)
            return isinstance(app.screen, ConfirmScreen)

    for key in "epr":
        assert await asks(False, key), key  # with read-only off, each key asks its question ...
        assert not await asks(True, key), key  # ... and with it on, none does
    assert cfg.read_text() == before


def test_sighup_makes_the_running_proxy_read_its_config_again(site, tmp_path):
    """`kill -HUP` reloads like POST /admin/reload: a task added to the config is served, nothing restarts."""
    from tests.engines.stack import free_port, wait_http

    port = free_port()
    cfg = router_toml(site, port, target=0.5)
    proxy = _start_proxy(cfg, site["root"] / "fd.db")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        models = lambda: [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False).json()["data"]]  # noqa: E731
        assert models() == ["tickets"]
        cfg.write_text(cfg.read_text() + f'\n[[task]]\nname = "triage"\nslm_base_url = "{site["server"].base_url}/v1"\n'
                                          'slm_model = "Qwen/Qwen3-8B"\nthreshold = 0.0\n')
        proxy.send_signal(signal.SIGHUP)
        assert wait_for(lambda: models() == ["tickets", "triage"])
        cfg.write_text("[[task]]\nname = 3\n")  # a broken config: refused, the proxy keeps the last good one
        refused = httpx.post(f"http://127.0.0.1:{port}/admin/reload", trust_env=False, timeout=30)
        assert refused.status_code == 409 and "name" in refused.json()["error"]["message"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", trust_env=False, timeout=30,
                       json={"model": "triage", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and models() == ["tickets", "triage"] and proxy.poll() is None
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.communicate(timeout=30)
    assert proxy.returncode == 0
