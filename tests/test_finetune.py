"""Fine-tunes: the peft backend for real on CPU through the runner process, cancel and resume, the
saved adapter, dataset checks, the unsloth mapping and its no-GPU failure, VRAM refusals."""

from __future__ import annotations

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
    assert meta["base_model"] == str(model) and len(meta["dataset_sha256"]) == 64 and meta["final_loss"] == done["final_loss"]
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
