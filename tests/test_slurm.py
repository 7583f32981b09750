"""Fine-tunes through a real one-host Slurm cluster (tests/slurm_cluster.py): submitted with the CLI,
pending on resources while another job holds both GPUs, running and progressing, cancelled with a
checkpoint (SIGTERM to the batch process), resumed by resubmission, finished with its adapter version;
a job that fails shows Slurm's state and the runner's reason; the queue and nodes as Slurm sees them;
read-only refuses the submission. Skipped, saying so, where Slurm's packages are not installed
(.ci/run installs them)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from engine.slurm import client as slurm
from engine.finetune import jobs
from engine.vllm.record import ServerState
from fleetdeck.cli import main
from store.db import open_store
from tests.fakes.tiny_model import make_dataset, make_tiny_model
from tests.slurm_cluster import SlurmCluster, missing
from tests.helpers import WAIT_CEILING_S, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    absent = missing()
    if absent:
        pytest.skip(f"Slurm is not installed here (no {', '.join(absent)}): apt-get install slurmctld slurmd "
                    "slurm-client munge, as .ci/run does")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture
def site(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    model = make_tiny_model(tmp_path / "model")
    data = make_dataset(tmp_path / "data.jsonl")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'adapter_roots = ["{tmp_path / "adapters"}"]\n[slurm]\nenabled = true\nconf = "{cluster.conf}"\n'
                     'partition = "gpu"\ngpu_memory_gib = 80\nsignal_before_s = 60\n')
    spec = tmp_path / "job.toml"
    spec.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {
        "name": "tickets", "base_model": str(model), "dataset": str(data), "backend": "peft", "lora_rank": 4,
        "max_steps": 400, "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 1,
        "learning_rate": 0.001, "load_in_4bit": False}.items()) + "\n")
    yield {"root": tmp_path, "fleet": fleet, "spec": spec, "db": tmp_path / "fd.db", "cluster": cluster}
    store = open_store(tmp_path / "fd.db")
    for rec in jobs.list_jobs(store):  # nothing this test submitted outlives it
        if rec.slurm is not None and rec.state == "running":
            try:
                slurm.cancel(slurm.Where(str(cluster.conf)), rec.slurm.id)
            except slurm.SlurmError:
                pass


def run(site, *args: str) -> int:
    return main([*args, "--store", str(site["db"]), "--config", str(site["fleet"])])


def wait(site, job_id: str, cond, timeout: float = WAIT_CEILING_S) -> jobs.JobRecord:
    store = open_store(site["db"])
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = jobs.refresh(store, jobs.get(store, job_id))
        if cond(rec):
            return rec
        time.sleep(0.3)
    raise AssertionError(f"{job_id}: {rec.state} {rec.reason}\n{Path(rec.log_path).read_text()[-2000:] if Path(rec.log_path).exists() else ''}")


def test_a_finetune_waits_for_gpus_runs_is_cancelled_resumed_and_finishes_through_slurm(site, capsys):
    cluster = site["cluster"]
    holder = cluster.sbatch("--gres=gpu:2", "--partition=gpu", "--output=/dev/null", "--wrap=sleep 600")
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1", "--time", "30") == 0
    out = capsys.readouterr().out
    job_id = out.split()[1]
    rec = wait(site, job_id, lambda r: r.slurm.reason == "Resources")
    assert rec.state == "running" and rec.slurm.state == "PENDING"
    options = rec.slurm.options
    assert "--gres=gpu:1" in options and "--partition=gpu" in options and "--time=30" in options
    assert "--signal=B:TERM@60" in options and any(o.startswith("--comment=") and "GiB" in o for o in options)
    assert run(site, "finetune", "ls") == 0
    assert "PENDING (Resources)" in capsys.readouterr().out

    # The queue as Slurm sees it: the holder runs on both GPUs, the fine-tune waits.
    view = slurm.cluster(slurm.Where(str(cluster.conf)))
    assert view.error is None and [n["gpus"] for n in view.nodes] == [2] and view.nodes[0]["gpus_alloc"] == 2
    assert {q["state"] for q in view.queue} == {"RUNNING", "PENDING"}
    assert {p["partition"] for p in view.partitions} == {"debug", "gpu"}

    slurm.cancel(slurm.Where(str(cluster.conf)), holder)
    rec = wait(site, job_id, lambda r: (jobs.last_step(r) or {}).get("step", 0) >= 3)
    assert rec.slurm.state == "RUNNING" and rec.slurm.node == "fdnode"

    # Cancel: SIGTERM to the batch process; the runner saves a checkpoint and stops.
    assert run(site, "finetune", "cancel", job_id) == 0
    rec = jobs.get(open_store(site["db"]), job_id)
    assert rec.state == "cancelled", rec.reason
    cancelled = [e for e in jobs.read_events(rec.progress_path) if e["event"] == "cancelled"][0]
    assert cancelled["checkpoint"] and Path(cancelled["checkpoint"]).is_dir()
    first_slurm_id = rec.slurm.id

    # Resume: resubmitted, continues from the checkpoint, ends with its adapter version.
    spec_json = rec.job_dir / "spec.json"
    spec_json.write_text(json.dumps({**json.loads(spec_json.read_text()), "max_steps": cancelled["step"] + 3}))
    assert run(site, "finetune", "resume", job_id) == 0
    rec = wait(site, job_id, lambda r: r.state != "running")
    assert rec.state == "finished", rec.reason
    assert rec.slurm.id != first_slurm_id
    starts = [e for e in jobs.read_events(rec.progress_path) if e["event"] == "start"]
    assert starts[-1]["resumed_at"] == cancelled["step"]
    assert Path(rec.outputs.adapter_path).name == "tickets@v1"


def test_a_failing_slurm_job_shows_slurms_state_and_the_runners_reason(site, capsys):
    cluster = site["cluster"]
    holder = cluster.sbatch("--gres=gpu:2", "--partition=gpu", "--output=/dev/null", "--wrap=sleep 600")
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1") == 0
    job_id = capsys.readouterr().out.split()[1]
    rec = wait(site, job_id, lambda r: r.slurm.state == "PENDING")
    # While it waits, its base model goes away: the runner fails when Slurm starts it.
    model = Path(json.loads(rec.job_dir.joinpath("spec.json").read_text())["base_model"])
    (model / "config.json").rename(model / "config.json.gone")
    try:
        slurm.cancel(slurm.Where(str(cluster.conf)), holder)
        rec = wait(site, job_id, lambda r: r.state != "running")
    finally:
        (model / "config.json.gone").rename(model / "config.json")
    assert rec.state == "failed"
    assert rec.reason.startswith(f"Slurm {rec.slurm.id} ended FAILED (exit 1:0)"), rec.reason
    assert "config.json" in rec.reason  # the runner's own words


def test_what_bad_slurm_requests_get(site, tmp_path, capsys):
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "0,1") == 2
    assert "how many GPUs" in capsys.readouterr().err
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1", "--time", "soon") == 2
    assert "--time 'soon'" in capsys.readouterr().err
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1", "--partition", "nosuch") == 2
    err = capsys.readouterr().err
    assert "Slurm refused the job" in err and "partition" in err.lower()
    big = site["spec"].read_text().replace('"lora_rank" = 4', "").replace("lora_rank = 4", "lora_rank = 4")
    site["fleet"].write_text(site["fleet"].read_text().replace("gpu_memory_gib = 80", "gpu_memory_gib = 0.0001"))
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1") == 2
    assert "[slurm] gpu_memory_gib" in capsys.readouterr().err
    site["fleet"].write_text(site["fleet"].read_text().replace("enabled = true", "enabled = false"))
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1") == 2
    assert "Slurm is not configured" in capsys.readouterr().err
    assert big  # the spec itself was never changed
    assert run(site, "--read-only", "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1") == 2
    assert "read-only" in capsys.readouterr().err
    assert jobs.list_jobs(open_store(site["db"])) == []


async def test_fleet_and_jobs_screens_show_what_slurm_sees(site, capsys):
    from textual.widgets import DataTable

    from fleet.config import FleetConfig, SlurmSettings
    from tests.tui_helpers import make_app, ready, settle, static_text, until
    from tui.screens.jobs import JobsScreen

    cluster = site["cluster"]
    holder = cluster.sbatch("--gres=gpu:2", "--partition=gpu", "--output=/dev/null", "--job-name=holder",
                            "--wrap=sleep 600")
    assert run(site, "finetune", "start", str(site["spec"]), "--slurm", "--gpus", "1") == 0
    job_id = capsys.readouterr().out.split()[1]
    wait(site, job_id, lambda r: r.slurm.reason == "Resources")
    app = make_app(store_path=site["db"])
    app.options.config = FleetConfig(slurm=SlurmSettings(enabled=True, conf=cluster.conf))
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await ready(app, pilot)
            panel = app.screen.query_one("#fleet-slurm")
            await until(app, pilot, lambda: "queue:" in static_text(panel), "Slurm's queue on the Fleet screen")
            text = static_text(panel)
            node = next(line for line in text.splitlines() if line.startswith("fdnode"))
            assert node.split()[2] == "2/2" and "1 pending" in text
            assert "holder" in text and "(Resources)" in text
            await pilot.press("4")
            await settle(app, pilot)
            assert isinstance(app.screen, JobsScreen)
            table = app.screen.query_one("#jobs-table", DataTable)
            assert str(table.get_cell(job_id, "state")) == "pending"
            detail = static_text(app.screen.query_one("#jobs-detail"))
            assert "Slurm job" in detail and "PENDING (Resources)" in detail
    finally:
        slurm.cancel(slurm.Where(str(cluster.conf)), holder)


def test_a_login_nodes_agent_submits_to_its_own_slurm_and_refuses_what_is_not_a_request(site, tmp_path, monkeypatch,
                                                                                         capsys):
    """A dashboard asks a login node's agent; the agent submits with the node's own [slurm] settings."""
    from engine.nodes.agent import Agent
    from fleet.config import SlurmSettings
    from fleet.simulated import demo_fleet
    from tests.helpers import Pipe

    specs = tmp_path / "config" / "fleetdeck" / "finetune"
    specs.mkdir(parents=True)
    (specs / "tickets.toml").write_text(site["spec"].read_text())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    settings = SlurmSettings(enabled=True, conf=site["cluster"].conf, partition="gpu")
    pipe = Pipe(Agent(demo_fleet()[0], site["db"], [tmp_path / "adapters"], "9.9", interval_s=5, slurm=settings))
    pipe.next("hello")

    def ask(rid: int, args: dict) -> dict:
        pipe.send({"v": 2, "type": "request", "id": rid, "op": "start_job", "args": args})
        while True:
            msg = pipe.next("response", timeout=60)
            if msg["id"] == rid:
                return msg

    bad = [ask(1, {"spec": "tickets", "slurm": {"gpus": "all"}}),
           ask(2, {"spec": "tickets", "slurm": {"gpus": 1, "partition": "gpu --qos=high"}}),
           ask(3, {"spec": "tickets", "slurm": {"gpus": 1, "time": "$(reboot)"}}),
           ask(4, {"spec": "tickets", "slurm": {"gpus": 1, "script": "/tmp/x.sh"}})]
    assert [b["ok"] for b in bad] == [False] * 4
    assert "count 1-64" in bad[0]["error"] and "partition name" in bad[1]["error"]
    assert "--time" in bad[2]["error"] and "gpus, partition and time only" in bad[3]["error"]
    done = ask(5, {"spec": "tickets", "slurm": {"gpus": 1, "time": "20"}})
    assert done["ok"], done
    rec = done["result"]
    assert rec["slurm"]["id"].isdigit() and "--time=20" in rec["slurm"]["options"] and rec["gpus"] == "slurm:1"
    slurm.cancel(slurm.Where(str(site["cluster"].conf)), rec["slurm"]["id"])
    pipe.close()
    # The CLI's own view of the queue, as an operator on the login node reads it.
    assert run(site, "slurm") == 0
    out = capsys.readouterr().out
    assert out.startswith("partitions: debug* up/idle (1 node), gpu up/idle (1 node)")
    assert re.search(r"^fdnode +IDLE +0/2 +0/2$", out, re.M), out


def test_a_server_submitted_to_slurm_becomes_ready_is_stopped_and_one_the_scheduler_ends_shows_why(site, monkeypatch,
                                                                                                  capsys):
    from engine.vllm import launcher
    from tests.helpers import FAKE_VLLM_CMD

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)  # fleetdeck's vLLM simulator, run by Slurm
    prof = site["root"] / "sim.toml"
    # A Slurm server listens on its compute node's interfaces (the login node must reach it), so the profile
    # either names a key or says outright that it goes without one.
    prof.write_text('name = "sim"\nmodel = "Qwen/Qwen3-8B"\nmax_model_len = 8192\nallow_unauthenticated = true\n'
                    '[lora]\nenable = true\nmax_lora_rank = 16\n')
    assert run(site, "serve", "start", str(prof), "--slurm", "--gpus", "1", "--time", "30", "--wait") == 0
    out = capsys.readouterr().out
    sid = out.split()[1]
    assert "planner:" in out and f"{sid}: ready" in out
    listed = {s["id"]: s for s in json.loads(_ls(site, capsys))}
    srv = listed[sid]
    assert srv["state"] == "ready" and srv["gpus"] == "slurm:1" and srv["node"] == "fdnode"
    assert srv["base_url"] == f"http://127.0.0.1:{srv['port']}" and srv["figures"]["kv_usage"] is not None
    assert "CUDA_VISIBLE_DEVICES" not in srv["env"]  # Slurm sets it to the GPUs it allocated
    assert run(site, "serve", "stop", sid) == 0
    assert f"{sid}: stopped" in capsys.readouterr().out
    rec = launcher.get(open_store(site["db"]), sid)
    assert rec.state == "stopped" and rec.slurm.state in ("CANCELLED", "COMPLETED", "GONE")

    # One the scheduler (here: an administrator's scancel) ends under it: crashed, with Slurm's word for it.
    assert run(site, "serve", "start", str(prof), "--slurm", "--gpus", "1", "--wait") == 0
    sid = capsys.readouterr().out.split()[1]
    store = open_store(site["db"])
    slurm.cancel(slurm.Where(str(site["cluster"].conf)), launcher.get(store, sid).slurm.id)
    deadline = time.time() + WAIT_CEILING_S  # a safety net: the loop waits for the state
    while (rec := launcher.refresh(store, launcher.get(store, sid))).state != "crashed":
        assert time.time() < deadline, rec.reason
        time.sleep(0.3)
    assert "ended CANCELLED" in rec.reason and "cancelled outside fleetdeck" in rec.reason

    # Without the cluster's GPU size the profile cannot be planned: refused unless --force.
    site["fleet"].write_text(site["fleet"].read_text().replace("gpu_memory_gib = 80\n", ""))
    assert run(site, "serve", "start", str(prof), "--slurm", "--gpus", "1") == 2
    assert "gpu_memory_gib" in capsys.readouterr().err


def _ls(site, capsys) -> str:
    assert run(site, "serve", "ls", "--json", "--interval", "0") == 0
    return capsys.readouterr().out


def test_a_slurm_server_restarted_from_the_dashboard_is_resubmitted_with_the_same_request(site, monkeypatch, capsys):
    """The Servers screen's restart (LocalOps.restart_server) of a Slurm server: it used to read the GPUs as
    indices after the stop had run ("slurm:1" is not one), leaving the server stopped and the restart failed.
    Through a node's agent the same restart is tests/test_node_ops.py's."""
    from engine.managed import SlurmGpus
    from engine.nodes.local import LocalOps
    from engine.nodes.ops import restarted_text
    from engine.vllm import launcher
    from tests.helpers import FAKE_VLLM_CMD

    monkeypatch.setenv("FLEETDECK_VLLM", FAKE_VLLM_CMD)
    prof = site["root"] / "sim.toml"
    prof.write_text('name = "sim"\nmodel = "Qwen/Qwen3-8B"\nmax_model_len = 8192\nallow_unauthenticated = true\n')
    assert run(site, "serve", "start", str(prof), "--slurm", "--gpus", "1", "--time", "30", "--wait") == 0
    sid = capsys.readouterr().out.split()[1]
    store = open_store(site["db"])
    old = launcher.get(store, sid)
    assert old.gpus == SlurmGpus(1) and old.state == ServerState.READY

    from engine.audit import trail as audit

    with audit.session(site["db"], "tui"):  # as the dashboard records its actions
        done = LocalOps(store, []).restart_server(sid)
    (new,) = [r for r in launcher.list_servers(store) if r.id != sid]
    assert done.new.id == new.id and restarted_text(done).startswith(f"{sid} restarted as {new.id}")
    before = launcher.get(store, sid)
    assert before.state == ServerState.STOPPED and before.slurm.state in ("CANCELLED", "COMPLETED", "GONE")
    assert new.gpus == SlurmGpus(1) and new.port == old.port and new.slurm.id != old.slurm.id
    # The same request (partition, time limit, GPU count); its own name, log and folder.
    kept = [o for o in old.slurm.options if not o.startswith(("--job-name", "--output", "--error", "--chdir", "--comment"))]
    assert kept == [o for o in new.slurm.options
                    if not o.startswith(("--job-name", "--output", "--error", "--chdir", "--comment"))]
    assert "--time=30" in new.slurm.options and f"--job-name=fleetdeck-{new.id}" in new.slurm.options
    assert new.log_path != old.log_path and "a restart of " + sid in new.reason
    new = launcher.wait_ready(store, new, timeout=WAIT_CEILING_S)
    assert new.state == ServerState.READY, new.reason

    assert launcher.refresh(store, launcher.get(store, new.id)).state == ServerState.READY
    assert run(site, "serve", "stop", new.id) == 0
    # Audited as any start and stop: what, on what, and that it was done.
    done = [(r["action"], r["target"]) for r in audit.query(store) if r["outcome"] == "done"]
    assert ("server.stop", sid) in done and ("server.start", new.id) in done
