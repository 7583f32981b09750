"""vLLM servers through the real launcher against the fake vLLM executable: readiness, metrics,
crash diagnoses, re-attach, stop, preflight refusals, adapter compatibility and hot-swap."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import httpx
import pytest

from engine.adapters import registry as adapters
from engine.vllm import launcher
from engine.managed import LocalGpus
from engine.vllm import command
from engine.vllm.record import ServerState
from engine.vllm import record
from engine.vllm.command import LaunchError
from engine.vllm.metrics import figures, parse, quantile
from fleetdeck.cli import main
from store.db import open_store
from tests.helpers import FAKE_VLLM, FAKE_VLLM_CMD, WAIT_CEILING_S, h100, make_adapter, profile, wait_for


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.3")
    monkeypatch.delenv("FLEETDECK_SIM_CRASH", raising=False)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "fd.db")
    yield s
    for rec in launcher.list_servers(s):
        if rec.state not in ("stopped", "crashed"):
            launcher.stop(s, rec, timeout=5)


def start_ready(store, tmp_path, prof=None, **kw):
    rec, verdict = launcher.start(store, prof or profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path, **kw)
    rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    return rec, verdict


def test_a_server_starts_through_the_launcher_and_becomes_ready(store, tmp_path):
    rec, verdict = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    assert rec.state == "starting" and verdict.fits
    assert rec.env["CUDA_VISIBLE_DEVICES"] == "0" and rec.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert rec.argv[:4] == [sys.executable, FAKE_VLLM, "serve", "Qwen/Qwen3-8B"] and "--enable-lora" in rec.argv
    rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    assert rec.state == "ready", rec.reason
    models = httpx.get(f"{rec.base_url}/v1/models", trust_env=False).json()["data"]
    assert models[0]["id"] == "Qwen/Qwen3-8B"
    assert rec.predicted_kv_tokens == verdict.kv_tokens


def test_metrics_give_rates_quantiles_and_allocated_kv(store, tmp_path):
    rec, _ = start_ready(store, tmp_path)
    first = parse(httpx.get(f"{rec.base_url}/metrics", trust_env=False).text, time.time())
    for _ in range(5):
        r = httpx.post(f"{rec.base_url}/v1/chat/completions", trust_env=False,
                       json={"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
        assert r.status_code == 200
    time.sleep(0.2)
    second = parse(httpx.get(f"{rec.base_url}/metrics", trust_env=False).text, time.time())
    f = figures(second, first)
    assert f.generation_tps and f.generation_tps > 0 and f.prompt_tps > 0
    assert f.ttft_p50 is not None and f.e2e_p95 is not None and f.e2e_p95 >= f.e2e_p50
    assert f.kv_tokens == 29751 * 16 and f.running == 0 and f.kv_usage is not None
    assert f.prefix_hit_rate is not None and 0 <= f.prefix_hit_rate <= 1


def test_older_metric_names_are_accepted():
    text = "\n".join([
        "# TYPE vllm:gpu_cache_usage_perc gauge", 'vllm:gpu_cache_usage_perc{model_name="m"} 0.25',
        "# TYPE vllm:time_per_output_token_seconds histogram",
        'vllm:time_per_output_token_seconds_bucket{model_name="m",le="0.01"} 1.0',
        'vllm:time_per_output_token_seconds_bucket{model_name="m",le="0.1"} 3.0',
        'vllm:time_per_output_token_seconds_bucket{model_name="m",le="+Inf"} 4.0',
        'vllm:time_per_output_token_seconds_count{model_name="m"} 4.0',
        'vllm:time_per_output_token_seconds_sum{model_name="m"} 0.3',
        "# TYPE vllm:gpu_prefix_cache_hit_rate gauge", 'vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.4',
    ]) + "\n"
    f = figures(parse(text, 0.0), None)
    assert f.kv_usage == 0.25 and f.prefix_hit_rate == 0.4
    assert f.itl_p50 == pytest.approx(0.01 + 0.09 * (2 - 1) / 2)
    assert quantile([(0.1, 0), (float("inf"), 0)], 0.5) is None


@pytest.mark.parametrize(
    "mode, kind, text",
    [
        ("kv_blocks", "kv_blocks", "no memory left for KV-cache blocks"),
        ("max_len", "max_len", "set max_model_len to 18320"),
        ("free_memory", "free_memory", "another process holds memory"),
        ("oom_weights", "oom_weights", "CUDA ran out of memory"),
        ("model_missing", "model_missing", "model was not found"),
    ],
)
def test_each_crash_mode_gets_its_diagnosis(store, tmp_path, monkeypatch, mode, kind, text):
    monkeypatch.setenv("FLEETDECK_SIM_CRASH", mode)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.1")
    rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path)
    rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    assert rec.state == "crashed", rec.reason
    assert text in rec.reason and "Fix:" in rec.reason


def test_port_in_use_is_diagnosed(store, tmp_path):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path, port=port)
        rec = launcher.wait_ready(store, rec, timeout=WAIT_CEILING_S, poll=0.1)
    assert rec.state == "crashed" and "port is already in use" in rec.reason


def test_a_server_is_not_ready_while_another_process_answers_on_its_port(store, tmp_path, monkeypatch):
    """free_port's choice can be taken before the server binds it: another process's answers do not
    make this server ready, and its own do once it listens."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self):  # /health and /v1/models both answer 200, as a vLLM would
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        port = other.server_address[1]
        monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "600")  # ours has not bound its port yet
        rec, _ = launcher.start(store, profile(), [0], gpu_snapshots=[h100()], log_dir=tmp_path, port=port)
        assert record.probe(rec)  # the port answers...
        rec = launcher.refresh(store, rec)
        assert rec.state == "starting"  # ...but not from this server's processes
        assert not launcher.answered_by_own_process(rec)
    finally:
        other.shutdown()
        other.server_close()
    launcher.stop(store, rec, timeout=5)
    monkeypatch.setenv("FLEETDECK_SIM_START_DELAY", "0.1")
    with socket.socket() as s:  # a port the kernel picks at random: unlikely to be another run's next choice
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec, _ = start_ready(store, tmp_path, port=port)
    assert rec.state == "ready", rec.reason
    assert launcher.answered_by_own_process(rec)


