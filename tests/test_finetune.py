"""Fine-tunes: the peft backend for real on CPU through the runner process, cancel and resume, the
saved adapter, dataset checks, the unsloth mapping and its no-GPU failure, VRAM refusals."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.adapters import registry as adapters
from engine.finetune import jobs
from engine.finetune.dataset import check_dataset
from engine.finetune.runner import unsloth_calls
from engine.finetune.spec import JobSpec, load_spec
from fleet.model import GpuSnapshot
from fleetdeck.cli import main
from store.db import open_store
from tests.fakes.tiny_model import make_dataset, make_tiny_model
from tests.helpers import WAIT_CEILING_S

GIB = 1024**3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_dataset(root / "data.jsonl")


def spec_file(tmp_path: Path, model: Path, data: Path, **extra) -> Path:
    body = {"name": "tickets-tiny", "base_model": str(model), "dataset": str(data), "backend": "peft", "lora_rank": 4,
            "max_steps": 8, "batch_size": 2, "gradient_accumulation_steps": 1, "save_steps": 2, "learning_rate": 0.001,
            "adapter_root": str(tmp_path / "adapters"), **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in body.items()]
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_state(store, rec, states, timeout=WAIT_CEILING_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rec = jobs.refresh(store, jobs.get(store, rec.id))
        if rec.state in states:
            return rec
        time.sleep(0.2)
    raise AssertionError(f"{rec.id} stayed {rec.state}; log:\n{Path(rec.log_path).read_text()[-2000:]}")


def test_peft_job_runs_on_cpu_is_cancelled_resumed_and_ends_with_a_servable_adapter(tmp_path, tiny):
    model, data = tiny
    store = open_store(tmp_path / "fd.db")
    spec = load_spec(spec_file(tmp_path, model, data, max_steps=400, save_steps=1))
    rec = jobs.start(store, spec, None)
    assert rec.env["HF_HUB_OFFLINE"] == "1" and str(rec.gpus) == "cpu"
    # Progress lines arrive while it trains.
    deadline = time.time() + WAIT_CEILING_S  # a safety net: the loop waits for the steps
    while (step := jobs.last_step(rec)) is None or step["step"] < 3:
        assert time.time() < deadline, Path(rec.log_path).read_text()[-2000:]
        time.sleep(0.1)
    assert math.isfinite(step["loss"]) and step["total_steps"] == 400 and step["tokens_per_s"] > 0
    # Cancel: the trainer stops at the end of a step, saves a checkpoint, and says so.
    again = open_store(store.path)  # a restarted dashboard re-attaches to the running job
    assert jobs.refresh(again, jobs.get(again, rec.id)).state == "running"
    rec = jobs.cancel(again, jobs.get(again, rec.id))
    assert rec.state == "cancelled"
    cancelled = [e for e in jobs.read_events(rec.progress_path) if e["event"] == "cancelled"][0]
    assert cancelled["checkpoint"] and Path(cancelled["checkpoint"]).is_dir()
    stopped_at = cancelled["step"]
    # Resume continues from the checkpoint, not from step 0. Shorten the run so the test ends soon.
    spec_json = rec.job_dir / "spec.json"
    spec_json.write_text(json.dumps({**json.loads(spec_json.read_text()), "max_steps": stopped_at + 4}))
    rec = jobs.resume(store, rec)
    rec = wait_state(store, rec, {"finished", "failed"})
    assert rec.state == "finished", rec.reason
    events = jobs.read_events(rec.progress_path)
    starts = [e for e in events if e["event"] == "start"]
    assert starts[-1]["resumed_at"] == stopped_at
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert all(math.isfinite(x) for x in losses)
    done = events[-1]
    adapter_dir = Path(done["adapter_path"])
    assert adapter_dir.parent == tmp_path / "adapters"
    meta = json.loads((adapter_dir / "fleetdeck.json").read_text())
    assert meta["base_model"] == str(model) and meta["final_loss"] == done["final_loss"]
    assert meta["dataset_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()  # the bytes it trained on
    # The adapter loads with PEFT and shows in the adapters list.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(adapter_dir))
    assert peft_model.peft_config["default"].r == 4
    found, _ = adapters.scan([tmp_path / "adapters"])
    assert [a.name for a in found] == ["tickets-tiny@v1"] and found[0].rank == 4
    # It is registered as an immutable version with its provenance: the job, who, and a content hash.
    assert (meta["version"], meta["origin"], meta["job_id"]) == (1, "job", rec.id) and len(meta["content_sha256"]) == 64
    from engine.adapters.registry import integrity_problem

    assert integrity_problem(found[0]) is None and (adapter_dir / "adapter_config.json").stat().st_mode & 0o222 == 0


def test_finetune_cli_check_start_ls_logs(tmp_path, tiny, capsys):
    model, data = tiny
    spec = spec_file(tmp_path, model, data, max_steps=3)
    db = str(tmp_path / "fd.db")
    assert main(["finetune", "check", str(spec), "--store", db]) == 0
    out = capsys.readouterr().out
    assert "24 examples (chat)" in out and "tokens per example" in out and "VRAM estimate" in out
    assert main(["finetune", "start", str(spec), "--gpus", "cpu", "--store", db]) == 0
    jid = capsys.readouterr().out.split()[1]
    store = open_store(db)
    rec = wait_state(store, jobs.get(store, jid), {"finished", "failed"})
    assert rec.state == "finished"
    assert main(["finetune", "ls", "--json", "--store", db]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["state"] == "finished" and doc["progress"]["step"] == 3
    assert main(["finetune", "logs", jid, "--store", db]) == 0
    assert "done: adapter at" in capsys.readouterr().out
    assert main(["finetune", "resume", jid, "--store", db]) == 2
    assert "already finished" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"text": "x"}', "missing fields"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role 'wizard'"),
        ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}', "empty content"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
        ('{"instruction": "do it"}', "missing field `output`"),
        ('{"messages": "hello"}', "non-empty list"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_each_bad_dataset_line_is_named_with_its_line_number(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    good = '{"instruction": "q", "input": "", "output": "a"}'
    path.write_text(f"{good}\n{line}\n{good}\n")
    report = check_dataset(path)
    assert not report.ok and report.examples == 2
    assert len(report.errors) == 1 and report.errors[0].startswith("line 2:") and message in report.errors[0]


def test_empty_and_binary_datasets(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    assert "empty" in check_dataset(empty).errors[0]
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert "not UTF-8" in check_dataset(binary).errors[0]
    assert "cannot read" in check_dataset(tmp_path / "missing.jsonl").errors[0]


def test_a_bad_dataset_refuses_the_job_and_starts_nothing(tmp_path, tiny):
    model, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    store = open_store(tmp_path / "fd.db")
    with pytest.raises(jobs.JobError, match="line 1: no assistant message"):
        jobs.start(store, load_spec(spec_file(tmp_path, model, bad)), None)
    assert jobs.list_jobs(store) == []


def test_vram_estimate_refuses_a_gpu_that_cannot_hold_it(tmp_path, tiny):
    model, data = tiny
    spec = load_spec(spec_file(tmp_path, model, data))
    small = GpuSnapshot(node="n", index=0, name="g", uuid="u", memory_total_bytes=24 * GIB, memory_used_bytes=int(23.5 * GIB))
    with pytest.raises(jobs.JobError, match=r"needs about 1\.0 GiB .* GPU 0 has 0\.5 GiB free.*--force"):
        jobs.preflight(spec, [small], force=False)
    jobs.preflight(spec, [small], force=True)


def test_unsloth_spec_to_call_mapping():
    spec = JobSpec(name="x", base_model=Path("/m"), dataset=Path("/d.jsonl"), lora_rank=64, max_steps=100)
    calls = unsloth_calls(spec, Path("/w/checkpoints"))
    assert calls["from_pretrained"] == {"model_name": "/m", "max_seq_length": 2048, "dtype": None, "load_in_4bit": True,
                                        "local_files_only": True}
    g = calls["get_peft_model"]
    assert g["r"] == 64 and g["lora_alpha"] == 64.0 and g["use_gradient_checkpointing"] == "unsloth"
    assert g["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert calls["sft_config"]["max_steps"] == 100 and calls["sft_config"]["optim"] == "adamw_8bit"


def test_unsloth_without_a_gpu_fails_clearly(tmp_path, tiny):
    model, data = tiny
    spec = load_spec(spec_file(tmp_path, model, data, backend="unsloth"))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "spec.json").write_text(spec.model_dump_json())
    out = subprocess.run([sys.executable, "-m", "engine.finetune.runner", "--fleetdeck-job", "j", "--spec", str(tmp_path / "w" / "spec.json"),
                          "--workdir", str(tmp_path / "w")], capture_output=True, text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 1
    last = jobs.read_events(tmp_path / "w" / "progress.jsonl")[-1]
    assert last["event"] == "error" and last["kind"] == "no_gpu" and 'backend = "peft"' in last["reason"]
    store = open_store(tmp_path / "fd.db")
    with pytest.raises(jobs.JobError, match="needs a GPU"):
        jobs.start(store, spec, None)


def test_spec_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "job.toml"
    bad.write_text('name = "has space"\nbase_model = "m"\ndataset = "d"\nlora_rank = 0\nbackend = "magic"\n')
    assert main(["finetune", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "lora_rank" in err and "backend" in err


# -- the data an adapter was trained on is the data that was checked --------------------------------------------
def test_a_dataset_is_refused_unless_it_is_a_regular_file_and_a_pipe_never_blocks_the_check(tmp_path):
    import os

    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)  # nothing writes it: reading it would block the check for ever
    assert check_dataset(fifo).errors == [f"cannot read {fifo}: it is not a regular file (a pipe, socket or device)"]
    assert check_dataset(Path("/dev/zero")).errors[0].endswith("not a regular file (a pipe, socket or device)")
    assert check_dataset(tmp_path).errors == [f"cannot read {tmp_path}: it is a folder"]


def test_a_line_without_end_is_skipped_in_pieces_named_and_hashed(tmp_path, monkeypatch):
    """A file with no newline must not take the host's memory: past the bound the line is named and skipped,
    the lines after it are still checked under their own numbers, and the hash covers every byte."""
    from engine.finetune import dataset

    monkeypatch.setattr(dataset, "MAX_LINE_BYTES", 100)
    good = '{"instruction": "q", "output": "a"}'
    data = (good + "\n" + '{"instruction": "' + "x" * 450 + '", "output": "a"}\n' + good + "\n{bad\n").encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    report = check_dataset(path)
    assert report.errors == ["line 2: longer than 0 MiB", "line 4: invalid JSON (Expecting property name enclosed "
                             "in double quotes at column 2)"]
    assert (report.lines, report.examples) == (4, 2)
    assert report.sha256 == hashlib.sha256(data).hexdigest()


def sim_spec(tmp_path: Path, model: Path, data: Path) -> Path:
    return spec_file(tmp_path, model, data, backend="simulated", max_steps=400)


def test_a_dataset_changed_after_the_check_is_never_trained_on(tmp_path, tiny):
    """The runner reads the dataset once and holds it to the SHA-256 the start's check took: a dataset edited
    between the check and the first step fails the job before a step, and no adapter is written."""
    from engine.finetune import runner
    from fleet.procs import JOB_FLAG

    model, data = tiny
    copy = tmp_path / "data.jsonl"
    copy.write_bytes(data.read_bytes())
    spec = load_spec(spec_file(tmp_path, model, copy, backend="simulated", max_steps=2))
    checked = check_dataset(copy)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    with copy.open("a") as fh:
        fh.write('{"instruction": "added after the check", "output": "x"}\n')
    work = tmp_path / "work"
    code = runner.main([JOB_FLAG, "ft-x", "--spec", str(tmp_path / "spec.json"), "--workdir", str(work),
                        "--dataset-sha256", checked.sha256])
    assert code == runner.EXIT_FAILED
    (event,) = jobs.read_events(work / "progress.jsonl")
    assert event["event"] == "error" and event["kind"] == "dataset"
    assert "changed since the job was checked" in event["reason"] and checked.sha256[:12] in event["reason"]
    assert not (work / "adapter").exists() and not (tmp_path / "adapters").exists()


def test_the_adapter_names_the_bytes_it_trained_on_and_a_resume_on_other_data_is_refused(tmp_path, tiny, capsys):
    """job.start's audit record and the adapter's fleetdeck.json carry the dataset's SHA-256 as checked; a
    cancelled job whose dataset changed since will not resume (the checkpoint would go on over other data),
    and is refused with that reason before anything runs; with its data back, it resumes and finishes."""
    from engine.audit import trail as audit

    model, data = tiny
    copy = tmp_path / "data.jsonl"
    copy.write_bytes(data.read_bytes())
    sha = hashlib.sha256(copy.read_bytes()).hexdigest()
    db = str(tmp_path / "fd.db")
    assert main(["finetune", "start", str(sim_spec(tmp_path, model, copy)), "--gpus", "cpu", "--store", db]) == 0
    jid = capsys.readouterr().out.split()[1]
    store = open_store(db)
    (started,) = audit.query(store, action="job.start")
    assert json.loads(started["params"])["dataset_sha256"] == sha
    deadline = time.time() + WAIT_CEILING_S
    while jobs.last_step(jobs.get(store, jid)) is None:
        assert time.time() < deadline
        time.sleep(0.1)
    assert main(["finetune", "cancel", jid, "--store", db]) == 0
    original = copy.read_bytes()
    copy.write_bytes(original.replace(b"\n", b"\r\n", 1))  # one byte more: other data, as far as a hash goes
    capsys.readouterr()
    assert main(["finetune", "resume", jid, "--store", db]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "changed since the job started" in err and sha[:12] in err
    (refused,) = [r for r in audit.query(store, action="job.resume") if r["outcome"] == "refused"]
    assert "changed since the job started" in refused["reason"]
    assert jobs.get(store, jid).state == "cancelled"
    copy.write_bytes(original)
    spec_json = jobs.get(store, jid).job_dir / "spec.json"
    step = jobs.last_step(jobs.get(store, jid))["step"]
    spec_json.write_text(json.dumps({**json.loads(spec_json.read_text()), "max_steps": step + 1}))
    assert main(["finetune", "resume", jid, "--store", db]) == 0
    rec = wait_state(store, jobs.get(store, jid), {"finished", "failed"})
    assert rec.state == "finished", rec.reason
    done = jobs.read_events(rec.progress_path)[-1]
    meta = json.loads((Path(done["adapter_path"]) / "fleetdeck.json").read_text())
    assert meta["dataset_sha256"] == sha
