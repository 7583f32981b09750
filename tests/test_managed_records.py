"""The typed records: a placement parsed from, and written back as, the text the store and the agent's wire
hold; states as enums whose stored text is unchanged."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.finetune import jobs
from engine.finetune.jobs import JobRecord, JobState
from engine.managed import Cpu, LocalGpus, SlurmGpus, parse_placement
from engine.vllm import launcher
from engine.vllm.record import ServerRecord, ServerState
from store.db import open_store

PLACEMENTS = (st.builds(LocalGpus, st.lists(st.integers(0, 63), max_size=8).map(tuple)) | st.just(Cpu())
              | st.builds(SlurmGpus, st.integers(1, 64)))


@settings(max_examples=100, deadline=None)
@given(PLACEMENTS)
def test_a_placement_is_written_and_read_back_as_the_same_text(placement):
    assert parse_placement(str(placement)) == placement


def test_the_texts_earlier_stores_hold_parse_and_anything_else_is_refused():
    assert parse_placement("0,1") == LocalGpus((0, 1)) and parse_placement("") == LocalGpus(())
    assert parse_placement("cpu") == Cpu() and parse_placement("slurm:2") == SlurmGpus(2)
    for bad in ("slurm:", "slurm:x", "slurm:²", "0,,1", "gpu0", "0;1", "-1", " 0", "²"):
        with pytest.raises(ValueError, match="gpus must be"):
            parse_placement(bad)


def test_records_keep_their_stored_text_and_come_back_typed(tmp_path):
    store = open_store(tmp_path / "fd.db")
    common = dict(pid=None, create_time=None, argv=[], env={}, port=None, log_path="/x.log", spec={}, reason=None,
                  started_at=time.time())
    ServerRecord(id="s-1", name="s", node="n", gpus=SlurmGpus(2), state=ServerState.READY, **common).save(store)
    JobRecord(id="j-1", name="j", node="n", gpus=Cpu(), state=JobState.CANCELLED, **common).save(store)
    rows = {r["id"]: r for r in store.query("SELECT id, gpus, state FROM managed")}
    assert (rows["s-1"]["gpus"], rows["s-1"]["state"]) == ("slurm:2", "ready")
    assert (rows["j-1"]["gpus"], rows["j-1"]["state"]) == ("cpu", "cancelled")
    srv, job = launcher.get(store, "s-1"), jobs.get(store, "j-1")
    assert srv.gpus == SlurmGpus(2) and srv.state is ServerState.READY
    assert job.gpus == Cpu() and job.state is JobState.CANCELLED
    # The agent's wire: the same text, read back into the same record.
    assert srv.to_json()["gpus"] == "slurm:2" and ServerRecord.from_json(srv.to_json()).gpus == SlurmGpus(2)