def test_a_restarted_dashboard_reattaches_and_notices_deaths(store, tmp_path):
    rec, _ = start_ready(store, tmp_path)
    other, _ = start_ready(store, tmp_path)
    again = open_store(store.path)  # a new dashboard process opens the same store
    recs = {r.id: launcher.refresh(again, r) for r in launcher.list_servers(again)}
    assert recs[rec.id].state == "ready" and recs[other.id].state == "ready"
    os.killpg(other.pid, signal.SIGKILL)  # died while the dashboard was closed
    # SIGKILL is delivered when the kernel schedules the process: wait for the death, not a duration.
    assert wait_for(lambda: launcher.refresh(again, launcher.get(again, other.id)).state == "crashed")
    # A pid whose create time differs is not ours, even if something runs under it.
    with again.transaction() as conn:
        conn.execute("UPDATE managed SET create_time = create_time - 1000 WHERE id = ?", (rec.id,))
    assert launcher.refresh(again, launcher.get(again, rec.id)).state == "crashed"
    launcher.stop(again, launcher.get(again, rec.id), timeout=0.1)  # the record is closed; the process is killed below
    os.killpg(rec.pid, signal.SIGKILL)


def test_stop_ends_the_process_group(store, tmp_path):
    rec, _ = start_ready(store, tmp_path)
    rec = launcher.stop(store, rec)
    assert rec.state == "stopped"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{rec.base_url}/health", trust_env=False, timeout=1)


def test_preflight_refuses_with_figures_and_force_overrides(store, tmp_path):
    busy = h100(free_gib=20.0)
    with pytest.raises(LaunchError) as exc:
        launcher.start(store, profile(), [0], gpu_snapshots=[busy], log_dir=tmp_path)
    assert "less than desired GPU memory utilization" in str(exc.value) and "--force" in str(exc.value)
    assert launcher.list_servers(store) == []
    rec, verdict = launcher.start(store, profile(), [0], gpu_snapshots=[busy], log_dir=tmp_path, force=True)
    assert not verdict.fits and rec.state == "starting"
    with pytest.raises(LaunchError, match="tensor_parallel_size 2"):
        launcher.start(store, profile(tensor_parallel_size=2), [0], gpu_snapshots=[h100()], log_dir=tmp_path)


