"""The ledger under faults: every row the proxy recorded is stored, durably journaled, or counted lost, and
what the writer says (counts, /metrics, /health, the stop line) is what happened.

Two levels: the journal writer with os.write/os.ftruncate/os.fsync made to fail for the journal's file only
(short writes, ENOSPC, EIO), and the real `fleetdeck proxy` over HTTP with its store and journal on real
size-limited filesystems (tmpfs), filled, stopped with SIGTERM and started again.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from store.db import open_store
from store.ledger import LedgerRow, LedgerWriter, journal_path, read_journal
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]


def row(i: int, **kw: Any) -> LedgerRow:
    base = dict(id=f"r{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident", status=200,
                confidence=0.9, latency_ms=3.0)
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


def cap_store(store) -> None:
    """The store refuses every write from here on (this connection only), as a full or failing disk does."""
    store.execute("PRAGMA query_only = ON")


def uncap_store(store) -> None:
    store.execute("PRAGMA query_only = OFF")


def stored_ids(db: Path) -> set[str]:
    store = open_store(db)
    try:
        return {r["id"] for r in store.query("SELECT id FROM requests")}
    finally:
        store.close()


def restart(db: Path, **kw: Any) -> LedgerWriter:
    """A new writer on the same store (what the next proxy start does), closed at once."""
    store = open_store(db)
    writer = LedgerWriter(store, **kw)
    writer.close(5)
    store.close()
    return writer


def balanced(writer: LedgerWriter) -> bool:
    c = writer.counts()
    return c.recorded == c.stored + c.journaled + c.unjournaled + c.lost


# --- the journal writer, faults injected for the journal's file descriptor only ---------------------------
def test_a_short_write_is_cut_back_and_that_row_counted_not_journaled(tmp_path, monkeypatch):
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)  # nothing reaches the store this run: every row must be journaled or counted lost
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd: int, data: bytes) -> int:
        if fd == writer._fd:
            calls["n"] += 1
            if calls["n"] == 7:
                return real_write(fd, data[: len(data) // 2])  # a full disk took half the line...
            if calls["n"] == 8:
                raise OSError(errno.ENOSPC, "No space left on device")  # ...and none of the rest
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_then_full)
    for i in range(20):
        writer.put(row(i))
    assert wait_for(lambda: writer.write_failures > 0)
    assert balanced(writer) and writer.counts().unjournaled == 1 and writer.journal_failures == 1
    report = writer.close(0)
    monkeypatch.undo()
    c = report.counts
    assert (c.recorded, c.stored, c.journaled, c.lost) == (20, 0, 19, 1)
    assert "1 not stored" in report.summary() and "write failed after" in report.summary()
    found = read_journal(journal_path(store))
    assert found.unreadable == 0 and not found.torn_tail  # the half line was cut back
    assert len(found.rows) == 19 and "r6" not in {r.id for r in found.rows}
    store.close()
    again = restart(db)
    assert again.replayed == 19 and again.unreadable == 0
    assert stored_ids(db) == {f"r{i}" for i in range(20)} - {"r6"}
    assert restart(db).replayed == 0  # replayed once, never twice


def test_a_torn_line_that_cannot_be_cut_back_takes_no_neighbour_with_it(tmp_path, monkeypatch):
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    real_write, real_truncate = os.write, os.ftruncate
    calls = {"n": 0}

    def torn(fd: int, data: bytes) -> int:
        if fd == writer._fd:
            calls["n"] += 1
            if calls["n"] == 4:
                return real_write(fd, data[:30])
            if calls["n"] == 5:
                raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    def no_truncate(fd: int, length: int) -> None:
        if fd == writer._fd:
            raise OSError(errno.EIO, "Input/output error")
        real_truncate(fd, length)

    monkeypatch.setattr(os, "write", torn)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    for i in range(10):
        writer.put(row(i))
    report = writer.close(0)
    monkeypatch.undo()
    assert (report.counts.journaled, report.counts.lost) == (9, 1)
    found = read_journal(journal_path(store))
    assert found.unreadable == 1 and len(found.rows) == 9  # the torn line is one line; the next starts anew
    store.close()
    again = restart(db)
    assert again.replayed == 9 and again.unreadable == 1
    assert len(stored_ids(db)) == 9
    assert restart(db).replayed == 0


def test_a_failed_fsync_means_the_journal_is_not_counted_as_keeping_anything(tmp_path, monkeypatch):
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if fd == writer._fd:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    for i in range(12):
        writer.put(row(i))
    # The store refuses, so the writer syncs the journal that now holds the rows: that fails, and says so.
    assert wait_for(lambda: writer.journal_error is not None and "fsync" in writer.journal_error)
    report = writer.close(0)
    monkeypatch.undo()
    assert (report.counts.stored, report.counts.journaled, report.counts.lost) == (0, 0, 12)
    assert "could not be synced to disk" in report.summary() and "Input/output error" in report.summary()
    store.close()
    # The lines may still be readable (the page cache kept them): then the next start stores them once.
    again = restart(db)
    assert again.replayed <= 12 and len(stored_ids(db)) == again.replayed


def test_rows_dropped_from_memory_wait_in_the_journal_for_the_next_start(tmp_path, monkeypatch, caplog):
    import store.ledger as ledger_module

    def dropped() -> int:
        return sum(int(m.group(1)) for r in list(caplog.records)
                   if (m := re.match(r"ledger: (\d+) row\(s\) dropped from memory", r.getMessage())))

    monkeypatch.setattr(ledger_module, "MAX_PENDING", 5)
    db = tmp_path / "fd.db"
    store = open_store(db)
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    with caplog.at_level("ERROR", logger="fleetdeck.ledger"):
        for i in range(20):
            writer.put(row(i))
        assert wait_for(lambda: dropped() == 15 and writer.pending == 5)
    uncap_store(store)  # space returns: the 5 in memory are stored, the 15 others wait in the journal
    assert wait_for(lambda: writer.pending == 0)
    report = writer.close(5)
    assert (report.counts.stored, report.counts.journaled, report.counts.lost) == (5, 15, 0)
    store.close()
    assert restart(db).replayed == 15
    assert len(stored_ids(db)) == 20


def test_a_stop_on_a_full_store_is_bounded_and_says_where_every_row_is(tmp_path):
    store = open_store(tmp_path / "fd.db")
    cap_store(store)
    writer = LedgerWriter(store, flush_every_s=0.01, retry_every_s=0.05)
    for i in range(30):
        writer.put(row(i))
    report = writer.close(0.2)  # the store never comes back: the close gives up at its bound
    assert report.counts.journaled == 30 and report.counts.lost == 0
    assert "0 ledger row(s) stored this run, 30 held in the journal" in report.summary()
    writer.put(row(99))  # a row after the reckoning is counted, never silently dropped
    assert writer.counts().lost == 1 and writer.close() is report


KILLED_WRITER = """
import sys, time
from store.db import open_store
from store.ledger import LedgerRow, LedgerWriter
writer = LedgerWriter(open_store(sys.argv[1]), flush_every_s=3600)  # nothing reaches the store before the kill
for i in range(40):
    writer.put(LedgerRow(id=f"k{i}", ts=time.time(), task="t", route="slm", escalated=False, reason="confident", status=200))
print("queued", flush=True)
time.sleep(600)
"""


def test_sigkill_mid_line_leaves_a_torn_tail_that_the_replay_skips_and_counts(tmp_path):
    db = tmp_path / "fd.db"
    open_store(db).close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(db)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "queued"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    journal = Path(f"{db}-ledger.jsonl")
    with journal.open("ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"id": "k40", "ts": 17')
    first = restart(db)
    assert first.replayed == 40 and first.unreadable == 1
    assert restart(db).replayed == 0
    store = open_store(db)
    assert store.execute("SELECT count(*) FROM requests")[0][0] == 40
    assert store.execute("SELECT SUM(requests) FROM rollup_minute")[0][0] == 40  # no row folded twice
    store.close()


# --- [proxy] journal_dir ------------------------------------------------------------------------------------
def test_the_journal_can_live_in_another_folder_and_one_left_beside_the_store_is_replayed(tmp_path):
    db = tmp_path / "fd.db"
    store = open_store(db)
    beside = journal_path(store)
    beside.write_text(json.dumps({"id": "old1", "ts": time.time(), "task": "t", "route": "slm", "escalated": False,
                                  "reason": "confident", "status": 200}) + "\n")
    folder = tmp_path / "elsewhere"
    writer = LedgerWriter(store, journal_dir=folder, flush_every_s=0.01)
    assert writer.replayed == 1 and not beside.exists()
    assert writer.journal.parent == folder and folder.stat().st_mode & 0o777 == 0o700
    cap_store(store)
    writer.put(row(1))
    report = writer.close(0)
    assert report.counts.journaled == 1 and str(folder) in report.summary()
    assert writer.journal.stat().st_mode & 0o777 == 0o600
    # Another store of the same name never shares the journal.
    other = open_store(tmp_path / "b" / "fd.db")
    assert journal_path(other, folder) != journal_path(store, folder)
    other.close()
    store.close()
    again = restart(db, journal_dir=folder)
    assert again.replayed == 1 and stored_ids(db) == {"old1", "r1"}


def test_journal_dir_is_validated_and_the_error_names_the_file_and_key(tmp_path, capsys):
    from engine.router.config import load_router_config
    from fleetdeck.cli import main
    from store.config_files import ConfigError

    def config(extra: str) -> Path:
        path = tmp_path / "router.toml"
        path.write_text(f'[proxy]\napi_keys_env = "FD_NO_SUCH"\n{extra}\n[[task]]\nname = "t"\n'
                        'slm_base_url = "http://127.0.0.1:9/v1"\nslm_model = "m"\nthreshold = 0.5\n')
        return path

    with pytest.raises(ConfigError) as exc:
        load_router_config(config('journal_dir = "relative/dir"'))
    assert str(tmp_path / "router.toml") in str(exc.value) and "proxy.journal_dir" in str(exc.value)
    assert "absolute" in str(exc.value)
    assert load_router_config(config('journal_dir = "~/j"')).proxy.journal_dir == Path("~/j").expanduser()

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    path = config(f'journal_dir = "{a_file}"')
    assert main(["proxy", "--config", str(path), "--store", str(tmp_path / "fd.db"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "[proxy] journal_dir" in err and "not a folder" in err