def test_no_gpu_readings_refuses_unless_forced(store, tmp_path):
    with pytest.raises(LaunchError, match="could not be checked"):
        launcher.start(store, profile(), [0], gpu_snapshots=None, log_dir=tmp_path)


def test_adapter_registry_reads_rank_alpha_targets_and_flags_bad_folders(tmp_path):
    root = tmp_path / "adapters"
    make_adapter(root, "tickets-v3", rank=64)
    make_adapter(root, "broken", weights=False)
    (root / "not-json").mkdir()
    (root / "not-json" / "adapter_config.json").write_text("{oops")
    (root / "not-json" / "adapter_model.bin").write_bytes(b"x")
    found, problems = adapters.scan([root, tmp_path / "missing-root"])
    assert [a.name for a in found] == ["tickets-v3"]
    a = found[0]
    assert (a.rank, a.alpha, a.target_modules, a.base_model) == (64, 128.0, ["q_proj", "v_proj"], "Qwen/Qwen3-8B")
    joined = "\n".join(problems)
    assert "no adapter_model.safetensors" in joined and "not valid JSON" in joined and "does not exist" in joined


def test_compatibility_checks_before_loading():
    ad = adapters.Adapter("a", "/x", 128, 256, [], "meta-llama/Llama-3.1-8B-Instruct", 1)
    problems = adapters.compatibility_problems(ad, "Qwen/Qwen3-8B", lora_enabled=False, max_lora_rank=64)
    assert len(problems) == 3
    ok = adapters.Adapter("b", "/x", 16, 32, [], "/srv/models/Qwen3-8B", 1)
    assert adapters.compatibility_problems(ok, "Qwen/Qwen3-8B", True, 64) == []


def test_load_unload_and_swap_in_a_running_server(store, tmp_path):
    rec, _ = start_ready(store, tmp_path)
    root = tmp_path / "adapters"
    v1, v2 = make_adapter(root, "tickets-v1"), make_adapter(root, "tickets-v2")
    assert "added successfully" in adapters.load(rec.base_url, "tickets", str(v1))
    with pytest.raises(adapters.AdapterError, match="already been loaded"):
        adapters.load(rec.base_url, "tickets", str(v1))
    assert [m["id"] for m in adapters.loaded(rec.base_url)] == ["tickets"]
    msg = adapters.swap(rec.base_url, "tickets", "tickets-next", str(v2))
    assert msg == "tickets-next loaded, then tickets unloaded"
    assert [m["id"] for m in adapters.loaded(rec.base_url)] == ["tickets-next"]
    with pytest.raises(adapters.AdapterError, match="cannot be found"):
        adapters.unload(rec.base_url, "tickets")
    too_big = make_adapter(root, "huge", rank=128)
    with pytest.raises(adapters.AdapterError, match="max_lora_rank"):
        adapters.load(rec.base_url, "huge", str(too_big))


def test_serve_and_adapters_commands(store, tmp_path, capsys):
    prof = tmp_path / "p.toml"
    prof.write_text('name = "q"\nmodel = "Qwen/Qwen3-8B"\n[lora]\nenable = true\nmax_lora_rank = 32\n')
    root = tmp_path / "adapters"
    make_adapter(root, "tickets-v1")
    make_adapter(root, "big", rank=64)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'adapter_roots = ["{root}"]\n')
    db = str(store.path)
    common = ["--store", db, "--config", str(fleet)]
    assert main(["serve", "start", str(prof), "--gpus", "3", "--simulated", "--wait", *common]) == 0
    out = capsys.readouterr().out
    assert "started q-" in out and "ready" in out
    assert main(["serve", "ls", "--json", *common]) == 0
    (srv,) = json.loads(capsys.readouterr().out)
    assert srv["state"] == "ready" and srv["gpus"] == "3"
    assert main(["adapters", "load", srv["id"], "tickets-v1", *common]) == 0
    assert "added successfully" in capsys.readouterr().out
    assert main(["adapters", "load", srv["id"], "big", *common]) == 2
    assert "above the server's max LoRA rank 32" in capsys.readouterr().err
    # serve ls / show --json carry what the Servers screen shows: live figures, the plan, loaded adapters
    assert main(["serve", "show", srv["id"], "--json", "--interval", "0.2", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    fig = shown["figures"]
    assert shown["loaded_adapters"] == ["tickets-v1"] and shown["predicted_kv_tokens"] > 0
    assert fig["kv_tokens"] == 29751 * 16 and fig["running"] == 0 and fig["kv_usage"] is not None
    assert {"generation_tps", "prompt_tps", "ttft_p50", "ttft_p95", "e2e_p50", "e2e_p95", "preemptions",
            "prefix_hit_rate", "waiting"} <= set(fig)
    assert main(["serve", "ls", "--json", "--interval", "0", *common]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["figures"]["kv_tokens"] == fig["kv_tokens"] and listed["loaded_adapters"] == ["tickets-v1"]
    assert main(["serve", "show", "nope", *common]) == 2
    capsys.readouterr()
    assert main(["adapters", "ls", "--json", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["loaded"][srv["id"]] == ["tickets-v1"] and {a["name"] for a in doc["adapters"]} == {"tickets-v1", "big"}
    assert main(["adapters", "unload", srv["id"], "tickets-v1", *common]) == 0
    assert main(["serve", "logs", srv["id"], *common]) == 0
    assert "Starting vLLM API server" in capsys.readouterr().out
    assert main(["serve", "stop", srv["id"], *common]) == 0
    assert main(["serve", "stop", "nope", *common]) == 2


def test_serve_start_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmodel = "m"\nport = 99999\nmax_model_len = "long"\n')
    assert main(["serve", "start", str(bad), "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert "port" in err and "max_model_len" in err
    assert main(["serve", "start", "no-such-profile", "--gpus", "0"]) == 2
    assert "no profile" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('name = "x"\nmodel = "Qwen/Qwen3-8B"\n')
    assert main(["serve", "start", str(good), "--gpus", "0,0"]) == 2
    assert "distinct" in capsys.readouterr().err


def test_a_local_start_on_a_gpu_this_host_lacks_is_refused_forced_or_not(tmp_path, capsys, monkeypatch):
    """Without NVML a start has no plan and needs --force; even forced, it names GPUs this host has (NVML's,
    else its driver's list): GPU 99 is refused in one line, recorded as a refusal, and nothing starts."""
    from engine.audit import trail as audit

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    good = tmp_path / "good.toml"
    good.write_text('name = "x"\nmodel = "Qwen/Qwen3-8B"\n')
    db = tmp_path / "fd.db"
    for force in ([], ["--force"]):
        assert main(["serve", "start", str(good), "--gpus", "99", *force, "--store", str(db)]) == 2
        err = capsys.readouterr().err
        assert "no GPU [99] on" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    store = open_store(db)
    assert launcher.list_servers(store) == []
    assert [r["outcome"] for r in audit.query(store, action="server.start")] == ["refused", "refused"]


def test_a_live_api_process_whose_engine_died_is_crashed_with_that_reason(store, tmp_path):
    """/health is not trusted alone: once seen, vLLM's engine process must stay alive too."""
    import subprocess

    import psutil

    from tests.helpers import wait_for

    # A stand-in API server whose child is titled as vLLM titles its engine (argv[0] VLLM::EngineCore).
    api = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['bash', '-c', "
                            "'exec -a VLLM::EngineCore sleep 600']); time.sleep(600)"], start_new_session=True)
    try:
        rec = record.ServerRecord(
            id="standin-1", name="standin", node="n", pid=api.pid, create_time=psutil.Process(api.pid).create_time(),
            argv=[], env={}, gpus=LocalGpus((0,)), port=1, log_path=str(tmp_path / "standin.log"), spec={},
            state=ServerState.STARTING,
            reason=None, started_at=time.time())
        rec.save(store)
        assert wait_for(lambda: launcher.refresh(store, launcher.get(store, rec.id)).engine_pid is not None)
        engine_pid = launcher.get(store, rec.id).engine_pid  # remembered in the store for a restarted dashboard
        assert engine_pid != api.pid and psutil.Process(engine_pid).cmdline()[0] == "VLLM::EngineCore"
        os.kill(engine_pid, signal.SIGKILL)
        assert wait_for(lambda: launcher.refresh(store, launcher.get(store, rec.id)).state == "crashed")
        reason = launcher.get(store, rec.id).reason
        assert f"engine process (pid {engine_pid}) died while its API server (pid {api.pid}) still runs" in reason
    finally:
        os.killpg(api.pid, signal.SIGKILL)
        api.wait(timeout=10)


# -- where a server listens ---------------------------------------------------------------------------------
def test_a_launched_server_listens_on_loopback_only(store, tmp_path):
    import psutil

    rec, _ = start_ready(store, tmp_path)
    assert rec.argv[rec.argv.index("--host") + 1] == "127.0.0.1"
    # The simulator (the demo's vLLM) listens where it is told: loopback, not every interface.
    sockets = [c for p in [psutil.Process(rec.pid), *psutil.Process(rec.pid).children(recursive=True)]
               for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert sockets and {c.laddr.ip for c in sockets} == {"127.0.0.1"}, sockets
    assert {c.laddr.port for c in sockets} == {rec.port}


def _host_profile(tmp_path, extra: str):
    path = tmp_path / "exposed.toml"
    path.write_text(f'name = "exposed"\nmodel = "Qwen/Qwen3-8B"\n{extra}\n')
    return str(path)


@pytest.mark.parametrize("extra,why", [
    ('host = "0.0.0.0"', "without an API key"),
    ('host = "10.1.2.3"', "without an API key"),
    ('host = "0.0.0.0"\napi_key_env = "FD_TEST_UNSET_KEY"', "FD_TEST_UNSET_KEY, which is not set"),
])
def test_a_server_exposed_without_a_key_is_refused_in_one_line_and_audited(tmp_path, capsys, monkeypatch, extra, why):
    from engine.audit import trail as audit

    monkeypatch.delenv("FD_TEST_UNSET_KEY", raising=False)
    db = tmp_path / "fd.db"
    assert main(["serve", "start", _host_profile(tmp_path, extra), "--gpus", "0", "--simulated", "--store", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0], err
    (rec,) = audit.query(open_store(db))
    assert (rec["action"], rec["target"], rec["outcome"]) == ("server.start", "exposed", "refused") and why in rec["reason"]
    assert launcher.list_servers(open_store(db)) == []  # nothing started


@pytest.mark.parametrize("extra,env", [
    ('host = "0.0.0.0"\nallow_unauthenticated = true', {}),
    ('host = "0.0.0.0"\napi_key_env = "FD_TEST_KEY"', {"FD_TEST_KEY": "s3cret"}),
    ('host = "127.0.0.2"', {}),  # loopback needs no key
])
def test_a_named_host_goes_on_the_command_line_when_allowed(tmp_path, capsys, monkeypatch, extra, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "start", _host_profile(tmp_path, extra), "--gpus", "0", "--dry-run"]) == 0
    command = capsys.readouterr().out.splitlines()[0].split()
    assert command[command.index("--host") + 1] == extra.split('"')[1]
    assert "s3cret" not in " ".join(command)


def test_a_slurm_server_listens_on_its_nodes_interfaces_so_it_needs_a_key(store):
    """Slurm picks the compute node when the job starts, and the login node reaches the server at that node's
    address: loopback would be unreachable, so the host is every interface, and the rule for a host other
    than loopback holds (refused before anything is submitted)."""
    from types import SimpleNamespace

    plain = profile(name="on-slurm")
    assert command.listen_host(plain, slurm=True) == "0.0.0.0" and command.listen_host(plain) == "127.0.0.1"
    with pytest.raises(LaunchError, match="without an API key"):
        launcher.start(store, plain, [], slurm=SimpleNamespace(gpus=1))
    assert command.listen_host(profile(host="node7.cluster"), slurm=True) == "node7.cluster"


@pytest.mark.parametrize("host", ["0.0.0.0; id", "-h", "a b", "", "x" * 300])
def test_a_profile_host_must_be_an_address_or_a_host_name(host):
    with pytest.raises(ValueError):
        profile(host=host)


def test_a_server_with_a_key_answers_only_clients_that_send_it(store, tmp_path, monkeypatch):
    """What makes a host other than loopback acceptable: the key from api_key_env reaches the server (as
    VLLM_API_KEY, which vLLM and the simulator read) and the server refuses a client without it."""
    monkeypatch.setenv("FD_TEST_KEY", "s3cret")
    rec, _ = start_ready(store, tmp_path, profile(api_key_env="FD_TEST_KEY"))
    assert "s3cret" not in " ".join(rec.argv)
    assert httpx.get(f"{rec.base_url}/v1/models", trust_env=False).status_code == 401
    ok = httpx.get(f"{rec.base_url}/v1/models", trust_env=False, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
